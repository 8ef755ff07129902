"""Early loss forecasts on simulated WSD runs whose true constant-LR curve and final loss are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.optim.schedules import Schedule
from flopwise.scaling.law import ScalingLaw
from flopwise.scaling.law_file import LawPrior, PlanningLaw
from flopwise.train.loss_curve import (
    BOOTSTRAP_Z,
    Calibration,
    CurvePoint,
    calibrate_kappa,
    fit_curve,
    forecast_final_loss,
    points_from_events,
    projected_total_tokens,
    stable_points,
    summarize_kappas,
)

WSD = Schedule()  # warmup 0.02, stable to p = 0.8, (1 - sqrt) cooldown to 0
E, A, GAMMA = 1.8, 400.0, 0.35  # loss 4.4 at 1.5M tokens, 2.6 at 50M: a small LM's curve
DROP = 0.05  # the cooldown ends 5% below the constant-LR curve


def l_const(tokens: float) -> float:
    return E + A * tokens ** -GAMMA


def simulate(total_tokens: float, seed: int, steps: int = 1000, noise: float = 0.01,
             observed: float = 1.0) -> list[CurvePoint]:
    """One logged point per step: the power law times lognormal noise (a batch of 8), sinking by DROP in the decay."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, steps + 1) / steps
    tokens = p * total_tokens
    cooldown = np.clip((p - WSD.decay_start) / WSD.decay, 0.0, 1.0)
    loss = (E + A * tokens ** -GAMMA) * (1.0 - DROP * cooldown) * np.exp(rng.normal(0.0, noise, steps))
    return [CurvePoint(float(t), float(v), float(q)) for t, v, q in zip(tokens, loss, p) if q <= observed + 1e-9]


def true_final(total_tokens: float) -> float:
    return (1.0 - DROP) * l_const(total_tokens)


def test_fit_on_first_30_percent_recovers_the_curve_at_the_end():
    total = 5e7
    points = simulate(total, seed=0, observed=0.3)
    fit = fit_curve(stable_points(points, WSD))
    assert fit(total) == pytest.approx(l_const(total), rel=0.015)
    forecast = forecast_final_loss(points, WSD, total, Calibration(kappa_mean=0.95, kappa_std=0.0, n_runs=1))
    assert forecast.loss == pytest.approx(0.95 * l_const(total), rel=0.02)
    assert forecast.low <= 0.95 * l_const(total) <= forecast.high
    assert forecast.fraction_observed == pytest.approx(0.3)


def test_interval_covers_the_truth_at_its_nominal_rate():
    """Twice the fit's standard error (with kappa's 1% floor) should hold the truth in ~95%+ of noisy runs."""
    total, calibration = 5e7, Calibration(kappa_mean=1.0, kappa_std=0.0, n_runs=1)
    forecasts = [forecast_final_loss(simulate(total, seed=seed, steps=500, noise=0.015, observed=0.3), WSD, total,
                                     calibration) for seed in range(20)]
    covered = sum(f.low <= l_const(total) <= f.high for f in forecasts)
    assert covered >= 18
    assert np.mean([(f.high - f.loss) / f.loss for f in forecasts]) < 0.05  # and it is not vacuous


def test_kappa_from_one_pilot_length_forecasts_another():
    pilot_total = 2e7
    kappa = calibrate_kappa(simulate(pilot_total, seed=1), true_final(pilot_total), WSD, pilot_total)
    assert kappa == pytest.approx(1.0 - DROP, rel=0.01)
    total = 6e7
    points = simulate(total, seed=2, observed=0.3)
    forecast = forecast_final_loss(points, WSD, total, summarize_kappas([kappa]))
    assert forecast.loss == pytest.approx(true_final(total), rel=0.02)
    assert forecast.fit(total) / true_final(total) - 1 > 0.04  # without kappa the cooldown's 5% would be missed


def test_calibration_over_pilots_of_several_lengths():
    totals = (1e7, 2e7, 4e7)
    kappas = [calibrate_kappa(simulate(t, seed=10 + i), true_final(t), WSD, t) for i, t in enumerate(totals)]
    calibration = summarize_kappas(kappas)
    assert calibration.n_runs == 3
    assert calibration.kappa_mean == pytest.approx(0.95, rel=0.01)
    assert 0.0 < calibration.kappa_std < 0.01
    forecast = forecast_final_loss(simulate(8e7, seed=20, observed=0.3), WSD, 8e7, calibration)
    assert forecast.low <= true_final(8e7) <= forecast.high


