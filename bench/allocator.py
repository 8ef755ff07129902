"""CPU step time with glibc's default allocator behaviour vs flopwise's default (keep freed memory).

Each arm runs in its own process (the setting is process-wide), alternating so machine drift
cancels; prints the table and writes bench/results/allocator.json.

    python bench/allocator.py --size small --repeats 2
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


def throughput(size: str, keep_freed: bool, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, str(HERE / "throughput.py"), "--sizes", size, "--steps", str(steps),
                        "--set", f"train.cpu_keep_freed_memory={str(keep_freed).lower()}", "--out", str(out)],
                       check=True, capture_output=True)
        return json.loads(out.read_text())["rows"][0]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"glibc default": [], "keep freed (flopwise default)": []}
    for _ in range(args.repeats):
        runs["glibc default"].append(throughput(args.size, False, args.steps))
        runs["keep freed (flopwise default)"].append(throughput(args.size, True, args.steps))
    baseline = statistics.median(runs["glibc default"])
    table = Table(title=f"CPU allocator, model size '{args.size}'")
    for column in ("allocator", "tokens/s (median)", "runs", "speedup"):
        table.add_column(column, justify="right")
    for name, values in runs.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:,.0f}", ", ".join(f"{v:,.0f}" for v in values), f"{median / baseline:.2f}x")
    Console(width=120).print(table)
    out = HERE / "results" / "allocator.json"
    out.write_text(json.dumps({"size": args.size, "tokens_per_s": runs}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
