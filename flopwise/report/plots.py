"""The report's figures, drawn with matplotlib's Agg renderer on standalone Figure objects.

No ``pyplot``: its global figure registry would leak memory and state across calls (and pick
a GUI backend on a desktop).  ``Figure`` + ``FigureCanvasAgg`` renders headless, the same everywhere.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, Formatter

from flopwise.atomic import write_atomic
from flopwise.report.runs import Run
from flopwise.report.series import PlotSpec, plot_lines, plots_for, smoothed_lines
from flopwise.report.tasks import TASKS_PLOT, TaskLine, task_lines

FIGSIZE = (7.5, 4.6)  # inches; at DPI 110 about 825 x 506 pixels, readable in a browser column
DPI = 110
PANEL = (3.8, 2.8)  # inches per task panel: three side by side fill the page's width
PANEL_COLUMNS = 3
SMOOTHED_LABEL = "training loss (smoothed)"


class MinorLogLabels(Formatter):
    """Labels the 2x and 5x ticks of each decade on a log axis spanning under three decades.

    A run's curve often spans only one or two decades, where decade labels alone leave the
    axis with one or two numbers; matplotlib's own minor labels (``3x10^9``) crowd each other.
    """

    def __init__(self) -> None:
        self.eng = EngFormatter(sep="")

    def __call__(self, x: float, pos: int | None = None) -> str:
        low, high = self.axis.get_view_interval()
        if x <= 0 or low <= 0 or math.log10(high / low) > 3:
            return ""
        mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
        return self.eng(x) if any(abs(mantissa - keep) < 1e-6 for keep in (2, 5)) else ""


def _nan(values: list[float | None]) -> list[float]:
    """None (missing) becomes NaN, which matplotlib draws as a gap."""
    return [math.nan if value is None else value for value in values]


def colour(index: int) -> str:
    """A run's colour, the same in every figure: its place in the report."""
    return f"C{index % 10}"


def log_tokens_axis(ax: Axes) -> None:
    """A log x axis labelled 200M, 1G, 5G rather than 2x10^8 (FLOPs and tokens)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(MinorLogLabels())


def build_figure(runs: list[Run], spec: PlotSpec) -> Figure:
    """One figure: one labelled line per run, the same colour for a run in every figure.

    With ``spec.smoothed``, each run's smoothed training loss is drawn first, thin and light in the run's
    colour, so the held-out points stay on top; the legend names the runs and that line style once.
    """
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, line in enumerate(smoothed_lines(runs, spec)):
        ax.plot(_nan(line.x), _nan(line.y), label=f"{line.run}: {SMOOTHED_LABEL}", color=colour(index),
                linewidth=0.9, alpha=0.45)
    handles = [ax.plot(_nan(line.x), _nan(line.y), label=line.run, color=colour(index), linewidth=1.6,
                       marker="o" if spec.events == "eval" else None, markersize=4)[0]  # evaluations: few, marked
               for index, line in enumerate(plot_lines(runs, spec))]
    if spec.log_x:
        log_tokens_axis(ax)
    if spec.y == "throughput":
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title(spec.title)
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(spec.y_label)
    ax.grid(True, which="major", alpha=0.3)
    if spec.smoothed is not None:
        handles.append(Line2D([], [], color="0.4", linewidth=0.9, alpha=0.6, label=SMOOTHED_LABEL))
    if runs:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.8)
    return figure


def draw_task(ax: Axes, task: str, lines: list[TaskLine]) -> None:
    """One task's panel: each run's centered score with its bootstrap interval as a band, chance dashed."""
    for line in lines:
        x = [point.tokens for point in line.points]
        ax.fill_between(x, _nan([point.low for point in line.points]), _nan([point.high for point in line.points]),
                        color=colour(line.index), alpha=0.18, linewidth=0)
        ax.plot(x, [point.centered for point in line.points], color=colour(line.index), linewidth=1.4,
                marker="o", markersize=3, label=line.run)
    ax.axhline(0.0, color="0.35", linestyle="--", linewidth=1.0)
    log_tokens_axis(ax)
    ax.set_title(task, fontsize="medium", parse_math=False)  # a task's name is text, never TeX
    ax.set_xlabel("training tokens", fontsize="small")
    ax.set_ylabel("centered accuracy", fontsize="small")
    ax.tick_params(labelsize="small")
    ax.grid(True, which="major", alpha=0.3)


def build_task_figure(runs: list[Run], lines: dict[str, list[TaskLine]]) -> Figure:
    """One small panel per task (all runs overlaid), ``PANEL_COLUMNS`` to a row, one legend for all of them."""
    columns = min(PANEL_COLUMNS, len(lines))
    rows = math.ceil(len(lines) / columns)
    figure = Figure(figsize=(PANEL[0] * columns, PANEL[1] * rows + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax, (task, task_runs) in zip(axes, lines.items()):
        draw_task(ax, task, task_runs)
    for ax in axes[len(lines):]:  # the last row's empty places
        ax.set_visible(False)
    scored = sorted({line.index for task_runs in lines.values() for line in task_runs})
    handles = [Line2D([], [], color=colour(index), marker="o", markersize=3, label=runs[index].name)
               for index in scored]
    handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=1.0, label="chance"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    return figure


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    """All report figures by name (loss vs FLOPs/seconds/tokens, learning rate and throughput vs p; pass@1 and reward
    for RL runs) and, when a run scored tasks during training, the task panels."""
    figures = {spec.name: build_figure(runs, spec) for spec in plots_for(runs)}
    lines = task_lines(runs)
    if lines:
        figures[TASKS_PLOT] = build_task_figure(runs, lines)
    return figures


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_pngs(pngs: dict[str, bytes], out_dir: Path) -> dict[str, Path]:
    """``<name>.png`` for each rendered figure in ``out_dir``, each written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.png" for name in pngs}
    for name, png in pngs.items():
        write_atomic(paths[name], png)
    return paths

