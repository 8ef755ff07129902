"""bench/planner.py's late fit: the law from the longest pilots and the shorter budgets' runs."""

import importlib.util
from pathlib import Path

import pytest

from flopwise.plan.scaling import ScalingLaw

LAW = ScalingLaw(E=2.0, A=400.0, B=2e4, alpha=0.5, beta=0.7, source="test")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_planner", Path(__file__).parents[1] / "bench" / "planner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(n: float, d: float, **extra) -> dict:
    return {"non_embedding": n, "tokens": d, "val_loss": float(LAW.loss(n, d)), **extra}


def test_late_fit_leaves_out_short_pilots_and_the_longest_budget():
    sizes = (1e5, 3e5, 1e6)
    pilots = [run(n, d * 1e6, seconds_budget=s) for n in sizes for d, s in ((1, 60.0), (3, 240.0))]
    pilots = [dict(p, val_loss=p["val_loss"] * (1.2 if p["seconds_budget"] == 60 else 1)) for p in pilots]
    budgets = {b: {"runs": {label: run(n, d * 1e6) for label, n in zip(("planned", "half N", "double N"), sizes)}}
               for b, d in (("5m", 5), ("10m", 10), ("20m", 20))}
    late = load_bench().late_fit({"scan": {"pilots": {"pilots": pilots}}, "budgets": budgets})
    assert late["budget"] == "20m" and late["fitted_on"] == 3 + 6  # the 240 s pilots, the 5m and 10m runs
    assert late["errors"] == pytest.approx({"planned": 0, "half N": 0, "double N": 0}, abs=5e-3)
