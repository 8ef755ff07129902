"""Screening progressive training's settings (depth growth, sequence-length and batch schedules) at one
seconds budget: each variant trains with the bench's run settings (flopwise/benchmark.py) on the default
recipe plus its overrides, every process pinned to one core with one thread, two at a time on this 2-core
machine, seeds and variants interleaved so drift spreads over all of them.  Prints the table (mean final
held-out loss over seeds, and each variant's difference from the default) and writes JSON.

    python bench/progressive.py --seconds 60 --seeds 0 1 --out bench/results/progressive_screen.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.benchmark import RUN_SETTINGS
from flopwise.rundir import read_metrics
from pinning import pinned

HERE = Path(__file__).parent
GROW, SEQ, BATCH = "methods.use=[\"grow_depth\"]", "methods.use=[\"seq_schedule\"]", "methods.use=[\"batch_schedule\"]"
VARIANTS: dict[str, list[str]] = {
    "default": ["methods.progressive=false"],  # the recipe before progressive training
    "grow g2 at 0.25": [GROW, "methods.grow_depth.at=0.25"],
    "grow g2 at 0.5": [GROW, "methods.grow_depth.at=0.5"],
    "grow g4 at 0.25": [GROW, "methods.grow_depth.factor=4", "methods.grow_depth.at=0.25"],
    "seq 1/4 until 0.5": [SEQ, "methods.seq_schedule.start=0.25", "methods.seq_schedule.until=0.5"],
    "seq 1/4 until 0.25": [SEQ, "methods.seq_schedule.start=0.25", "methods.seq_schedule.until=0.25"],
    "seq 1/8 until 0.5": [SEQ, "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "batch 1/4 until 0.5 sqrt": [BATCH, "methods.batch_schedule.start=0.25", "methods.batch_schedule.until=0.5"],
    "batch 1/4 until 0.5 none": [BATCH, "methods.batch_schedule.start=0.25", "methods.batch_schedule.until=0.5",
                                 "methods.batch_schedule.lr_scaling=none"],
    "batch 1/2 until 0.25 sqrt": [BATCH, "methods.batch_schedule.start=0.5", "methods.batch_schedule.until=0.25"],
    "grow g2 at 0.75": [GROW, "methods.grow_depth.at=0.75"],
    "seq 1/8 until 0.75": [SEQ, "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.75"],
    "seq 1/16 until 0.5": [SEQ, "methods.seq_schedule.start=0.0625", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.5 + seq 1/8 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.5",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.75 + seq 1/16 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.75",
        "methods.seq_schedule.start=0.0625", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.75 + seq 1/8 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.75",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.5 + seq 1/8 until 0.5 + batch 1/2 until 0.25": [
        'methods.use=["grow_depth","seq_schedule","batch_schedule"]', "methods.grow_depth.at=0.5",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5",
        "methods.batch_schedule.start=0.5", "methods.batch_schedule.until=0.25"],
}


def train(name: str, seed: int, seconds: float, cores: str, work: Path, extra: list[str]) -> dict:
    overrides = {**RUN_SETTINGS, "train.seed": seed, "budget.seconds": seconds}
    args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    args += [arg for value in VARIANTS[name] + extra for arg in ("--set", value)]
    run = work / f"{name.replace(' ', '_').replace('/', 'of')}-{seed}"
    prefix, env = pinned(cores)
    done = subprocess.run([*prefix, sys.executable, "-m", "flopwise", "train", *args, "--out", str(run)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} seed {seed}: {done.stderr[-2000:]}")
    events = read_metrics(run / "metrics.jsonl")
    final = [e for e in events if e["event"] == "eval"][-1]
    return {"variant": name, "seed": seed, "val_loss": final["val_loss"], "steps": final["step"],
            "tokens": final["tokens"], "flops": final["flops"], "seconds": final["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--append", action="store_true", help="add to --out's runs instead of replacing them")
    parser.add_argument("--cores", nargs="+", default=["0", "1"], help="one worker per entry, pinned to it")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config for every variant (e.g. data.sources=...)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "progressive_screen.json")
    args = parser.parse_args()
    jobs: queue.Queue = queue.Queue()
    for seed in args.seeds:
        for name in args.variants:
            jobs.put((name, seed))
    results: list[dict] = json.loads(args.out.read_text())["runs"] if args.append and args.out.is_file() else []
    lock = threading.Lock()
    console = Console()

    def worker(cores: str, work: Path) -> None:
        while True:
            try:
                name, seed = jobs.get_nowait()
            except queue.Empty:
                return
            row = train(name, seed, args.seconds, cores, work, args.overrides)
            with lock:
                results.append(row)
                console.print(f"{name} seed {seed}: {row['val_loss']:.4f} ({row['steps']} steps, "
                              f"{row['tokens']:,.0f} tokens)", highlight=False)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"seconds": args.seconds, "overrides": args.overrides,
                                                "cores": args.cores, "runs": results}, indent=1))

    with tempfile.TemporaryDirectory(prefix="flopwise-progressive-") as tmp:
        threads = [threading.Thread(target=worker, args=(cores, Path(tmp))) for cores in args.cores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    table = Table(title=f"progressive settings at {args.seconds:g}s, seeds {args.seeds}, one core per run")
    for column in ("variant", "held-out loss (mean)", "vs default", "tokens (mean)", "per seed"):
        table.add_column(column, justify="right")
    by_variant = {name: [r for r in results if r["variant"] == name] for name in args.variants}
    reference = statistics.mean(r["val_loss"] for r in by_variant.get("default", [])) if "default" in by_variant else None
    for name, rows in by_variant.items():
        loss = statistics.mean(r["val_loss"] for r in rows)
        delta = f"{loss - reference:+.4f}" if reference is not None else "-"
        table.add_row(name, f"{loss:.4f}", delta, f"{statistics.mean(r['tokens'] for r in rows):,.0f}",
                      ", ".join(f"{r['val_loss']:.3f}" for r in sorted(rows, key=lambda r: r["seed"])))
    console.print(table)
    console.print(f"written: {args.out}", highlight=False)


if __name__ == "__main__":
    main()