def test_warmup_and_decay_points_do_not_move_the_fit():
    clean = simulate(3e7, seed=3)
    wild = [pt._replace(loss=50.0) if pt.p_lr < WSD.warmup else
            pt._replace(loss=0.01) if pt.p_lr > WSD.decay_start else pt for pt in clean]
    used = stable_points(wild, WSD)
    assert all(WSD.warmup <= pt.p_lr <= WSD.decay_start for pt in used)
    assert used[0].tokens >= 0.1 * used[-1].tokens  # the earliest 10% of the stable tokens are skipped
    assert fit_curve(used) == fit_curve(stable_points(clean, WSD))
    assert calibrate_kappa(wild, 2.5, WSD, 3e7) == calibrate_kappa(clean, 2.5, WSD, 3e7)
    naive = fit_curve(sorted(wild, key=lambda pt: pt.tokens))
    assert abs(naive(3e7) / l_const(3e7) - 1) > 0.03 and naive.E < 0.5 * E  # those points would have bent it


def test_loss_spikes_are_shrugged_off():
    total = 5e7
    points = simulate(total, seed=4, observed=0.3)
    spiked = [pt._replace(loss=pt.loss * 1.6) if i % 37 == 0 else pt for i, pt in enumerate(points)]
    forecast = forecast_final_loss(spiked, WSD, total, Calibration(0.95, 0.0, 1))
    assert forecast.loss == pytest.approx(true_final(total), rel=0.02)


def test_too_little_of_the_stable_phase_gives_no_forecast():
    calibration = Calibration(0.95, 0.0, 1)
    assert forecast_final_loss(simulate(5e7, seed=5, observed=0.025), WSD, 5e7, calibration) is None  # 6 points
    dense = simulate(5e7, seed=5, steps=10000, observed=0.028)  # 80 points, but spanning only 1.4x in tokens
    assert len(stable_points(dense, WSD)) > 50
    assert forecast_final_loss(dense, WSD, 5e7, calibration) is None
    assert forecast_final_loss([], WSD, 5e7, calibration) is None
    with pytest.raises(FlopwiseError, match="usable stable-phase points"):
        calibrate_kappa(simulate(5e7, seed=5, observed=0.025), 2.5, WSD, 5e7)


def test_interval_holds_the_estimate_and_widens_with_kappa_spread():
    points, total = simulate(5e7, seed=6, observed=0.3), 5e7
    tight = forecast_final_loss(points, WSD, total, Calibration(0.95, 0.0, 1))
    loose = forecast_final_loss(points, WSD, total, Calibration(0.95, 0.05, 4))
    for forecast in (tight, loose):
        assert forecast.low < forecast.loss < forecast.high
    assert loose.loss == tight.loss
    assert loose.high - loose.low > tight.high - tight.low
    assert (loose.high - loose.loss) / loose.loss >= 2 * 0.05 / 0.95  # at least two kappa standard deviations
    assert (tight.high - tight.loss) / tight.loss >= 0.01  # one pilot run: the 1% floor


def test_forecast_record_is_json_ready():
    forecast = forecast_final_loss(simulate(5e7, seed=7, observed=0.3), WSD, 5e7, Calibration(0.95, 0.01, 3))
    record = json.loads(json.dumps(forecast.to_dict()))
    assert record["predicted_loss"] == forecast.loss and record["low"] == forecast.low
    assert record["high"] == forecast.high and record["p_observed"] == pytest.approx(0.3)
    assert set(record["fit"]) == {"E", "A", "gamma"}
    assert record["fit"]["gamma"] == pytest.approx(GAMMA, abs=0.15)


def test_projected_total_tokens():
    assert projected_total_tokens(1.5e6, 0.25) == pytest.approx(6e6)
    assert projected_total_tokens(6e6, 1.0) == 6e6
    for p in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(FlopwiseError, match="p_now="):
            projected_total_tokens(1e6, p)


def test_points_from_events_reads_train_events_only():
    events = [{"event": "train", "step": 1, "p": 0.01, "p_lr": 0.011, "tokens": 4096, "loss": 8.3, "lr": 1e-4},
              {"event": "eval", "step": 1, "p": 0.01, "tokens": 4096, "val_loss": 8.32},
              {"event": "train", "step": 2, "p": 0.02, "p_lr": 0.021, "tokens": 8192, "loss": 7.9, "lr": 2e-4}]
    assert points_from_events(events) == [CurvePoint(4096.0, 8.3, 0.011), CurvePoint(8192.0, 7.9, 0.021)]
    with pytest.raises(FlopwiseError, match="lacks p_lr"):
        points_from_events([{"event": "train", "step": 3, "tokens": 1, "loss": 2.0}])


