"""How far the recipe's learning rates and batch size are from the best, at several budgets.

For one family member (d_model 96 by default, what the planner picks for 5- and 10-minute budgets
on this machine) and each budget, `flopwise train` runs with both learning rates (optim.lr for the
AdamW groups, optim.muon_lr for the matrices) scaled by each multiplier, and, at the first budget,
with each batch size at the recipe's learning rates.  The table gives the final held-out loss; per
budget, the multiplier at the vertex of a parabola through log-multiplier and loss says where the
optimum sits.  If it moves with the budget, the Power scheduler's power law in tokens (Shen et al.
2024) is the rule to fit; if it stays, the recipe's rates hold across these budgets.

Runs go one at a time (two would share 2 cores); results go to bench/results/lr_batch.json, and
runs already recorded there are not rerun.

    python bench/lr_batch.py --budgets 150s --lr 0.5,0.7,1,1.4 --batch 4,8,16
    python bench/lr_batch.py --budgets 600s --lr 0.7,1,1.4 --batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from flopwise.config import RunConfig
from flopwise.rundir import read_metrics
from flopwise.scaling.shapes import family_fields

RESULTS = Path(__file__).parent / "results" / "lr_batch.json"


def final_loss(run: Path) -> tuple[float, float]:
    """Final held-out loss and tokens of a finished run."""
    final = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval" and e["p"] >= 1.0][-1]
    return final["val_loss"], final["tokens"]


def train(budget: str, d_model: int, lr_mult: float, batch: int, work: Path) -> dict[str, Any]:
    recipe = RunConfig().optim
    out = work / f"d{d_model}-{budget}-lr{lr_mult:g}-b{batch}"
    if not (out / "final").is_dir():
        settings = {**{f"model.{k}": v for k, v in family_fields(d_model).items() if v is not None},
                    "optim.lr": recipe.lr * lr_mult, "optim.muon_lr": recipe.muon_lr * lr_mult,
                    "optim.batch_size": batch, "train.checkpoint_every": 0.0}
        overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
        subprocess.run([sys.executable, "-m", "flopwise", "train", "--budget", budget, "--out", str(out), *overrides],
                       check=True, env={"FLOPWISE_CACHE": str(work / "cache"), **os.environ})
    loss, tokens = final_loss(out)
    return {"budget": budget, "d_model": d_model, "lr_mult": lr_mult, "batch": batch, "val_loss": loss,
            "tokens": tokens, "run": str(out)}


def vertex(rows: list[dict[str, Any]]) -> float | None:
    """The multiplier at the minimum of a parabola in log multiplier through the rows' losses; None
    when fewer than three multipliers ran or the parabola opens downward."""
    if len({r["lr_mult"] for r in rows}) < 3:
        return None
    a, b, _ = np.polyfit([math.log(r["lr_mult"]) for r in rows], [r["val_loss"] for r in rows], 2)
    return math.exp(-b / (2 * a)) if a > 0 else None


def report(rows: list[dict[str, Any]], batch: int) -> dict[str, float | None]:
    table = Table(title="final held-out loss by learning-rate multiplier and batch size")
    for column in ("budget", "d_model", "lr x", "batch", "tokens", "loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["budget"], str(r["d_model"]), f"{r['lr_mult']:g}", str(r["batch"]),
                      f"{r['tokens'] / 1e6:.2f}M", f"{r['val_loss']:.4f}")
    console = Console()
    console.print(table)
    optima = {}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        optima[budget] = vertex([r for r in rows if r["budget"] == budget and r["batch"] == batch])
        shown = f"{optima[budget]:.2f}" if optima[budget] else "not bracketed"
        console.print(f"{budget}: best learning-rate multiplier (parabola vertex) {shown}", highlight=False)
    return optima


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="150s,600s")
    parser.add_argument("--d-model", type=int, default=96)
    parser.add_argument("--lr", default="0.5,0.7,1,1.4", help="multipliers of both learning rates")
    parser.add_argument("--batch", default="4,8,16", help="batch sizes, at the first budget and the recipe's rates")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flopwise-lr-batch-bench"))
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    recipe_batch = RunConfig().optim.batch_size
    grid = [(b, float(m), recipe_batch) for b in budgets for m in args.lr.split(",")]
    grid += [(budgets[0], 1.0, int(n)) for n in args.batch.split(",") if int(n) != recipe_batch]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    for budget, lr_mult, batch in grid:
        done = [r for r in results["runs"] if (r["budget"], r["d_model"], r["lr_mult"], r["batch"])
                == (budget, args.d_model, lr_mult, batch)]
        if not done:
            results["runs"].append(train(budget, args.d_model, lr_mult, batch, args.work))
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
    results["best_lr_mult"] = report(results["runs"], recipe_batch)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
