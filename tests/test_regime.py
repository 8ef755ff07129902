"""Where a curve's early regime ends, and what the law's fit does with runs that ended before it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flopwise.optim.schedules import Schedule
from flopwise.plan.scan import LENGTHS, RUN_OVERHEAD_SECONDS, extension_cost, scan_seconds_past_early_regime
from flopwise.scaling.fitting import law_from_records, split_early_regime
from flopwise.scaling.law import ScalingLaw
from flopwise.scaling.law_file import PlanningLaw
from flopwise.scaling.regime import MARGIN, STRIDE, WINDOW, early_regime_end, steepest_tokens
from flopwise.train.loss_curve import CurvePoint

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


@pytest.mark.slow
def test_the_law_spans_the_early_regime_with_a_warning_when_too_few_runs_remain():
    runs = [record(f"{d:g} {n:g}", n, d, 2e6, inflate=1.2 if d < 3e6 else 1.0)
            for n in (1e5, 3e5) for d in (5e5, 1e6, 4e6)]
    law = law_from_records(runs, samples=20)
    assert len(law.runs) == 6 and not law.early_left_out and len(law.early) == 4
    assert "4 of its 6 runs ended before" in law.describe() and "will be optimistic" in law.describe()


def test_a_scan_in_its_early_regime_says_how_long_a_scan_would_pilot_past_it():
    """Three sizes need their two longest lengths (2t and 4t) past the regime for six settled runs: the
    slowest size to get there sets t, and the scan's wall clock follows from t as design_scan lays it out."""
    speeds = {1e5: 20000.0, 3e5: 15000.0, 1e6: 9000.0}
    steepest = {1e5: 2.6e6, 3e5: 2.4e6, 1e6: 1.1e6}
    runs = [dict(record(f"{t}s {n:g}", n, speeds[n] * t, steepest[n]), tokens_per_second=speeds[n])
            for n in speeds for t in (60, 120, 240)]
    unit = max(MARGIN * steepest[n] / (2 * speeds[n]) for n in speeds)  # 3e5: 2.4e6 * 1.5 / 30000 = 120 s
    assert unit == pytest.approx(120.0)
    expected = 3 * (len(LENGTHS) * RUN_OVERHEAD_SECONDS + extension_cost(0.8) * unit) / 0.97
    assert scan_seconds_past_early_regime(runs) == pytest.approx(expected)
    two_sizes = [r for r in runs if r["non_embedding"] != 1e6]  # 4 runs at 2t and 4t are too few: t itself must pass
    assert scan_seconds_past_early_regime(two_sizes) == pytest.approx(
        2 * (len(LENGTHS) * RUN_OVERHEAD_SECONDS + extension_cost(0.8) * 2 * unit) / 0.97)
    assert scan_seconds_past_early_regime([dict(r, steepest_tokens=None) for r in runs]) is None


def test_a_scan_left_in_its_early_regime_says_what_would_pilot_past_it(tmp_path):
    """The advice names both ways out: a fresh scan of at least the computed budget, or --extend with the
    wall clock of one more length (2x the longest, from before its decay, for every size)."""
    from rich.console import Console

    from flopwise.cli.scan import advise_past_early_regime
    from flopwise.plan.scan import PilotSize, Scan, ScanDesign

    speeds = {1e5: 20000.0, 3e5: 15000.0, 1e6: 9000.0}
    design = ScanDesign([PilotSize(64 * k, int(n), speeds[n]) for k, n in enumerate(speeds, 1)], unit_seconds=60.0)
    scan = Scan(None, tmp_path / "scan", design, 0.0, Console())
    scan.records = [dict(record(f"{t}s {n:g}", n, speeds[n] * t, 2.4e6), tokens_per_second=speeds[n])
                    for n in speeds for t in (60, 120, 240)]
    console = Console(record=True, width=400)
    advise_past_early_regime(scan, console)
    text = console.export_text()
    needed = scan_seconds_past_early_regime(scan.records)  # 1e6 at 9000/s: 3.6M / (2 * 9000) = 200 s per unit
    assert needed == pytest.approx(3 * (len(LENGTHS) * RUN_OVERHEAD_SECONDS + extension_cost(0.8) * 200) / 0.97)
    assert f"--budget {math.ceil(needed / 60)}m" in text
    extension = 3 * ((2 - 0.8) * 240 + RUN_OVERHEAD_SECONDS) / 0.97
    assert f"flopwise scan --extend {tmp_path / 'scan'} --budget {math.ceil(extension / 60)}m" in text
    scan.design.unit_seconds = 200.0  # a scan that was long enough, yet early (skipped pilots): only --extend
    console = Console(record=True, width=400)
    advise_past_early_regime(scan, console)
    text = console.export_text()
    assert "needs at least" not in text and "--extend" in text
