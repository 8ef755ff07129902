import json
import math

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.replay.law import PAPER_EPSILON, ReplayLaw, ReplayPoint, critical_ratio, fit_replay_law, pilot_design

G0, D0, T_MAX = 2.8, 3.2, 1e9
# General loss rises with the domain share and then recovers along the run; domain loss falls.
TRUE = ReplayLaw(G0, D0, T_MAX, forget=0.08, forget_ratio_exponent=1.5, forget_token_exponent=0.3, recovery=-0.03,
                 recovery_token_exponent=0.6, adapt=-0.25, adapt_ratio_exponent=0.5, adapt_token_exponent=0.35,
                 source="synthetic truth")
# A second truth with no recovery and a gentler forgetting curve, for the critical-ratio checks.
STEEP = ReplayLaw(3.5, 4.1, 2e9, 0.2, 0.8, 0.5, 0.0, 1.0, -0.6, 0.3, 0.2, source="synthetic steep")
# A third where even pure replay lifts general loss for a while (a rewarmed learning rate, say).
BUMP = ReplayLaw(3.0, 3.4, 1e9, 0.1, 1.0, 0.4, 0.02, 0.3, -0.3, 0.6, 0.3, source="synthetic bump")
# Shares and lengths none of the pilots used; 1.5e9 is past the longest pilot.
HELD_OUT = [(r, t) for r in (0.1, 0.4, 0.6, 0.9) for t in (0.2e9, 0.5e9, 0.8e9, 1.5e9)]


def pilots(law: ReplayLaw, noise: float = 0.0, seed: int = 0, **design) -> list[ReplayPoint]:
    """pilot_design's pilots for T_MAX with losses from ``law`` times lognormal noise."""
    rng = np.random.default_rng(seed)
    return [ReplayPoint(r, t, law.general_loss(r, t) * math.exp(noise * rng.standard_normal()),
                        law.domain_loss(r, t) * math.exp(noise * rng.standard_normal()))
            for r, t in pilot_design(T_MAX, **design)]


def worst_relative_error(law: ReplayLaw, truth: ReplayLaw) -> float:
    return max(max(abs(law.general_loss(r, t) / truth.general_loss(r, t) - 1),
                   abs(law.domain_loss(r, t) / truth.domain_loss(r, t) - 1)) for r, t in HELD_OUT)


def brute_force_ratio(law: ReplayLaw, tokens: float, limit: float, steps: int = 20_000) -> float | None:
    """The largest grid share in (0, 1] whose general loss is within ``limit``: a plain scan."""
    within = [r for r in np.linspace(1.0 / steps, 1.0, steps) if law.general_loss(float(r), tokens) <= limit]
    return float(within[-1]) if within else None


# ---------------------------------------------------------------------------------------------
# The law


def test_law_starts_at_the_base_losses_and_follows_its_terms():
    assert TRUE.general_loss(0.5, 0.0) == G0 and TRUE.domain_loss(0.5, 0.0) == D0
    assert TRUE.general_loss(1.0, T_MAX) == pytest.approx(G0 + 0.08 - 0.03)
    assert TRUE.domain_loss(0.25, T_MAX / 4) == pytest.approx(D0 - 0.25 * 0.25 ** 0.5 * 0.25 ** 0.35)
    # The paper's shapes: general loss up with the share, domain loss down with share and tokens.
    assert TRUE.general_loss(0.9, T_MAX) > TRUE.general_loss(0.3, T_MAX)
    assert TRUE.domain_loss(0.9, T_MAX) < TRUE.domain_loss(0.3, T_MAX) < TRUE.domain_loss(0.3, T_MAX / 3) < D0


@pytest.mark.parametrize("ratio, tokens", [(-0.1, 1e9), (1.5, 1e9), (0.5, -1.0), (math.nan, 1e9)])
def test_law_rejects_predictions_outside_its_domain(ratio, tokens):
    with pytest.raises(FlopwiseError):
        TRUE.general_loss(ratio, tokens)


def test_law_rejects_forgetting_that_lowers_general_loss():
    with pytest.raises(FlopwiseError, match="forget"):
        ReplayLaw(G0, D0, T_MAX, -0.01, 1.0, 0.3, 0.0, 0.5, -0.2, 0.5, 0.3, source="bad")


def test_to_dict_from_dict_round_trip():
    law = fit_replay_law(pilots(TRUE, noise=1e-3), G0, D0)
    again = ReplayLaw.from_dict(json.loads(json.dumps(law.to_dict())))
    assert again == law
    assert again.general_loss(0.37, 7e8) == law.general_loss(0.37, 7e8)


