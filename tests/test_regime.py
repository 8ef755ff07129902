"""Where a curve's early regime ends, and what the law's fit does with runs that ended before it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flopwise.optim.schedules import Schedule
from flopwise.plan.early import CurvePoint
from flopwise.plan.fitting import law_from_records, split_early_regime
from flopwise.plan.law_file import PlanningLaw
from flopwise.plan.regime import MARGIN, STRIDE, WINDOW, early_regime_end, steepest_tokens
from flopwise.plan.scaling import ScalingLaw

WSD = Schedule()  # warmup 0.02, stable to p = 0.8
LAW = ScalingLaw(E=2.0, A=400.0, B=2e4, alpha=0.5, beta=0.7, source="test")


def curve(total: float, drop_at: float | None = None, steps: int = 2000, noise: float = 0.01) -> list[CurvePoint]:
    """A power-law training curve over a WSD run; with ``drop_at``, the loss also falls by a third within
    a factor 1.3 of that many tokens (a logistic step in log tokens), as when a model learns to copy."""
    rng = np.random.default_rng(0)
    p = np.arange(1, steps + 1) / steps
    tokens = p * total
    loss = 2.0 + 400.0 * tokens ** -0.35
    if drop_at is not None:
        loss = loss * (1.0 - 0.33 / (1.0 + np.exp(-(np.log(tokens) - math.log(drop_at)) / 0.1)))
    loss = loss * np.exp(rng.normal(0.0, noise, steps))
    return [CurvePoint(float(t), float(v), float(q)) for t, v, q in zip(tokens, loss, p)]


def test_a_power_law_curve_is_steepest_where_its_stable_phase_starts():
    points = curve(1e7)
    first_stable = min(pt.tokens for pt in points if pt.p_lr >= WSD.warmup)
    steepest = steepest_tokens(points, WSD)
    # the first window is centred half a window past the first stable point; noise may move it a stride or two
    assert math.log(steepest) == pytest.approx(math.log(first_stable) + WINDOW / 2, abs=3 * STRIDE)


def test_a_sudden_drop_is_found_and_the_regime_ends_a_margin_after_it():
    steepest = steepest_tokens(curve(1e7, drop_at=2e6), WSD)
    assert steepest == pytest.approx(2e6, rel=0.1)
    assert early_regime_end(steepest) == pytest.approx(MARGIN * steepest)


def test_the_decay_is_not_taken_for_a_drop():
    """The cooldown steepens the curve by design; only points at full learning rate count."""
    points = curve(1e7)
    decayed = [pt._replace(loss=pt.loss * (1.0 - 0.3 * max(pt.p_lr - WSD.decay_start, 0.0) / WSD.decay))
               for pt in points]
    assert steepest_tokens(decayed, WSD) == steepest_tokens(points, WSD)


def test_too_short_a_curve_has_no_steepest_point():
    assert steepest_tokens(curve(1e7, steps=8), WSD) is None
    assert early_regime_end(None) == 0.0


def record(name: str, n: float, d: float, steepest: float | None, inflate: float = 1.0) -> dict:
    return {"name": name, "non_embedding": n, "tokens": d, "val_loss": float(LAW.loss(n, d)) * inflate,
            "steepest_tokens": steepest, "tokens_per_second": 1.0}


def test_a_sizes_regime_ends_where_its_longest_look_says():
    """A run stopped before the drop has a curve that looks settled: its size's other runs decide."""
    runs = [record("short", 1e5, 1e6, 2e5), record("long", 1e5, 8e6, 2e6), record("other size", 3e5, 1e6, None)]
    settled, early = split_early_regime(runs)
    assert [r["name"] for r in early] == ["short"] and early[0]["regime_end"] == MARGIN * 2e6
    assert [r["name"] for r in settled] == ["long", "other size"] and settled[1]["regime_end"] == 0.0


def test_the_law_leaves_out_early_runs_when_enough_remain():
    sizes = (1e5, 3e5, 1e6)
    runs = [record(f"early {n:g}", n, 1e6, 2e6, inflate=1.2) for n in sizes]  # the steeper regime, 20% above
    runs += [record(f"{d:g} {n:g}", n, d, 2e6) for n in sizes for d in (4e6, 8e6, 16e6)]
    law = law_from_records(runs, samples=20)
    assert len(law.runs) == 9 and law.early_left_out and len(law.early) == 3
    assert float(law.law.loss(3e5, 3e7)) == pytest.approx(float(LAW.loss(3e5, 3e7)), rel=5e-3)
    assert "3 run(s) left out" in law.describe() and "3.00M tokens for 0.10M" in law.describe()
    again = PlanningLaw.from_dict(law.to_dict())
    assert again.early == law.early and again.early_left_out


def test_the_law_spans_the_early_regime_with_a_warning_when_too_few_runs_remain():
    runs = [record(f"{d:g} {n:g}", n, d, 2e6, inflate=1.2 if d < 3e6 else 1.0)
            for n in (1e5, 3e5) for d in (5e5, 1e6, 4e6)]
    law = law_from_records(runs, samples=20)
    assert len(law.runs) == 6 and not law.early_left_out and len(law.early) == 4
    assert "4 of its 6 runs ended before" in law.describe() and "will be optimistic" in law.describe()
