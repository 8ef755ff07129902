"""The planner's parts on their own: the shape family, budget-to-tokens conversion, the choice among
candidates, the scan's design and the law file.  Throughput is faked here so that the choices can
be computed independently; real probes and real pilots are in test_planning_runs.py."""

from __future__ import annotations

import json
import math

import pytest

from flopwise.budget import Budget
from flopwise.config import ModelSection, RunConfig, load_config
from flopwise.errors import FlopwiseError
from flopwise.model.config import NAMED_SIZES
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.plan.planner import Speed, budget_tokens, plan_run
from flopwise.plan.scan import (
    LENGTHS,
    MAX_RATIO,
    MIN_RATIO,
    RUN_OVERHEAD_SECONDS,
    SIZES,
    design_scan,
    extension_cost,
    pilot_config,
)
from flopwise.scaling.law import ScalingLaw
from flopwise.scaling.law_file import PRIOR_KAPPA, PlanningLaw, find_law, read_law, setup_key
from flopwise.scaling.shapes import WIDTHS, depth_for_width, family_shape, heads_for_width
from tests.helpers import FakeClock

LAW = ScalingLaw(E=1.5, A=80.0, B=900.0, alpha=0.35, beta=0.35, source="test")


def fake_seconds(cfg, run_config) -> float:
    """Step time proportional to the step's FLOPs plus a fixed overhead, like a small device."""
    return 0.02 + flops_per_token(cfg) * run_config.optim.batch_size * cfg.seq_len / 5e10


PROBE = Speed(probe=fake_seconds)


def test_family_depth_rule_reproduces_the_named_sizes():
    for name in ("small", "base", "medium"):
        size = NAMED_SIZES[name]
        assert depth_for_width(size["d_model"]) == size["n_layers"]
    assert depth_for_width(2048) == 16 and depth_for_width(64) == 3 and depth_for_width(32) == 2


def test_every_family_member_is_a_valid_shape_with_even_heads():
    previous = 0
    for width in WIDTHS:
        cfg = family_shape(ModelSection(), width, 4096)
        assert cfg.head_dim % 2 == 0 and cfg.d_model == width and cfg.n_heads == heads_for_width(width)
        n = count_parameters(cfg)["non_embedding"]
        limit = 1.9 if width > 128 else 2.5 if width > 64 else 6.0  # depth steps up at d_model 96 -> 128
        assert 1.0 < n / max(previous, 1) and (previous == 0 or n / previous < limit)
        previous = n


def test_budget_tokens_takes_the_first_limit_to_bind():
    cfg = family_shape(ModelSection(), 128, 4096)
    tokens_per_step = 8 * 256
    assert budget_tokens(Budget(seconds=100), cfg, tokens_per_step, 0.5) == pytest.approx(200 * 2048)
    assert budget_tokens(Budget(flops=1e13), cfg, tokens_per_step, 0.5) == pytest.approx(1e13 / flops_per_token(cfg))
    both = Budget(seconds=100, tokens=1e5)
    assert budget_tokens(both, cfg, tokens_per_step, 0.5) == 1e5
    assert budget_tokens(Budget(seconds=100, steps=10), cfg, tokens_per_step, 0.5) == 10 * 2048


def test_plan_takes_the_lowest_predicted_loss_among_all_family_members():
    config = load_config(values={"budget.seconds": 600})
    plan = plan_run(config, 4096, PlanningLaw(LAW), "test device", PROBE)
    # independently: every family member's loss at the tokens its step time allows
    losses = {}
    for width in WIDTHS[:20]:
        cfg = family_shape(config.model, width, 4096)
        tokens = 600 / fake_seconds(cfg, config) * 2048
        losses[width] = LAW.loss(count_parameters(cfg)["non_embedding"], tokens)
    best = min(losses, key=losses.get)
    assert plan.chosen.d_model == best
    assert plan.chosen.law_loss == pytest.approx(losses[best])
    assert plan.chosen.predicted_loss is None and plan.loss_basis == "prior"  # the prior states no loss
    assert plan.chosen.tokens == pytest.approx(600 / fake_seconds(family_shape(config.model, best, 4096), config)
                                               * 2048)
    assert plan.candidates[-1].d_model > best  # the search looked past the best before stopping
    assert any("law:" in line for line in plan.assumptions) and any("throughput" in line for line in plan.assumptions)
    config_after = plan.apply(config)
    assert config_after.model.build(4096).d_model == best and config.model.d_model is None  # a new config


def test_a_larger_budget_plans_a_larger_model():
    small = plan_run(load_config(values={"budget.seconds": 60}), 4096, PlanningLaw(LAW), "d", PROBE)
    large = plan_run(load_config(values={"budget.seconds": 6000}), 4096, PlanningLaw(LAW), "d", PROBE)
    assert large.chosen.non_embedding > small.chosen.non_embedding
    assert large.chosen.tokens > small.chosen.tokens


