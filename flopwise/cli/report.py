"""``flopwise report``: argument parsing and the terminal output.

Kept apart from flopwise.report itself so the CLI can register it without importing matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from flopwise.report.runs import Run
from flopwise.rundir import check_output

DEFAULT_OUT = Path("report")

REPORT_EPILOG = """\
writes to --out (default: ./report, created if needed; files of an earlier report there are replaced):
  report.html          the table and all plots in one self-contained page (open it in any browser)
  *.png                held-out loss vs FLOPs, training seconds and tokens; learning rate and
                       tokens/s vs budget progress p; one line per run
  report.json          each run's final figures and the series behind every plot

examples:
  flopwise report runs/a runs/b                     # compare two runs, write ./report/
  flopwise report runs/* --out reports/lr-sweep     # every run in runs/
"""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``report`` to the CLI's subcommands."""
    p = commands.add_parser("report", help="compare runs: table, plots, one HTML page",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPORT_EPILOG,
                            description="Compare runs (finished or not): a table of final held-out loss, size, "
                                        "spend and speed, and plots of their curves, as PNGs, report.json and "
                                        "one self-contained report.html. Needs no torch and no GPU.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folder (the --out of `flopwise train`)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for the report (default: ./{DEFAULT_OUT})")


def rich_table(runs: list[Run]) -> Table:
    """The comparison table for the terminal (same cells as the HTML page)."""
    from flopwise.report.table import final_table

    data = final_table(runs)
    table = Table(title="runs")
    for header, numeric in zip(data.headers, data.numeric):
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for run, row in zip(runs, data.rows):
        table.add_row(*row, style=None if run.finished else "yellow")
    return table


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Read the runs, write the report, print the table and the paths written."""
    from flopwise.report import JSON_FILE, load_runs, write_runs_report
    from flopwise.report.series import PLOTS

    runs = load_runs(args.runs)
    check_output("--out", args.out, folder=True)
    html_path = write_runs_report(runs, args.out)
    table = rich_table(runs)
    # never cut a number short: if even wrapped headers do not fit the terminal, print the table
    # at its natural width (one line per run) and let the terminal wrap those lines
    natural = Measurement.get(console, console.options.update_width(10_000), table)
    if natural.minimum > console.width:
        table.width = natural.maximum
    console.print(table, crop=False)
    console.print(f"written: {html_path}", highlight=False)
    console.print(f"         {args.out / JSON_FILE}", highlight=False)
    for spec in PLOTS:
        console.print(f"         {args.out / (spec.name + '.png')}", highlight=False)
    return 0
