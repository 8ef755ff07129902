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
  report.html          the tables and all plots in one self-contained page (open it in any browser)
  *.png                held-out loss (points) and smoothed training loss (thin line) vs FLOPs,
                       training seconds and tokens; learning rate and tokens/s vs budget progress p;
                       one line per run
  tasks_vs_tokens.png  for runs with train.eval_tasks: each task's centered accuracy vs tokens, one
                       panel per task; the page and the terminal add a task signal-quality table
                       (monotonicity: Spearman rho vs tokens; spread: std of the final score over seeds)
  report.json          each run's final figures, the series behind every plot and the task table

examples:
  flopwise report runs/a runs/b                     # compare two runs, write ./report/
  flopwise report runs/* --out reports/lr-sweep     # every run in runs/
  flopwise report sweeps/lr                         # every trial of a flopwise sweep
"""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``report`` to the CLI's subcommands."""
    p = commands.add_parser("report", help="compare runs: table, plots, one HTML page",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPORT_EPILOG,
                            description="Compare runs (finished or not): a table of final held-out loss, size, "
                                        "spend and speed, and plots of their curves, as PNGs, report.json and "
                                        "one self-contained report.html. Needs no torch and no GPU.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folder (the --out of `flopwise train`), or a sweep folder (each of its trials' runs)")
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


def rich_signal_table(runs: list[Run]) -> Table | None:
    """The task signal-quality table for the terminal (same cells as the HTML page), or None without tasks.

    A seed group's cells (task, spread, mean rho) are printed on its first row, a rule between groups.  The
    headers wrap, the numbers never do: a score and its interval stay on one line."""
    from flopwise.report.tasks import (
        SIGNAL_HEADERS,
        SIGNAL_NOTE,
        SIGNAL_NUMERIC,
        SIGNAL_PER_GROUP,
        signal_rows,
        task_signals,
    )

    signals = task_signals(runs)
    if not signals:
        return None
    groups = [signal_rows(signal) for signal in signals]
    table = Table(title="task signal quality", caption=SIGNAL_NOTE)
    for column, (header, numeric) in enumerate(zip(SIGNAL_HEADERS, SIGNAL_NUMERIC)):
        widest = max(len(row[column]) for rows in groups for row in rows)
        table.add_column(header, justify="right" if numeric else "left", overflow="fold",
                         min_width=widest if numeric else None)
    for rows in groups:
        for position, row in enumerate(rows):
            table.add_row(*("" if per_group and position else cell for cell, per_group in zip(row, SIGNAL_PER_GROUP)),
                          end_section=position == len(rows) - 1)
    return table


def print_table(console: Console, table: Table) -> None:
    """Never cut a number short: if even wrapped headers do not fit the terminal, print the table at its
    natural width (one line per row) and let the terminal wrap those lines."""
    natural = Measurement.get(console, console.options.update_width(10_000), table)
    if natural.minimum > console.width:
        table.width = natural.maximum
    console.print(table, crop=False)


def expand_sweeps(paths: list[Path]) -> list[Path]:
    """Each sweep folder (it holds sweep.json) as its trials' run folders, in trial order; runs as they are."""
    expanded: list[Path] = []
    for path in paths:
        trials = path / "trials"
        if (path / "sweep.json").is_file() and trials.is_dir():
            expanded += sorted(folder for folder in trials.iterdir() if (folder / "config.toml").is_file())
        else:
            expanded.append(path)
    return expanded


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Read the runs, write the report, print the table and the paths written."""
    from flopwise.report import JSON_FILE, load_runs, write_runs_report
    from flopwise.report.series import PLOTS
    from flopwise.report.tasks import TASKS_PLOT

    runs = load_runs(expand_sweeps(args.runs))
    check_output("--out", args.out, folder=True)
    html_path = write_runs_report(runs, args.out)
    print_table(console, rich_table(runs))
    signal = rich_signal_table(runs)
    if signal is not None:
        print_table(console, signal)
    console.print(f"written: {html_path}", highlight=False)
    console.print(f"         {args.out / JSON_FILE}", highlight=False)
    for name in [spec.name for spec in PLOTS] + ([TASKS_PLOT] if signal is not None else []):
        console.print(f"         {args.out / (name + '.png')}", highlight=False)
    return 0
