"""Distillation's weight at a fixed step budget: a larger teacher is trained first, then students of one shape
train for the same steps with methods.distill.weight 0 (plain), 0.5 (Hinton-style mix) and 1.0 (Minitron's
KL only, the default); the table compares their final held-out loss (load-independent: steps, not seconds).
Prints the table and writes bench/results/distill_weight.json.

    python bench/distill_weight.py --teacher-steps 80 --steps 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.cli import main as flopwise
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
COMMON = ["--tokenizer", "byte", "--set", "model.seq_len=64", "--set", "optim.batch_size=8",
          "--set", "train.eval_tokens=8192", "--set", "methods.progressive=false", "--set", "model.n_layers=2"]


def final_loss(run: Path) -> float:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"][-1]["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=80)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        assert flopwise(["train", *COMMON, "--set", "model.d_model=128", "--budget", f"{args.teacher_steps}steps",
                         "--out", str(teacher)]) == 0
        rows.append({"run": f"teacher (d_model 128, {args.teacher_steps} steps)", "val_loss": final_loss(teacher)})
        for weight in args.weights:
            out = Path(tmp) / f"w{weight}"
            taught = ([] if weight == 0 else
                      ["--distill-from", str(teacher), "--set", f"methods.distill.weight={weight}"])
            assert flopwise(["train", *COMMON, "--set", "model.d_model=64", *taught, "--budget", f"{args.steps}steps",
                             "--out", str(out)]) == 0
            rows.append({"run": f"student d_model 64, weight {weight}", "val_loss": final_loss(out)})
    table = Table(title=f"distill weight at {args.steps} steps (stdlib corpus, byte tokens)")
    table.add_column("run")
    table.add_column("held-out loss", justify="right")
    for row in rows:
        table.add_row(row["run"], f"{row['val_loss']:.4f}")
    Console().print(table)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "distill_weight.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
