"""Task signal during training on the default corpus: does each built-in task's centered accuracy rise over
a run, does its interval exclude chance at the end, how monotone and how seed-stable is it (E2LM's questions),
and what does scoring the tasks cost.

Per seed, one run of the default recipe for ``--budget`` (training seconds) with ``train.eval_tasks =
["builtin"]`` and the default ``train.eval_every`` (0.25: evaluations at the first step, 0.25, 0.5, 0.75 and
the end) and ``train.task_examples``.  Each finished run is kept, so a rerun skips it.  The signal table
comes from flopwise's report (flopwise/report/tasks.py); the cost is the tasks' own seconds against the
whole run's wall clock (the training process from start to exit), and against its training seconds.

    python bench/tasks.py --budget 5m --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flopwise.report.runs import load_runs
from flopwise.report.tasks import task_signals
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-tasks"))


def train(out: Path, budget: str, seed: int, extra: list[str]) -> float:
    """One run through the CLI (skipped when finished before, its recorded wall clock reused); wall seconds."""
    wall_file = out / "bench-wall.json"
    if (out / "final").is_dir() and wall_file.is_file():
        return json.loads(wall_file.read_text())["wall"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flopwise", "train", "--budget", budget, "--seed", str(seed), "--out",
                    str(out), "--set", 'train.eval_tasks=["builtin"]', *extra], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    wall_file.write_text(json.dumps({"wall": wall}))
    return wall


def run_figures(out: Path, wall: float) -> dict[str, Any]:
    """Per task: the centered score at each mark; the cost of the tasks and their throughput at the end."""
    events = read_metrics(out / "metrics.jsonl")
    marks = [e for e in events if e["event"] == "tasks"]
    train_seconds = [e for e in events if e["event"] == "train"][-1]["seconds"]
    task_seconds = sum(e["eval_seconds"] for e in marks)
    tasks = {name: {"tokens": [e["tokens"] for e in marks],
                    "centered": [e["tasks"][name]["centered"] for e in marks],
                    "final": {k: marks[-1]["tasks"][name][k] for k in ("centered", "low", "high", "n")},
                    "examples_per_s": marks[-1]["tasks"][name]["examples_per_s"]}
             for name in marks[-1]["tasks"]}
    return {"wall": wall, "train_seconds": train_seconds, "task_seconds": task_seconds,
            "task_share_of_wall": task_seconds / wall, "task_share_of_training": task_seconds / train_seconds,
            "marks": len(marks), "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra --set overrides for every run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tasks.json")
    args = parser.parse_args()
    extra = [flag for value in args.set for flag in ("--set", value)]
    runs = {}
    for seed in args.seeds:
        out = WORK / f"{args.budget}-s{seed}"
        runs[seed] = run_figures(out, train(out, args.budget, seed, extra))
    folders = [WORK / f"{args.budget}-s{seed}" for seed in args.seeds]
    signals = task_signals(load_runs(folders))
    result = {"budget": args.budget, "seeds": args.seeds, "overrides": args.set, "runs": runs,
              "signal": [{"task": s.task, "spread": s.spread, "mean_rho": s.mean_rho,
                          "rho": [r.rho for r in s.runs]} for s in signals]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    show(result)


def show(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"built-in tasks over {result['budget']} runs (centered accuracy; 95% interval at the end)")
    for column in ("task", "seed", "at each mark", "rises", "final [95% CI]", "excludes 0", "Spearman ρ",
                   "examples/s"):
        table.add_column(column, justify="left" if column in ("task", "at each mark") else "right")
    rho = {s["task"]: dict(zip(result["seeds"], s["rho"])) for s in result["signal"]}
    for seed, run in result["runs"].items():
        for name, task in run["tasks"].items():
            final = task["final"]
            table.add_row(name, str(seed), " ".join(f"{c:+.2f}" for c in task["centered"]),
                          "yes" if task["centered"][-1] > task["centered"][0] else "no",
                          f"{final['centered']:+.3f} [{final['low']:+.3f}, {final['high']:+.3f}] n={final['n']}",
                          "yes" if final["low"] > 0 else "no",
                          "n/a" if rho[name].get(seed) is None else f"{rho[name][seed]:+.2f}",
                          f"{task['examples_per_s']:.0f}")
    console.print(table)
    spread = Table(title="across seeds")
    for column in ("task", "spread of the final score (std)", "mean ρ"):
        spread.add_column(column, justify="left" if column == "task" else "right")
    for s in result["signal"]:
        spread.add_row(s["task"], "n/a" if s["spread"] is None else f"{s['spread']:.3f}",
                       "n/a" if s["mean_rho"] is None else f"{s['mean_rho']:+.2f}")
    console.print(spread)
    cost = Table(title="cost of scoring the tasks during the run")
    for column in ("seed", "marks", "task seconds", "run wall seconds", "share of wall", "share of training s"):
        cost.add_column(column, justify="right")
    for seed, run in result["runs"].items():
        cost.add_row(str(seed), str(run["marks"]), f"{run['task_seconds']:.1f}", f"{run['wall']:.0f}",
                     f"{run['task_share_of_wall']:.1%}", f"{run['task_share_of_training']:.1%}")
    console.print(cost)


if __name__ == "__main__":
    main()
