"""What each report plot shows: one list of plot specs used for the PNGs and for report.json.

Keeping the specs in one place means the pictures and the numbers written next to them
(``report.json``) cannot disagree: both are built from :func:`plot_lines`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flopwise.report.runs import Run


@dataclass(frozen=True)
class PlotSpec:
    """One figure: which events (``eval`` or ``train``) and which of their fields go on x and y."""

    name: str  # also the PNG's file name, without .png
    title: str
    events: str
    x: str
    y: str
    x_label: str
    y_label: str
    log_x: bool = False


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("loss_vs_flops", "Held-out loss vs compute", "eval", "flops", "val_loss",
             "training FLOPs", "held-out loss (nats/token)", log_x=True),
    PlotSpec("loss_vs_seconds", "Held-out loss vs training time", "eval", "seconds", "val_loss",
             "training seconds", "held-out loss (nats/token)"),
    PlotSpec("loss_vs_tokens", "Held-out loss vs data", "eval", "tokens", "val_loss",
             "training tokens", "held-out loss (nats/token)", log_x=True),
    PlotSpec("lr_vs_progress", "Learning rate vs budget progress", "train", "p", "lr",
             "budget progress p", "learning rate"),
    PlotSpec("throughput_vs_progress", "Throughput vs budget progress", "train", "p", "throughput",
             "budget progress p", "tokens / second"),
)


@dataclass(frozen=True)
class Line:
    """One run's points on one plot; a missing or non-finite value is None (a gap in the line)."""

    run: str
    x: list[float | None]
    y: list[float | None]


def _value(event: dict[str, Any], key: str) -> float | None:
    value = event.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def plot_lines(runs: list[Run], spec: PlotSpec) -> list[Line]:
    """One line per run, in run order: the spec's fields of the run's events, in file order."""
    lines = []
    for run in runs:
        events = run.evals if spec.events == "eval" else run.trains
        lines.append(Line(run.name, [_value(e, spec.x) for e in events], [_value(e, spec.y) for e in events]))
    return lines


def plots_json(runs: list[Run]) -> dict[str, Any]:
    """The series behind every plot, per run, for report.json."""
    return {spec.name: {"title": spec.title, "png": f"{spec.name}.png", "events": spec.events, "x": spec.x,
                        "y": spec.y, "x_label": spec.x_label, "y_label": spec.y_label,
                        "x_scale": "log" if spec.log_x else "linear",
                        "lines": [{"run": line.run, "x": line.x, "y": line.y} for line in plot_lines(runs, spec)]}
            for spec in PLOTS}
