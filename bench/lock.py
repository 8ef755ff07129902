"""How soon a run on a held `--out` is refused: the wall clock from the command to its exit.

A real run holds the folder (`flopwise train --budget 120s`, started first and waited for until its lock file
names it); each repeat then times `python -m flopwise train --out HELD ...` against a bare `python -c pass`,
alternating, and checks the refusal (exit 2, one line).  Run it on another tree with PYTHONPATH to compare.

    python bench/lock.py --repeats 5

Prints the table and writes JSON (bench/results/lock.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lock.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        held = Path(work) / "held"
        holder = subprocess.Popen([sys.executable, "-m", "flopwise", "train", "--model", "tiny", "--tokenizer", "byte",
                                   "--budget", "120s", "--out", str(held)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (held / ".lock").is_file() or str(holder.pid) not in (held / ".lock").read_text():
                if holder.poll() is not None:
                    raise SystemExit("the holding run ended before it held its folder")
                time.sleep(0.05)
            refusals, bare = [], []
            for _ in range(args.repeats):
                seconds, done = timed([sys.executable, "-m", "flopwise", "train", "--model", "tiny", "--budget",
                                       "4steps", "--out", str(held)])
                lines = done.stderr.strip().splitlines()
                if done.returncode != 2 or len(lines) != 1 or "in use" not in lines[0]:
                    raise SystemExit(f"not refused in one line: exit {done.returncode}\n{done.stderr}")
                refusals.append(seconds)
                bare.append(timed([sys.executable, "-c", "pass"])[0])
        finally:
            holder.kill()
            holder.wait()
    row = {"code": os.environ.get("PYTHONPATH") or "this tree", "refusal_median": statistics.median(refusals),
           "refusal_max": max(refusals), "bare_python_median": statistics.median(bare), "refusals": refusals,
           "line": lines[0]}
    table = Table(title=f"refusal of a run on a held --out ({args.repeats} repeats)")
    for column in ("code", "refusal median", "refusal max", "bare python median"):
        table.add_column(column)
    table.add_row(row["code"], f"{row['refusal_median']:.2f} s", f"{row['refusal_max']:.2f} s",
                  f"{row['bare_python_median']:.2f} s")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
