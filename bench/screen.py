"""The screening harness of bench/progressive.py and bench/recipe_screen.py: each variant trains at one seconds
budget with the bench's run settings (flopwise/benchmark.py) on the default recipe plus its overrides, every
process pinned to one core with one thread, two at a time on this 2-core machine, seeds and variants
interleaved so drift spreads over all of them.  Prints the table (mean final held-out loss over seeds, and
each variant's difference from the one named "default") and writes JSON."""

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


def train(name: str, overrides_of: list[str], seed: int, seconds: float, cores: str, work: Path,
          extra: list[str]) -> dict:
    overrides = {**RUN_SETTINGS, "train.seed": seed, "budget.seconds": seconds}
    args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    args += [arg for value in overrides_of + extra for arg in ("--set", value)]
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


def main(variants: dict[str, list[str]], doc: str, default_out: Path, title: str, seconds: float = 60.0) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--append", action="store_true", help="add to --out's runs instead of replacing them")
    parser.add_argument("--cores", nargs="+", default=["0", "1"], help="one worker per entry, pinned to it")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config for every variant (e.g. data.sources=...)")
    parser.add_argument("--out", type=Path, default=default_out)
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
            row = train(name, variants[name], seed, args.seconds, cores, work, args.overrides)
            with lock:
                results.append(row)
                console.print(f"{name} seed {seed}: {row['val_loss']:.4f} ({row['steps']} steps, "
                              f"{row['tokens']:,.0f} tokens)", highlight=False)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"seconds": args.seconds, "overrides": args.overrides,
                                                "cores": args.cores, "runs": results}, indent=1))

    with tempfile.TemporaryDirectory(prefix="flopwise-screen-") as tmp:
        threads = [threading.Thread(target=worker, args=(cores, Path(tmp))) for cores in args.cores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    table = Table(title=f"{title} at {args.seconds:g}s, seeds {args.seeds}, one core per run")
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

