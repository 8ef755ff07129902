"""``flopwise fit``: the scaling law L(N, D) fitted to finished runs, and how it is printed (also by
``flopwise scan``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.errors import FlopwiseError
from flopwise.rundir import check_output
from flopwise.scaling.law_file import PlanningLaw


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fit", help="fit the scaling law L(N, D) to finished runs",
                            description="Fit L(N, D) = E + A/N^alpha + B/D^beta to the final held-out losses of "
                                        "finished runs (or a scan's pilots), with bootstrap intervals.  Runs that "
                                        "end before their size's training curve has settled after its steepest "
                                        "fall follow a steeper law: they are left out when at least 6 others "
                                        "remain, else the output warns that the law will be optimistic.",
                            epilog="example:\n  flopwise fit runs/sweep-* --out law.json\n"
                                   "  flopwise plan --budget 20m --law law.json",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders and/or scan folders")
    p.add_argument("--out", type=Path, help="write the fitted law here (law.json) for plan --law")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default 200)")


def print_law(console: Console, law: PlanningLaw) -> None:
    from flopwise.scaling.law import parameter_intervals

    console.print(f"[bold]law[/bold]: {law.law.describe()}", highlight=False)
    if law.early:
        console.print(f"early regime: {law.early_regime_note()}", highlight=False)
    if law.bootstrap:
        table = Table(title=f"parameters: fit and 10-90% interval over {len(law.bootstrap)} bootstrap refits")
        for column in ("parameter", "fit", "low", "high"):
            table.add_column(column, justify="right")
        for name, (low, high) in parameter_intervals(law.bootstrap).items():
            table.add_row(name, f"{getattr(law.law, name):.4g}", f"{low:.4g}", f"{high:.4g}")
        console.print(table)
    if law.runs:
        table = Table(title="runs: final held-out loss against the law")
        for column in ("run", "N", "tokens", "loss", "law", "error"):
            table.add_column(column, justify="right")
        for run in law.runs:
            predicted = float(law.law.loss(run["non_embedding"], run["tokens"]))
            table.add_row(run["name"], f"{run['non_embedding'] / 1e6:.2f}M", f"{run['tokens'] / 1e6:.2f}M",
                          f"{run['val_loss']:.4f}", f"{predicted:.4f}",
                          f"{(predicted - run['val_loss']) / run['val_loss']:+.2%}")
        console.print(table)
    console.print(f"throughput: runs trained at {law.throughput_ratio:.3f}x the probe's tokens/s; early-forecast decay "
                  f"factor kappa {law.kappa.kappa_mean:.4f} +- {law.kappa.kappa_std:.4f} ({law.kappa.n_runs} runs)",
                  highlight=False)


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    from flopwise.scaling.fitting import collect_records, law_from_records

    if args.bootstrap < 1:
        raise FlopwiseError(f"--bootstrap {args.bootstrap} must be a positive number of refits, e.g. 200")
    check_output("--out", args.out, folder=False)
    law = law_from_records(collect_records(args.runs), samples=args.bootstrap)
    print_law(console, law)
    if args.out:
        law.save(args.out)
        console.print(f"written: {args.out} (use it with: flopwise plan --law {args.out})", highlight=False)
    return 0