def test_the_throughput_ratio_of_a_fitted_law_slows_the_plan_down():
    config = load_config(values={"budget.seconds": 600})
    plain = plan_run(config, 4096, PlanningLaw(LAW), "d", PROBE)
    slower = plan_run(config, 4096, PlanningLaw(LAW, runs=[{}], throughput_ratio=0.5), "d", PROBE)
    first = slower.candidates[0]
    assert first.tokens == pytest.approx(plain.candidates[0].tokens / 2)


def test_memory_cap_bounds_the_candidates(tmp_path):
    free = plan_run(load_config(values={"budget.seconds": 1e6}), 4096, PlanningLaw(LAW), "d", PROBE)
    capped = plan_run(load_config(values={"budget.seconds": 1e6, "memory.limit": "110MiB"}), 4096,
                      PlanningLaw(LAW), "d", PROBE)
    assert capped.chosen.d_model < free.chosen.d_model
    assert capped.chosen.memory_peak <= 110 * 2**20 and capped.chosen.methods  # methods chosen to fit
    assert any("memory: cap 110.0 MiB" in line for line in capped.assumptions)
    with pytest.raises(FlopwiseError, match="no memory-saving methods fit memory.limit 30.0 MiB"):
        plan_run(load_config(values={"budget.seconds": 1e6, "memory.limit": "30MiB"}), 4096, PlanningLaw(LAW),
                 "d", PROBE)


def test_plans_refuse_budgets_that_do_not_bound_size():
    with pytest.raises(FlopwiseError, match="does not bound the model size"):
        plan_run(load_config(values={"budget.steps": 1e6}), 4096, PlanningLaw(LAW), "d", PROBE)
    with pytest.raises(FlopwiseError, match="fewer than 20 steps"):
        plan_run(load_config(values={"budget.seconds": 0.1}), 4096, PlanningLaw(LAW), "d", PROBE)


def test_scan_design_fills_its_budget_with_sizes_in_the_ratio_range(monkeypatch):
    config = RunConfig()
    rate = lambda cfg: 2048 / fake_seconds(cfg, config)  # noqa: E731
    clock, probed = FakeClock(lambda model: 0.0).install(monkeypatch), []

    def probe(cfg) -> float:  # 1.5 s of the scan's wall clock each, on a fake clock: the same on any machine
        probed.append(cfg.d_model)
        clock.advance(1.5)
        return rate(cfg)

    design = design_scan(900, lambda w: family_shape(config.model, w, 4096), probe)
    assert extension_cost(0.8) == pytest.approx(1 + (2 - 0.8 * 1) + (4 - 0.8 * 2))  # 4.6
    # the fake device's members in the ratio range, at the shortest pilot three sizes would get
    first_unit = (0.97 * 900 - SIZES * len(LENGTHS) * RUN_OVERHEAD_SECONDS) / (SIZES * 4.6)  # 3% to spare
    eligible = [w for w in WIDTHS if MIN_RATIO <= rate(family_shape(config.model, w, 4096)) * 4 * first_unit
                / count_parameters(family_shape(config.model, w, 4096))["non_embedding"] <= MAX_RATIO]
    sizes = min(SIZES, len(eligible))
    assert probed == list(WIDTHS[:len(probed)]) and len(probed) > len(eligible)  # up to the first one past the range
    left = 900 - 1.5 * len(probed)  # what probing took is gone
    unit = (0.97 * left - sizes * len(LENGTHS) * RUN_OVERHEAD_SECONDS) / (sizes * 4.6)
    assert design.unit_seconds == pytest.approx(unit)
    assert design.lengths() == pytest.approx([unit, 2 * unit, 4 * unit])
    assert len(design.sizes) == sizes and {s.d_model for s in design.sizes} <= set(eligible)
    ratios = [s.tokens_per_second * LENGTHS[-1] * first_unit / s.non_embedding for s in design.sizes]
    assert all(MIN_RATIO <= r <= MAX_RATIO for r in ratios)
    logs = [math.log(s.non_embedding) for s in design.sizes]
    assert logs == sorted(logs)
    with pytest.raises(FlopwiseError, match="give at least"):
        design_scan(60, lambda w: family_shape(config.model, w, 4096), rate)


def test_setup_key_follows_data_recipe_and_device_but_not_budget_or_seed():
    base = load_config(values={"budget.seconds": 60})
    key = setup_key(base, "cpu")
    assert setup_key(load_config(values={"budget.seconds": 600, "train.seed": 3}), "cpu") == key
    assert setup_key(load_config(values={"budget.seconds": 60, "model.d_model": 512}), "cpu") == key
    assert setup_key(load_config(values={"budget.seconds": 60, "data.sources": ["./x"]}), "cpu") != key
    assert setup_key(load_config(values={"budget.seconds": 60, "optim.lr": 3e-3}), "cpu") != key
    assert setup_key(base, "cuda") != key
    assert setup_key(load_config(values={"budget.seconds": 60, "model.size": "tiny"}), "cpu") != key  # seq_len 128
    assert setup_key(load_config(values={"budget.seconds": 60, "model.size": "base"}), "cpu") == key  # seq_len 256 too