def test_from_dict_names_missing_and_bad_values():
    data = TRUE.to_dict()
    del data["recovery"]
    with pytest.raises(FlopwiseError, match="recovery"):
        ReplayLaw.from_dict(data)
    with pytest.raises(FlopwiseError, match="numbers"):
        ReplayLaw.from_dict({**TRUE.to_dict(), "forget": "lots"})


def test_describe_is_one_line_with_the_source():
    line = TRUE.describe()
    assert "\n" not in line and "synthetic truth" in line and "- 0.03 t^0.600" in line


# ---------------------------------------------------------------------------------------------
# Fitting


def test_fit_recovers_noiseless_truth():
    law = fit_replay_law(pilots(TRUE), G0, D0)
    assert worst_relative_error(law, TRUE) < 1e-6
    assert law.forget_ratio_exponent == pytest.approx(1.5, rel=1e-3)
    assert law.adapt_token_exponent == pytest.approx(0.35, rel=1e-3)


@pytest.mark.parametrize("truth", [TRUE, STEEP, BUMP])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_predicts_held_out_pilots_within_one_percent(truth, seed):
    points = pilots(truth, noise=1e-3, seed=seed)
    law = fit_replay_law(points, truth.base_general_loss, truth.base_domain_loss)
    assert worst_relative_error(law, truth) < 0.01
    assert law.tokens_ref == T_MAX and law.source.startswith("fit:")


def test_fit_uses_the_minimum_design():
    law = fit_replay_law(pilots(TRUE, ratios=(0.2, 0.6, 1.0), lengths=(0.25, 1.0)), G0, D0)
    assert worst_relative_error(law, TRUE) < 1e-4


@pytest.mark.parametrize("points, wants", [
    ([ReplayPoint(r, t, 2.9, 3.0) for r in (0.5, 1.0) for t in (1e8, 1e9)], "1 more domain share"),
    ([ReplayPoint(r, 1e9, 2.9, 3.0) for r in (0.25, 0.5, 1.0)], "1 more token count"),
    ([ReplayPoint(1.0, 1e9, 2.9, 3.0)], "2 more domain share(s) and 1 more token count"),
    ([ReplayPoint(r, t, 2.9, 3.0) for r, t in pilot_design(1e9, (0.25, 0.5, 1.0))][:5], "1 more pilot"),
    ([], "3 more domain share"),
])
def test_too_few_pilots_is_a_one_line_error_naming_what_to_add(points, wants):
    with pytest.raises(FlopwiseError) as caught:
        fit_replay_law(points, G0, D0)
    message = str(caught.value)
    assert "\n" not in message and wants in message and "pilot_design" in message


@pytest.mark.parametrize("base_general, base_domain", [(0.0, D0), (G0, math.inf), (-1.0, D0)])
def test_fit_rejects_bad_base_losses(base_general, base_domain):
    with pytest.raises(FlopwiseError, match="base_"):
        fit_replay_law(pilots(TRUE), base_general, base_domain)


@pytest.mark.parametrize("kwargs", [dict(ratio=0.0), dict(ratio=1.2), dict(tokens=0.0), dict(general_loss=-2.0),
                                    dict(domain_loss=math.nan)])
def test_replay_point_rejects_bad_values(kwargs):
    with pytest.raises(FlopwiseError):
        ReplayPoint(**{**dict(ratio=0.5, tokens=1e9, general_loss=2.9, domain_loss=3.0), **kwargs})


# ---------------------------------------------------------------------------------------------
# The critical mixture ratio


