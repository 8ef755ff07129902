"""The report's figures, drawn with matplotlib's Agg renderer on standalone Figure objects.

No ``pyplot``: its global figure registry would leak memory and state across calls (and pick
a GUI backend on a desktop).  ``Figure`` + ``FigureCanvasAgg`` renders headless, the same everywhere.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, Formatter

from flopwise.atomic import write_atomic
from flopwise.report.runs import Run
from flopwise.report.series import PLOTS, PlotSpec, plot_lines

FIGSIZE = (7.5, 4.6)  # inches; at DPI 110 about 825 x 506 pixels, readable in a browser column
DPI = 110


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


def build_figure(runs: list[Run], spec: PlotSpec) -> Figure:
    """One figure: one labelled line per run, the same colour for a run in every figure."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, line in enumerate(plot_lines(runs, spec)):
        ax.plot(_nan(line.x), _nan(line.y), label=line.run, color=f"C{index % 10}", linewidth=1.6,
                marker="o" if spec.events == "eval" else None, markersize=4)  # evaluations: few, each marked
    if spec.log_x:  # FLOPs and tokens: 200M, 1G, 5G rather than 2x10^8
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(MinorLogLabels())
    if spec.y == "throughput":
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title(spec.title)
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(spec.y_label)
    ax.grid(True, which="major", alpha=0.3)
    if runs:
        ax.legend(loc="best", fontsize="small", framealpha=0.8)
    return figure


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    """All report figures by name (loss vs FLOPs/seconds/tokens, learning rate and throughput vs p)."""
    return {spec.name: build_figure(runs, spec) for spec in PLOTS}


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