def test_law_file_round_trip_and_lookup(tmp_path):
    law = PlanningLaw(LAW, bootstrap=[LAW, LAW], runs=[{"name": "a"}], throughput_ratio=0.9, key="k")
    law.save(tmp_path / "law.json")
    again = read_law(tmp_path)
    assert again.law == LAW and again.throughput_ratio == 0.9 and again.runs == [{"name": "a"}]
    assert again.kappa == PRIOR_KAPPA and not again.is_prior
    assert find_law(None, tmp_path / "cache", "k").is_prior  # nothing cached: the prior
    (tmp_path / "cache" / "laws").mkdir(parents=True)
    (tmp_path / "cache" / "laws" / "k.json").write_text((tmp_path / "law.json").read_text())
    assert not find_law(None, tmp_path / "cache", "k").is_prior
    (tmp_path / "bad.json").write_text(json.dumps({"bootstrap": []}))
    with pytest.raises(FlopwiseError, match="bad.json' is not a flopwise law"):
        read_law(tmp_path / "bad.json")
    with pytest.raises(FlopwiseError, match="no law at"):
        read_law(tmp_path / "missing")


@pytest.mark.slow
def test_holdout_errors_measure_extrapolation_in_tokens():
    from flopwise.scaling.fitting import holdout_errors

    records = [{"name": f"{n}-{d}", "non_embedding": n, "tokens": d, "val_loss": float(LAW.loss(n, d))}
               for n in (1e5, 3e5, 1e6) for d in (1e6, 3e6, 9e6)]
    errors = holdout_errors(records)
    assert [e["run"] for e in errors] == ["100000.0-9000000.0", "300000.0-9000000.0", "1000000.0-9000000.0"]
    assert all(abs(e["error"]) < 2e-3 for e in errors)  # an exact law extrapolates exactly
    bent = [dict(r, val_loss=r["val_loss"] * (0.9 if r["tokens"] == 9e6 else 1.0)) for r in records]
    assert max(e["error"] for e in holdout_errors(bent)) > 0.04  # longest runs 10% below the trend: caught
    assert holdout_errors(records[:6]) == []  # too few runs to leave one out


def test_a_fitted_law_plans_only_sizes_near_the_runs_it_was_fitted_on():
    config = load_config(values={"budget.seconds": 1e5})
    size = {w: count_parameters(family_shape(config.model, w, 4096))["non_embedding"] for w in WIDTHS}
    law = PlanningLaw(LAW, runs=[{"non_embedding": size[32]}, {"non_embedding": size[64]}])
    plan = plan_run(config, 4096, law, "d", PROBE)
    allowed = [w for w in WIDTHS if size[32] / 2 <= size[w] <= 2 * size[64]]
    assert [c.d_model for c in plan.candidates] == allowed == [32, 64]
    assert plan.chosen == min(plan.candidates, key=lambda c: c.predicted_loss)
    assert plan_run(config, 4096, PlanningLaw(LAW), "d", PROBE).chosen.d_model > 64  # a prior is not limited
    assert any(f"sizes from {size[32] / 2e6:.2f}M to {2 * size[64] / 1e6:.2f}M" in line for line in plan.assumptions)
    with pytest.raises(FlopwiseError, match=r"no family member lies within the law's size range \(5000000\.00M to "
                                            r"20000000\.00M non-embedding parameters\)"):
        plan_run(config, 4096, PlanningLaw(LAW, runs=[{"non_embedding": 1e13}]), "d", PROBE)


def test_a_plan_says_how_far_it_extrapolates_the_law_in_tokens():
    config = load_config(values={"budget.seconds": 1e5})
    size = {w: count_parameters(family_shape(config.model, w, 4096))["non_embedding"] for w in (32, 64)}
    runs = [{"non_embedding": size[32], "tokens": 1e6}, {"non_embedding": size[64], "tokens": 2e6}]
    plan = plan_run(config, 4096, PlanningLaw(LAW, runs=runs), "d", PROBE)
    tokens_line = next(line for line in plan.assumptions if line.startswith("tokens:"))
    assert tokens_line.endswith(f"; {plan.chosen.tokens / 2e6:.1f}x the law's longest run (2.00M tokens), "
                                "so its token term is extrapolated that far")
    within = [dict(run, tokens=1e15) for run in runs]
    plan = plan_run(config, 4096, PlanningLaw(LAW, runs=within), "d", PROBE)
    assert not any("extrapolated" in line for line in plan.assumptions)


def test_a_pilot_warms_up_as_long_in_seconds_as_a_run_of_the_longest_pilot_length():
    config = load_config(values={"budget.seconds": 60, "schedule.warmup": 0.02})
    pilot = pilot_config(config, 96, 50.0, longest=200.0)
    assert pilot.schedule.warmup == pytest.approx(0.08)  # 4 s of 50 s, as 2% of a 200 s run
    assert pilot.budget.seconds == 50.0 and pilot.model.d_model == 96 and pilot.model.n_heads == 3
    assert config.schedule.warmup == 0.02  # the user's config is untouched
    capped = pilot_config(config, 96, 1.0, longest=1000.0).schedule.warmup
    assert capped == pytest.approx(0.4)  # at most half of what precedes the decay