def test_summarize_kappas():
    assert summarize_kappas([0.93]) == Calibration(0.93, 0.0, 1)
    two = summarize_kappas([0.9, 1.0])
    assert two.kappa_mean == pytest.approx(0.95) and two.kappa_std == pytest.approx(0.1 / math.sqrt(2))
    with pytest.raises(FlopwiseError, match="no kappa values"):
        summarize_kappas([])


def test_bad_arguments_name_the_value():
    points = simulate(5e7, seed=8, observed=0.3)
    with pytest.raises(FlopwiseError, match="total_tokens=0"):
        forecast_final_loss(points, WSD, 0, Calibration(0.95, 0.0, 1))
    with pytest.raises(FlopwiseError, match="min_points=3"):
        forecast_final_loss(points, WSD, 5e7, Calibration(0.95, 0.0, 1), min_points=3)
    with pytest.raises(FlopwiseError, match="skip=1.0"):
        stable_points(points, WSD, skip=1.0)
    with pytest.raises(FlopwiseError, match="kappa_mean=0"):
        Calibration(0.0, 0.0, 1)
    with pytest.raises(FlopwiseError, match="final_val_loss=-1"):
        calibrate_kappa(points, -1.0, WSD, 5e7)


def _prior(loss_at_total: float, total: float, sd: float, n: float = 1e6) -> LawPrior:
    """A law whose loss at (n, total) is ``loss_at_total``, with no bootstrap spread and ``sd`` as its extra error."""
    law = ScalingLaw(E=loss_at_total - 2.0, A=1.0 * n ** 0.5, B=1.0 * total ** 0.5, alpha=0.5, beta=0.5, source="t")
    return LawPrior(law, [law, law], n, sd)


def test_a_law_prior_is_averaged_with_the_curve_by_inverse_variance():
    total = 5e7
    points = simulate(total, seed=0, observed=0.3)
    calibration = Calibration(kappa_mean=0.95, kappa_std=0.0, n_runs=1)
    curve = forecast_final_loss(points, WSD, total, calibration)
    curve_sd = (curve.high / curve.loss - 1.0) / 2  # the curve's half-width is two standard deviations
    law_loss = curve.loss * 1.1
    equal = forecast_final_loss(points, WSD, total, calibration, prior=_prior(law_loss, total, curve_sd))
    assert equal.curve_loss == pytest.approx(curve.loss) and equal.law_loss == pytest.approx(law_loss)
    assert equal.law_weight == pytest.approx(0.5)
    assert equal.loss == pytest.approx((curve.loss + law_loss) / 2)
    assert equal.high / equal.loss - 1.0 == pytest.approx(2 * curve_sd / math.sqrt(2))  # two equal errors: sqrt(2)
    sure = forecast_final_loss(points, WSD, total, calibration, prior=_prior(law_loss, total, curve_sd / 3))
    assert sure.law_weight == pytest.approx(0.9) and sure.loss == pytest.approx(0.1 * curve.loss + 0.9 * law_loss)
    record = sure.to_dict()
    assert record["curve_loss"] == pytest.approx(curve.loss) and record["law_weight"] == pytest.approx(0.9)
    assert forecast_final_loss(simulate(total, seed=0, observed=0.02), WSD, total, calibration,
                               prior=_prior(law_loss, total, 0.01)) is None  # no curve yet: no forecast


def test_the_law_prior_spread_comes_from_its_bootstrap_and_holdout():
    base = ScalingLaw(E=2.0, A=100.0, B=300.0, alpha=0.3, beta=0.3, source="t")
    wider = [ScalingLaw(E=2.0 + k / 100, A=100.0, B=300.0, alpha=0.3, beta=0.3, source="t") for k in range(-10, 11)]
    law = PlanningLaw(base, bootstrap=wider, runs=[{"non_embedding": 1e5}, {"non_embedding": 4e5}],
                      holdout=[{"run": "a", "error": 0.01}, {"run": "b", "error": -0.04}])
    prior = law.prior_for(2e5)
    loss, sd = prior.predict(1e7)
    assert loss == pytest.approx(base.loss(2e5, 1e7))
    boot = (np.quantile([w.loss(2e5, 1e7) for w in wider], 0.9) - np.quantile([w.loss(2e5, 1e7) for w in wider], 0.1))
    assert sd == pytest.approx(math.hypot(boot / (2 * BOOTSTRAP_Z * loss), 0.04))  # the worst holdout error
    assert law.prior_for(1e6) is None  # beyond 2x the law's largest run
    assert PlanningLaw(base).prior_for(2e5) is None  # a prior from other data is no evidence about this run
    assert PlanningLaw(base, runs=[{"non_embedding": 2e5}]).prior_for(2e5) is None  # no bootstrap: no spread
