"""``flopwise report``: argument parsing and the terminal output.

Kept apart from flopwise.report itself so the CLI can register it without importing matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from flopwise.report.runs import Run
from flopwise.report.table import Table as ReportTable
from flopwise.rundir import check_output

if TYPE_CHECKING:
    from flopwise.report.sweep import Sweep

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
  sweep_history_<sweep>.png, sweep_importance_<sweep>.png
                       for a sweep folder: Optuna's optimization history and parameter importances;
                       the page and the terminal add its trials table and best trial

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

    return rich_rows(final_table(runs), "runs", [None if run.finished else "yellow" for run in runs])


def rich_rows(data: ReportTable, title: str, styles: list[str | None] | None = None) -> Table:
    """A report table's cells for the terminal, numbers right-aligned."""
    table = Table(title=title)
    for header, numeric in zip(data.headers, data.numeric):
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for index, row in enumerate(data.rows):
        table.add_row(*row, style=styles[index] if styles else None)
    return table


def print_sweep(console: Console, sweep: Sweep) -> None:
    """A sweep's trials table and its best trial, as `flopwise sweep` ends and `flopwise report` shows it."""
    from flopwise.report.sweep import best_line, trials_table

    print_table(console, rich_rows(trials_table(sweep), f"sweep {sweep.folder}: {len(sweep.study.trials)} trials"))
    console.print(best_line(sweep), highlight=False)


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
    from flopwise.sweep.folder import TRIALS, is_sweep

    expanded: list[Path] = []
    for path in paths:
        if is_sweep(path):
            expanded += sorted(folder for folder in (path / TRIALS).iterdir() if (folder / "config.toml").is_file())
        else:
            expanded.append(path)
    return expanded


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Read the runs, write the report, print the table and the paths written."""
    from flopwise.report import JSON_FILE, load_runs, write_runs_report
    from flopwise.report.series import plots_for
    from flopwise.report.sweep import HISTORY_PLOT, IMPORTANCE_PLOT, load_sweep
    from flopwise.report.tasks import TASKS_PLOT
    from flopwise.sweep.folder import is_sweep

    sweeps = [load_sweep(path) for path in args.runs if is_sweep(path)]  # a damaged sweep state is named first
    runs = load_runs(expand_sweeps(args.runs))
    check_output("--out", args.out, folder=True)
    html_path = write_runs_report(runs, args.out, sweeps)
    print_table(console, rich_table(runs))
    for sweep in sweeps:
        print_sweep(console, sweep)
    signal = rich_signal_table(runs)
    if signal is not None:
        print_table(console, signal)
    console.print(f"written: {html_path}", highlight=False)
    console.print(f"         {args.out / JSON_FILE}", highlight=False)
    sweep_plots = [f"{plot}_{sweep.name}.png" for sweep in sweeps for plot in (HISTORY_PLOT, IMPORTANCE_PLOT)
                   if (args.out / f"{plot}_{sweep.name}.png").is_file()]
    task_plots = [TASKS_PLOT + ".png"] if signal is not None else []
    for name in [spec.name + ".png" for spec in plots_for(runs)] + task_plots + sweep_plots:
        console.print(f"         {args.out / name}", highlight=False)
    return 0
