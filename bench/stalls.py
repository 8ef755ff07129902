"""Real stalls inside a seconds budget: where does the decay land?

Each arm is a real `flopwise train --budget 30s` of the default tiny recipe in its own process.  The bench reads
its metrics.jsonl as it is written and, when the run reaches progress ``p``, freezes it with SIGSTOP for a few
seconds (SIGCONT after), as a busy shared machine does.  "busy" runs two CPU burners beside it throughout.
From each run's logged steps it reports what the issue asks of the schedule:

- ``early_low``: the share of the budget before p = 0.7 (after warmup) trained below half the peak learning rate;
- ``tail_below_half``: the share of the last fifth of the budget trained below half the peak (a full 1 - sqrt
  decay runs 75% of it there);
- ``final_lr``: the learning rate of the last step, over the peak; ``said``: the run recorded a cut-short decay
  (a ``decay`` event); ``overrun``: the budget spent past its end.

    python bench/stalls.py                           # this tree
    PYTHONPATH=/path/to/old/tree python bench/stalls.py --out bench/results/stalls_before.json

Prints the table and writes JSON (bench/results/stalls.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
ARMS = (("quiet", None, 0.0), ("quiet", 0.3, 8.0), ("quiet", 0.85, 5.0), ("busy", None, 0.0), ("busy", 0.3, 8.0),
        ("busy", 0.85, 5.0))


def train_events(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    events = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            break
    return events


def run_arm(budget: float, stall_at: float | None, stall: float, busy: bool, work: Path) -> dict:
    """One run, stalled once at progress ``stall_at`` for ``stall`` seconds; its measures."""
    out = work / "run"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if busy else 0)]
    command = [sys.executable, "-m", "flopwise", "train", "--model", "tiny", "--budget", f"{budget:g}s", "--out",
               str(out), "--set", "train.log_every=1", "--set", "train.eval_every=0", "--seed", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stalled_at = None
    try:
        while process.poll() is None:
            time.sleep(0.05)
            if stall_at is None or stalled_at is not None:
                continue
            events = [e for e in train_events(out / "metrics.jsonl") if e["event"] == "train"]
            if events and events[-1]["p"] >= stall_at:
                stalled_at = events[-1]["p"]
                process.send_signal(signal.SIGSTOP)
                time.sleep(stall)
                process.send_signal(signal.SIGCONT)
        output = process.stdout.read()
    finally:
        for burner in burners:
            burner.kill()
    if process.returncode != 0:
        raise SystemExit(f"the run failed:\n{output}")
    events = train_events(out / "metrics.jsonl")
    return measures([e for e in events if e["event"] == "train"], [e for e in events if e["event"] == "decay"],
                    stalled_at)


def measures(steps: list[dict], decay_events: list[dict], stalled_at: float | None) -> dict:
    """The schedule's measures over the logged steps (every step is logged)."""
    peak = max(e["lr"] for e in steps)
    early_low = tail_low = 0.0
    before = 0.0
    for event in steps:
        span = (before, event["p"])
        low = event["lr"] < 0.5 * peak
        if low and event["p_lr"] >= 0.02:
            early_low += max(0.0, min(span[1], 0.7) - span[0])
            tail_low += max(0.0, min(span[1], 1.0) - max(span[0], 0.8))
        before = event["p"]
    return {"stalled_at": stalled_at, "steps": len(steps), "early_low": early_low, "tail_below_half": tail_low / 0.2,
            "final_lr": steps[-1]["lr"] / peak, "said": bool(decay_events), "overrun": max(steps[-1]["p"] - 1.0, 0.0),
            "max_step_seconds": max(e["seconds"] - b["seconds"] for b, e in zip(steps, steps[1:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of each run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "stalls.json")
    args = parser.parse_args()
    rows = []
    for load, stall_at, stall in ARMS:
        with tempfile.TemporaryDirectory() as work:
            row = {"load": load, "stall_at": stall_at, "stall": stall,
                   **run_arm(args.budget, stall_at, stall, load == "busy", Path(work))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = Table(title=f"stalls in a {args.budget:g} s budget (code at {os.environ.get('PYTHONPATH') or 'this tree'})")
    for column in ("load", "stall", "steps", "early < half peak", "last fifth < half peak", "final lr", "said",
                   "overrun"):
        table.add_column(column)
    for row in rows:
        stall = f"{row['stall']:g}s at p={row['stalled_at']:.2f}" if row["stalled_at"] is not None else "none"
        table.add_row(row["load"], stall, str(row["steps"]), f"{100 * row['early_low']:.0f}%",
                      f"{100 * row['tail_below_half']:.0f}%", f"{row['final_lr']:.3f}", str(row["said"]),
                      f"{100 * row['overrun']:.1f}%")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budget": args.budget, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
