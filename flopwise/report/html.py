"""The report as one self-contained HTML page: table and plots, no script, no external URL.

Everything the page needs is inside the file (CSS inline, PNGs as base64 data URIs), so it can
be mailed, attached to an issue or opened offline, and shows the same everywhere.  Every piece
of text that comes from a run (names, paths, devices) is HTML-escaped.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

from flopwise import __version__
from flopwise.report.runs import Run
from flopwise.report.series import SMOOTHING, PlotSpec, plots_for
from flopwise.report.sweep import HISTORY_PLOT, IMPORTANCE_PLOT, Sweep, best_line, trials_table
from flopwise.report.table import Table, final_table
from flopwise.report.tasks import (
    SIGNAL_HEADERS,
    SIGNAL_NOTE,
    SIGNAL_NUMERIC,
    SIGNAL_PER_GROUP,
    TASKS_PLOT,
    TaskSignal,
    signal_rows,
    task_signals,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
p.note { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unfinished td { color: #8a5a00; }
table.signal td { vertical-align: top; }
table.signal th { white-space: normal; vertical-align: bottom; max-width: 9rem; }
table.signal tbody + tbody { border-top: 2px solid #bbb; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(30rem, 100%), 1fr)); gap: 1rem; }
figure { margin: 0.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
ul.runs { font-size: 0.9rem; color: #444; }
code { font-size: 0.85rem; }
"""


NUMERIC = ' class="num"'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def table_html(runs: list[Run]) -> str:
    """The final-figures table: one ``<tr>`` per run in ``<tbody>``, unfinished runs marked."""
    return rows_html(final_table(runs), ["finished" if run.finished else "unfinished" for run in runs])


def rows_html(table: Table, row_classes: list[str] | None = None) -> str:
    """A table of formatted cells, numbers right-aligned, each row with its class (if any)."""
    head = "".join(f"<th>{escape(header)}</th>" for header in table.headers)
    body = []
    for index, row in enumerate(table.rows):
        cells = "".join(f'<td class="num">{escape(cell)}</td>' if numeric else f"<td>{escape(cell)}</td>"
                        for cell, numeric in zip(row, table.numeric))
        css = f' class="{row_classes[index]}"' if row_classes else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return (f'<div class="scroll"><table class="runs"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def signal_html(signals: list[TaskSignal]) -> str:
    """The signal-quality table: a ``<tbody>`` per task and seed group, its group cells spanning its runs' rows."""
    head = "".join(f"<th>{escape(header)}</th>" for header in SIGNAL_HEADERS)
    bodies = []
    for signal in signals:
        rows = signal_rows(signal)
        span = f' rowspan="{len(rows)}"' if len(rows) > 1 else ""
        lines = []
        for position, row in enumerate(rows):
            cells = "".join(f"<td{NUMERIC if numeric else ''}{span if per_group else ''}>{escape(cell)}</td>"
                            for cell, numeric, per_group in zip(row, SIGNAL_NUMERIC, SIGNAL_PER_GROUP)
                            if position == 0 or not per_group)
            lines.append(f"<tr>{cells}</tr>")
        bodies.append(f"<tbody>{''.join(lines)}</tbody>")
    return (f'<div class="scroll"><table class="signal"><thead><tr>{head}</tr></thead>{"".join(bodies)}</table>'
            "</div>")


def caption(spec: PlotSpec) -> str:
    """What the figure shows, in words, including how the training loss beside the held-out points is smoothed."""
    scale = " (log scale)" if spec.log_x else ""
    if spec.smoothed is None:
        return f"{spec.y_label} against {spec.x_label}{scale}, one line per run."
    return (f"{spec.y_label} against {spec.x_label}{scale}, one colour per run: held-out evaluations as points, "
            f"training loss as a thin line ({SMOOTHING}).")


def tasks_html(runs: list[Run], images: dict[str, bytes]) -> str:
    """The task panels and the signal-quality table; nothing when no run scored a task during training."""
    signals = task_signals(runs)
    if TASKS_PLOT not in images or not signals:
        return ""
    return f"""<h2>Tasks during training</h2>
<figure id="{TASKS_PLOT}"><img src="{data_uri(images[TASKS_PLOT])}" alt="Task scores vs training tokens">
<figcaption>Centered accuracy against training tokens (log scale), one panel per task, one line per run; the band is
the 95% bootstrap interval, the dashed line chance (0).</figcaption></figure>
<h2>Task signal quality</h2>
<p class="note">Is each task a usable signal this early in training? Two of the E2LM competition's criteria.
{escape(SIGNAL_NOTE)}</p>
{signal_html(signals)}
"""


HISTORY_CAPTION = ("Optimization history: each finished trial's final held-out loss in trial order, and the best so "
                   "far (Optuna).")
IMPORTANCE_CAPTION = "Parameter importances for the final held-out loss (Optuna, fANOVA)."


def sweeps_html(sweeps: Sequence[Sweep], images: dict[str, bytes], notes: list[str]) -> str:
    """Each sweep's trials table, best trial and Optuna's history and importance plots."""
    parts = []
    for sweep in sweeps:
        plots = "".join(
            f'<figure id="{name}"><img src="{data_uri(images[name])}" alt="{escape(alt)}">'
            f"<figcaption>{escape(alt)}</figcaption></figure>"
            for name, alt in ((f"{HISTORY_PLOT}_{sweep.name}", HISTORY_CAPTION),
                              (f"{IMPORTANCE_PLOT}_{sweep.name}", IMPORTANCE_CAPTION)) if name in images)
        parts.append(f"""<h2>Sweep {escape(sweep.name)} ({escape(sweep.settings["strategy"])})</h2>
<p class="note">{escape(best_line(sweep))}</p>
{rows_html(trials_table(sweep))}
<div class="plots">{plots}</div>""")
    parts += [f'<p class="note">{escape(note)}</p>' for note in notes]
    return "\n".join(parts)


def render_html(runs: list[Run], images: dict[str, bytes], sweeps: Sequence[Sweep] = (),
                notes: list[str] | None = None) -> str:
    """The whole page; ``images`` maps each plot name (see ``series.plots_for``, ``tasks.TASKS_PLOT``, the sweeps'
    plots) to its PNG; ``notes``: plots that could not be drawn, and why."""
    folders = "".join(f"<li><b>{escape(run.name)}</b>: <code>{escape(str(run.path))}</code>"
                      f"{escape(f' ({run.final.device})' if run.final.device else '')}</li>" for run in runs)
    figures = "".join(
        f'<figure id="{spec.name}"><img src="{data_uri(images[spec.name])}" alt="{escape(spec.title)}">'
        f"<figcaption>{escape(caption(spec))}</figcaption></figure>"
        for spec in plots_for(runs) if spec.name in images)
    tasks = tasks_html(runs, images)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flopwise report: {escape(", ".join(run.name for run in runs))}</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<h1>flopwise report</h1>
<p class="note">{len(runs)} run{"s" if len(runs) != 1 else ""}. Held-out loss is the evaluation at the end of the
budget (p = 1), or the latest one for an unfinished run; tokens/s and MFU are totals over training seconds. The loss
plots show the held-out evaluations as points and the training loss, smoothed, as a thin line.</p>
{table_html(runs)}
<ul class="runs">{folders}</ul>
<div class="plots">{figures}</div>
{tasks}{sweeps_html(sweeps, images, notes or [])}
<p class="note">Made by flopwise {escape(__version__)}; the numbers behind each plot are in report.json.</p>
</body>
</html>
"""
