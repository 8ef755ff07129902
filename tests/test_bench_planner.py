"""bench/planner.py's refit: `flopwise fit` on the scan and the shorter budgets' runs, checked on the
longest budget's runs."""

import pytest

from flopwise.scaling.law import ScalingLaw
from tests.helpers import load_bench

LAW = ScalingLaw(E=2.0, A=400.0, B=2e4, alpha=0.5, beta=0.7, source="test")


def run(name: str, n: float, d: float, steepest: float, inflate: float = 1.0) -> dict:
    return {"name": name, "non_embedding": n, "tokens": d, "val_loss": float(LAW.loss(n, d)) * inflate,
            "steepest_tokens": steepest, "tokens_per_second": 1.0}


@pytest.mark.slow
def test_refit_leaves_out_early_pilots_and_predicts_the_longest_budget():
    sizes = (1e5, 3e5, 1e6)
    # every size's curve fell fastest at 2M tokens: the 1M-token pilots (20% above the law) are early
    records = [run(f"p{n:g}-{d}", n, d * 1e6, 2e6, 1.2 if d == 1 else 1.0) for n in sizes for d in (1, 4)]
    records += [run(f"{b}-{n:g}", n, d * 1e6, 2e6) for n in sizes for b, d in (("5m", 5), ("10m", 10))]
    held_out = {label: run(label, n, 20e6, 2e6) for label, n in zip(("planned", "half N", "double N"), sizes)}
    refitted = load_bench("planner").check_refit(records, held_out, "20m")
    assert sorted(refitted["left_out"]) == sorted(f"p{n:g}-1" for n in sizes)
    assert len(refitted["fitted_on"]) == 9
    assert refitted["errors"] == pytest.approx({"planned": 0, "half N": 0, "double N": 0}, abs=5e-3)