@pytest.mark.parametrize("law", [TRUE, STEEP, BUMP])
@pytest.mark.parametrize("tokens_share", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("tolerance", [0.003, 0.01, 0.02])
def test_critical_ratio_matches_a_brute_force_scan(law, tokens_share, tolerance):
    tokens = tokens_share * law.tokens_ref
    limit = (1 + tolerance) * law.base_general_loss
    expected = brute_force_ratio(law, tokens, limit)
    if expected is None:
        with pytest.raises(FlopwiseError, match="no domain share"):
            critical_ratio(law, tokens, law.base_general_loss, tolerance)
        return
    ratio = critical_ratio(law, tokens, law.base_general_loss, tolerance)
    assert expected <= ratio <= min(1.0, expected + 1 / 20_000)
    assert law.general_loss(ratio, tokens) <= limit * (1 + 1e-12)


def test_brute_force_cases_cover_interior_pure_domain_and_none():
    """The scan above must see all three outcomes, or it is testing less than it claims."""
    seen = set()
    for law in (TRUE, STEEP, BUMP):
        for share in (0.3, 1.0, 2.0):
            for tolerance in (0.003, 0.01, 0.02):
                found = brute_force_ratio(law, share * law.tokens_ref, (1 + tolerance) * law.base_general_loss)
                seen.add("none" if found is None else "pure" if found == 1.0 else "interior")
    assert seen == {"none", "pure", "interior"}


def test_critical_ratio_is_one_when_pure_domain_data_stays_within():
    # At T_MAX pure domain data lifts general loss by 0.05 = 1.79%: within 2%.
    assert critical_ratio(TRUE, T_MAX, G0, 0.02) == 1.0


def test_critical_ratio_errors_when_nothing_qualifies():
    with pytest.raises(FlopwiseError, match="no domain share in \\(0, 1\\]") as caught:
        critical_ratio(BUMP, BUMP.tokens_ref, BUMP.base_general_loss, 0.003)
    assert "\n" not in str(caught.value)


def test_critical_ratio_defaults_to_the_papers_epsilon():
    tokens = 2 * STEEP.tokens_ref
    default = critical_ratio(STEEP, tokens, STEEP.base_general_loss)
    relative = critical_ratio(STEEP, tokens, STEEP.base_general_loss, PAPER_EPSILON / STEEP.base_general_loss)
    assert 0 < default < 1 and default == pytest.approx(relative, rel=1e-12)
    assert STEEP.general_loss(default, tokens) == pytest.approx(STEEP.base_general_loss + PAPER_EPSILON)


def test_critical_ratio_needs_the_domain_loss_to_fall():
    flat = ReplayLaw(G0, D0, T_MAX, 0.08, 1.5, 0.3, -0.03, 0.6, 0.0, 0.5, 0.35, source="no domain gain")
    with pytest.raises(FlopwiseError, match="does not pay"):
        critical_ratio(flat, T_MAX, G0, 0.01)


@pytest.mark.parametrize("tokens, base, tolerance", [(0.0, G0, 0.01), (1e9, 0.0, 0.01), (1e9, G0, -0.01)])
def test_critical_ratio_rejects_bad_arguments(tokens, base, tolerance):
    with pytest.raises(FlopwiseError):
        critical_ratio(TRUE, tokens, base, tolerance)


def test_pilots_to_suggestion_end_to_end():
    law = fit_replay_law(pilots(STEEP, noise=5e-4, seed=3), STEEP.base_general_loss, STEEP.base_domain_loss)
    truth = critical_ratio(STEEP, T_MAX, STEEP.base_general_loss, 0.01)
    assert 0 < truth < 1
    assert critical_ratio(law, T_MAX, STEEP.base_general_loss, 0.01) == pytest.approx(truth, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Pilot design


def test_pilot_design_default_is_four_shares_at_two_lengths_cheapest_first():
    design = pilot_design(3e9)
    assert design == [(r, t) for t in (1e9, 3e9) for r in (0.25, 0.5, 0.75, 1.0)]
    assert [t for _, t in design] == sorted(t for _, t in design)


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_tokens=0.0), "total_tokens"),
    (dict(total_tokens=1e9, ratios=(0.5, 1.0)), "distinct ratios"),
    (dict(total_tokens=1e9, lengths=(1.0, 1.0)), "distinct lengths"),
    (dict(total_tokens=1e9, ratios=(0.0, 0.5, 1.0)), "ratios"),
    (dict(total_tokens=1e9, lengths=(0.5, 2.0)), "lengths"),
])
def test_pilot_design_rejects_designs_the_fit_cannot_use(kwargs, match):
    with pytest.raises(FlopwiseError, match=match):
        pilot_design(**kwargs)


def test_the_pilots_give_the_general_domains_their_configured_proportions():
    from flopwise.config import load_config
    from flopwise.replay.pilots import configured_weights, pilot, share_weights
    from flopwise.resolve import resolve

    config = load_config(None, ['data.sources=["web=./w:0.8", "code=./c:0.2", "med=./m:1"]'])
    domains = ["code", "med", "web"]
    configured = configured_weights(resolve(config, settle_memory=False).config, domains)  # the weights --data gives
    shares = share_weights(configured, "med", 0.5, domains)
    assert shares == pytest.approx({"med": 0.5, "code": 0.1, "web": 0.4})
    assert share_weights(None, "med", 0.5, domains) == pytest.approx({"med": 0.5, "code": 0.25, "web": 0.25})
    piloted = resolve(pilot(config, shares, 1e5), settle_memory=False).config  # the shares, and nothing else
    assert piloted.data.sources == ["web=./w", "code=./c", "med=./m"]
    assert configured_weights(piloted, domains) == pytest.approx([0.1, 0.5, 0.4])
