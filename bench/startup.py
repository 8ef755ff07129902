"""The wall clock outside training: `flopwise train --budget 12s` (and 60s) on the built-in corpus, each budget run
twice in a row (the first fills the token cache and the source index where they are empty, the second starts
cached), measured from outside (the command's wall clock, launch to exit) and from the run's own ``wall`` event
of metrics.jsonl (flopwise/wallclock.py): imports (to the session), data, model, time to the first step,
training, evaluation, checkpoints, the final model, and what the process took after its last line (its exit).

torch's own start-up is measured beside it in fresh processes: ``import torch``, and that plus the first
optimizer (torch.optim imports torch._dynamo at its first optimizer, whatever flopwise does).  Prints a table and
writes bench/results/startup.json.  Wall clock depends on the machine and its load: compare rows of one run only.

    python bench/startup.py                      # 12s and 60s, a fresh cache (its first run tokenizes)
    python bench/startup.py --budgets 12 --cache ~/.cache/flopwise   # an existing cache
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
ROOT = HERE.parent
TORCH_ONLY = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
TORCH_AND_OPTIMIZER = ("import time; t = time.perf_counter(); import torch; "
                       "torch.optim.AdamW([torch.zeros(1, requires_grad=True)]); print(time.perf_counter() - t)")
PARTS = ("imports", "data", "build", "startup", "training", "evaluation", "final_evaluation", "checkpoints",
         "final_model", "other")
ROWS = ("imports", "data", "build", "startup", "training", "in_run_evaluation", "final_evaluation", "checkpoints",
        "final_model", "other", "exit", "command_wall", "beyond_budget")


def python_seconds(code: str, env: dict[str, str]) -> float:
    """What ``code`` prints: seconds measured inside a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def train_once(budget: int, out: Path, env: dict[str, str], extra: list[str]) -> dict[str, float]:
    """One `flopwise train` run: the run's own wall event, the command's wall clock and the time after its last
    line was written (the exit)."""
    command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{budget}s", "--out", str(out), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_line_at, lines = started, []
    for line in process.stdout:
        last_line_at = time.perf_counter()
        lines.append(line.rstrip())
    if process.wait() != 0:
        raise SystemExit(f"flopwise train --budget {budget}s failed:\n" + "\n".join(lines[-20:]))
    ended = time.perf_counter()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    [wall] = [event for event in events if event["event"] == "wall"]
    data_line = next(line for line in lines if line.startswith("data:"))
    return {**{name: wall[name] for name in PARTS}, "in_run_evaluation": wall["evaluation"] - wall["final_evaluation"],
            "run_total": wall["total"], "command_wall": ended - started,
            "exit": ended - last_line_at, "beyond_budget": ended - started - budget,
            "cached": "(cached," in data_line, "steps": wall["step"],
            "final_loss": next(e["val_loss"] for e in reversed(events) if e["event"] == "eval")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[12, 60], help="seconds budgets to run")
    parser.add_argument("--cache", type=Path, help="the token cache to use (default: a fresh one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to each run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "startup.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flopwise-startup-"))
    cache = args.cache or work / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLOPWISE_CACHE=str(cache))
    extra = [flag for value in args.set for flag in ("--set", value)]
    load_before = os.getloadavg()
    torch_seconds = {"import_torch": python_seconds(TORCH_ONLY, env),
                     "import_torch_and_first_optimizer": python_seconds(TORCH_AND_OPTIMIZER, env)}
    rows = []
    for budget in args.budgets:
        for attempt in (1, 2):
            result = train_once(budget, work / f"run-{budget}s-{attempt}", env, extra)
            rows.append({"budget": budget, "attempt": attempt, **result})
            print(f"{budget}s #{attempt}: {result['command_wall']:.1f}s wall, {result['beyond_budget']:.1f}s beyond "
                  "the budget", flush=True)
    table = Table(title=f"seconds outside training (import torch {torch_seconds['import_torch']:.2f}s; with its "
                        f"first optimizer {torch_seconds['import_torch_and_first_optimizer']:.2f}s)")
    table.add_column("")
    for row in rows:
        table.add_column(f"{row['budget']}s #{row['attempt']}" + ("" if row["cached"] else " (tokenized)"),
                         justify="right")
    for name in ROWS:
        table.add_row(name, *(f"{row[name]:.2f}" for row in rows))
    table.add_row("in-run eval / training", *(f"{row['in_run_evaluation'] / row['training']:.1%}" for row in rows))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "torch": torch_seconds, "runs": rows,
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
