"""Depth growth that keeps the function against G_stack's plain copy, at normal speed and with the steps after
the growth cut to a few (what a slowed-down run leaves them).

Each run is the default recipe (depth growth, sequence and batch schedules) on a small model, with a step
budget, so that a busy machine changes nothing but the time the bench takes.  "normal" grows at the default
point; "cut" grows at ``--cut-at``, which leaves a few steps after the growth.  Reported per arm, as the mean
over seeds: the final held-out loss, the training loss over the five steps before the growth and the last five,
and how many runs ended worse than they were at their growth point.

    python bench/growth.py --seeds 0 1 2

Prints the table and writes JSON (bench/results/growth.json by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
MODEL = ["model.size=tiny", "model.n_layers=4", "model.seq_len=64", "optim.batch_size=8", "train.eval_tokens=16384",
         "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1"]


def run(work: Path, seed: int, preserving: bool, at: float, steps: int) -> dict:
    name = f"{'preserving' if preserving else 'plain'}-{at}-{seed}"
    sets = [*MODEL, f"methods.grow_depth.function_preserving={str(preserving).lower()}", f"methods.grow_depth.at={at}"]
    command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{steps}steps", "--seed", str(seed),
               "--tokenizer", "byte", "--out", str(work / name), *[flag for s in sets for flag in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    events = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    grown = next(i for i, e in enumerate(train) if e["depth"] == 4)
    before = statistics.mean(e["loss"] for e in train[max(grown - 5, 0):grown])
    return {"seed": seed, "preserving": preserving, "at": at, "steps_after_growth": len(train) - grown,
            "val_loss": [e for e in events if e["event"] == "eval"][-1]["val_loss"], "loss_before_growth": before,
            "loss_at_growth_step": train[grown]["loss"], "loss_last": statistics.mean(e["loss"] for e in train[-5:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--at", type=float, default=0.75, help="the growth point at normal speed")
    parser.add_argument("--cut-at", type=float, default=0.97, help="the growth point that leaves a few steps")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "growth.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for at in (args.at, args.cut_at):
                for preserving in (False, True):  # arms alternate within each seed
                    rows.append(run(Path(work), seed, preserving, at, args.steps))
                    print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"depth growth x2 of a 4-layer model, {args.steps} steps, seeds {args.seeds}")
    for column in ("growth", "init", "steps after", "final val loss", "train loss before growth",
                   "train loss at growth step", "train loss last 5", "ended worse than at growth"):
        table.add_column(column)
    summary = []
    for at in (args.at, args.cut_at):
        for preserving in (False, True):
            arm = [r for r in rows if r["at"] == at and r["preserving"] == preserving]
            mean = {key: statistics.mean(r[key] for r in arm) for key in
                    ("val_loss", "loss_before_growth", "loss_at_growth_step", "loss_last", "steps_after_growth")}
            worse = sum(r["loss_last"] > r["loss_before_growth"] for r in arm)
            summary.append({"at": at, "preserving": preserving, **mean, "ended_worse": worse, "runs": len(arm)})
            table.add_row(f"at {at}" + (" (cut)" if at == args.cut_at else ""),
                          "function-preserving" if preserving else "plain copy", f"{mean['steps_after_growth']:.0f}",
                          f"{mean['val_loss']:.4f}", f"{mean['loss_before_growth']:.4f}",
                          f"{mean['loss_at_growth_step']:.4f}", f"{mean['loss_last']:.4f}", f"{worse}/{len(arm)}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "summary": summary, "runs": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
