"""``flopwise bench``: the time-to-quality benchmark of the default recipe against the baseline."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.errors import FlopwiseError
from flopwise.rundir import check_output

EPILOG = """\
method (AlgoPerf-style time-to-result): the baseline recipe (nanoGPT's GPT-2 setup) trains for
--seconds T; its final held-out loss is the target. The default recipe then trains with T/3,
T/4, ... (or T/2), each a budgeted run that ends annealed; speedup = T / the smallest budget
that reached the target. Seeds alternate baseline and candidate so machine drift cancels.

examples:
  flopwise bench --quick                              # smoke test, under 2 minutes
  flopwise bench                                      # T = 3 minutes, seeds 0 1 2, built-in corpus
  flopwise bench --corpus /usr/lib/node_modules --include '*.js' --out bench/results/speed_js.json
  flopwise bench --start 6                            # a recipe expected near 6x: skip T/3 to T/5
  flopwise bench --seeds 0 --ablate                   # also change each piece of the recipe in turn
  flopwise bench --seeds 0 --ablate speed             # each speed piece alone, and removed from the recipe
  flopwise bench --ablate progressive                 # growth, sequence and batch schedules alone and together
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="time-to-quality of the default recipe against a baseline",
                            description="Measure how much less budget flopwise's default recipe needs to reach "
                                        "the baseline recipe's held-out loss.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=180.0, help="baseline budget T in seconds (default 180)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--corpus", action="append", metavar="PATH", help="text folder or file (default: stdlib)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching, e.g. '*.md'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config change for both recipes (e.g. model.size=tiny); repeatable")
    p.add_argument("--ablate", nargs="?", const="all", choices=("all", "recipe", "speed", "progressive"),
                   help="also run ablations against each seed's target: each piece of the recipe changed, "
                        "the speed pieces (value embeddings, NorMuon, ...) each alone and removed, "
                        "progressive training's pieces alone and together, or all (the default)")
    p.add_argument("--start", type=int, default=3, metavar="D",
                   help="the first seed's search starts at T/D (default 3); later seeds start at the previous answer")
    p.add_argument("--quick", action="store_true", help="T = 30 s, one seed, tiny model: a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench/results/speed.json"), help="JSON results file")


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from flopwise.benchmark import DIVISORS, TimeToQuality, ablate, summarize

    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise FlopwiseError(f"--seconds {args.seconds:g} must be a positive number of seconds, e.g. 180")
    if args.start not in DIVISORS:
        raise FlopwiseError(f"--start {args.start} is not a budget the search tries: choose one of "
                            f"{', '.join(map(str, DIVISORS))}")
    check_output("--out", args.out, folder=False)  # before the first of many minutes of training
    overrides = list(args.overrides)
    if args.include:
        overrides.append(f"data.include={json.dumps(args.include)}")
    seconds, seeds = args.seconds, tuple(args.seeds)
    if args.quick:
        seconds, seeds = 30.0, seeds[:1]
        overrides = ["model.size=tiny", *overrides]
    bench = TimeToQuality(seconds=seconds, seeds=seeds, start=args.start, sources=args.corpus or ["stdlib"],
                          baseline_overrides=overrides, candidate_overrides=overrides)
    report = lambda line: console.print(line, highlight=False)  # noqa: E731
    results = bench.run(report)
    summary = summarize(results)
    summary.update(seconds=seconds, corpus=bench.sources, overrides=overrides)
    console.print(_seed_table(summary))
    if args.ablate:
        summary["ablations"] = ablate(bench, results, report, args.ablate)
        console.print(_ablation_table(summary["ablations"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    console.print(f"median speedup {summary['median_speedup']:g}x (seeds: "
                  f"{', '.join(f'{s:g}x' for s in summary['speedups'])}); written: {args.out}", highlight=False)
    return 0


def _seed_table(summary: dict) -> Table:
    table = Table(title=f"time to the baseline's held-out loss at T = {summary['seconds']:g}s")
    for column in ("seed", "baseline loss at T (target)", "default recipe: loss at budget", "speedup",
                   "interpolated"):
        table.add_column(column, justify="right")
    for seed in summary["seeds"]:
        tried = ", ".join(f"T/{summary['seconds'] / c['seconds_budget']:.0f}: {c['val_loss']:.3f}"
                          for c in sorted(seed["candidates"], key=lambda c: -c["seconds_budget"]))
        table.add_row(str(seed["seed"]), f"{seed['target']:.4f}", tried, f"{seed['speedup']:g}x",
                      _maybe(seed["interpolated_speedup"]))
    return table


def _ablation_table(rows: list[dict]) -> Table:
    table = Table(title="ablations (one change each, against each seed's target)")
    for column in ("variant", "seed", "loss at budget", "speedup", "interpolated"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for row in rows:
        tried = ", ".join(f"{c['seconds_budget']:.0f}s: {c['val_loss']:.3f}" for c in row["candidates"])
        table.add_row(row["variant"], str(row["seed"]), tried, f"{row['speedup']:g}x", _maybe(row["interpolated_speedup"]))
    return table


def _maybe(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"
