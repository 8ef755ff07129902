"""``flopwise report``: compare finished runs in one HTML page, PNG plots and report.json.

Importing this package is cheap (no matplotlib, no torch), so ``flopwise --help`` stays fast;
the plotting modules are imported only when a report is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flopwise.atomic import write_atomic
from flopwise.report.runs import Run, load_runs

if TYPE_CHECKING:
    from flopwise.report.sweep import Sweep

HTML_FILE = "report.html"
JSON_FILE = "report.json"

__all__ = ["HTML_FILE", "JSON_FILE", "load_runs", "report_data", "write_report", "write_runs_report"]


def report_data(runs: list[Run], sweeps: Sequence[Sweep] = ()) -> dict:
    """report.json: each run's final figures and the series behind every plot, for other tools.

    ``tasks``: the task panels' series and the signal-quality table, or null when no run scored a task.
    ``sweeps``: each sweep's settings, trials and best trial.
    """
    from flopwise.report.series import plots_json
    from flopwise.report.sweep import sweep_json
    from flopwise.report.tasks import tasks_json

    return {"runs": [{"name": run.name, "path": str(run.path), "finished": run.finished,
                      "final": run.final.to_dict()} for run in runs],
            "plots": plots_json(runs), "tasks": tasks_json(runs), "sweeps": [sweep_json(s) for s in sweeps]}


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write ``<name>.png`` per plot, ``report.json`` and ``report.html`` to ``out_dir``; return the HTML path.

    All runs are read (a bad folder is a FlopwiseError before anything is written) and every
    file rendered in memory first; each is then written whole via a temporary file and a
    rename, the HTML last, so a failure never leaves a half-written page.
    """
    return write_runs_report(load_runs(run_dirs), out_dir)


def write_runs_report(runs: list[Run], out_dir: Path, sweeps: Sequence[Sweep] = ()) -> Path:
    """:func:`write_report` for runs already loaded (the CLI prints the same runs it reports), with the
    sections of the ``sweeps`` they came from."""
    from flopwise.report.html import render_html
    from flopwise.report.plots import build_figures, png_bytes, save_pngs
    from flopwise.report.sweep import sweep_figures

    figures, notes = build_figures(runs), []
    for sweep in sweeps:
        drawn, missing = sweep_figures(sweep)
        figures.update(drawn)
        notes += missing
    pngs = {name: png_bytes(figure) for name, figure in figures.items()}
    data = json.dumps(report_data(runs, sweeps), indent=1, allow_nan=False).encode("utf-8")
    page = render_html(runs, pngs, sweeps, notes).encode("utf-8")
    save_pngs(pngs, out_dir)  # everything is rendered before the first file is written
    write_atomic(out_dir / JSON_FILE, data)
    html_path = out_dir / HTML_FILE
    write_atomic(html_path, page)
    return html_path
