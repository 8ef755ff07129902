"""What each report plot shows: one list of plot specs used for the PNGs and for report.json.

Keeping the specs in one place means the pictures and the numbers written next to them
(``report.json``) cannot disagree: both are built from :func:`plot_lines` and :func:`smoothed_lines`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flopwise.report.runs import Run


@dataclass(frozen=True)
class PlotSpec:
    """One figure: which events (``eval`` or ``train``) and which of their fields go on x and y.

    ``smoothed``: a field of the train events drawn, smoothed, beside each run's line (the training loss
    beside the held-out points: five evaluations alone hide what happened between them).
    """

    name: str  # also the PNG's file name, without .png
    title: str
    events: str
    x: str
    y: str
    x_label: str
    y_label: str
    log_x: bool = False
    smoothed: str | None = None


SMOOTHED_SHARE = 0.05  # the smoothing's span, as a share of a run's logged train points
SMOOTHING = f"exponential moving average with bias correction, span {SMOOTHED_SHARE:.0%} of the run's logged points"

PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("loss_vs_flops", "Held-out loss vs compute", "eval", "flops", "val_loss",
             "training FLOPs", "loss (nats/token)", log_x=True, smoothed="loss"),
    PlotSpec("loss_vs_seconds", "Held-out loss vs training time", "eval", "seconds", "val_loss",
             "training seconds", "loss (nats/token)", smoothed="loss"),
    PlotSpec("loss_vs_tokens", "Held-out loss vs data", "eval", "tokens", "val_loss",
             "training tokens", "loss (nats/token)", log_x=True, smoothed="loss"),
    PlotSpec("lr_vs_progress", "Learning rate vs budget progress", "train", "p", "lr",
             "budget progress p", "learning rate"),
    PlotSpec("throughput_vs_progress", "Throughput vs budget progress", "train", "p", "throughput",
             "budget progress p", "tokens / second"),
)

# drawn where a run was trained with `flopwise rl` (its evaluations score pass@1, not a loss)
RL_PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("pass_vs_seconds", "Held-out pass@1 (greedy) vs training time", "eval", "seconds", "pass_greedy",
             "training seconds", "pass@1"),
    PlotSpec("reward_vs_seconds", "Held-out mean reward (sampled) vs training time", "eval", "seconds",
             "reward_sampled", "training seconds", "mean reward"),
)


def plots_for(runs: list[Run]) -> tuple[PlotSpec, ...]:
    """The plots of these runs: every run's, and RL's where one of them was trained with rewards."""
    rl = any("pass_greedy" in event for run in runs for event in run.evals)
    return PLOTS + RL_PLOTS if rl else PLOTS


@dataclass(frozen=True)
class Line:
    """One run's points on one plot; a missing or non-finite value is None (a gap in the line)."""

    run: str
    x: list[float | None]
    y: list[float | None]


def finite(event: dict[str, Any], key: str) -> float | None:
    """``event[key]`` as a float, or None where it is missing, not a number or not finite (a gap)."""
    value = event.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def plot_lines(runs: list[Run], spec: PlotSpec) -> list[Line]:
    """One line per run, in run order: the spec's fields of the run's events, in file order."""
    lines = []
    for run in runs:
        events = run.evals if spec.events == "eval" else run.trains
        lines.append(Line(run.name, [finite(e, spec.x) for e in events], [finite(e, spec.y) for e in events]))
    return lines


def smoothing_span(count: int) -> float:
    """The span, in logged points, of the smoothing of ``count`` points: 5% of them, at least 1 (none).

    A share rather than a fixed number: a 30-step test run and a 100,000-step run logged every 10 steps
    are both smoothed over the same fraction of training, so neither is flattened nor left raw.
    """
    return max(1.0, SMOOTHED_SHARE * count)


def smooth(values: list[float | None], span: float) -> list[float | None]:
    """An exponential moving average with bias correction, as TensorBoard's "debiased" smoothing.

    Weight ``beta = 1 - 2 / (span + 1)`` (pandas' ``span``), ``m_t = beta m_(t-1) + (1 - beta) x_t`` from
    ``m_0 = 0``, divided by ``1 - beta^t`` so that the first points are not pulled towards 0.  It only
    looks back, as a run's own log does: no point uses a loss logged after it (the price is a lag of about
    ``(span - 1) / 2`` points).  A missing or non-finite value (a diverged step) is a gap, left out of the average.
    """
    beta = 1.0 - 2.0 / (span + 1.0)
    average, seen, out = 0.0, 0, []
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(None)
            continue
        average = beta * average + (1.0 - beta) * value
        seen += 1
        out.append(average / (1.0 - beta**seen))
    return out


def smoothed_lines(runs: list[Run], spec: PlotSpec) -> list[Line]:
    """One line per run: the spec's ``smoothed`` train field against its x, smoothed (none if it has none)."""
    if spec.smoothed is None:
        return []
    lines = []
    for run in runs:
        y = [finite(event, spec.smoothed) for event in run.trains]
        lines.append(Line(run.name, [finite(event, spec.x) for event in run.trains], smooth(y, smoothing_span(len(y)))))
    return lines


def plots_json(runs: list[Run]) -> dict[str, Any]:
    """The series behind every plot, per run, for report.json (with the smoothed training loss where drawn)."""
    plots = {}
    for spec in plots_for(runs):
        plot = {"title": spec.title, "png": f"{spec.name}.png", "events": spec.events, "x": spec.x,
                "y": spec.y, "x_label": spec.x_label, "y_label": spec.y_label,
                "x_scale": "log" if spec.log_x else "linear",
                "lines": [{"run": line.run, "x": line.x, "y": line.y} for line in plot_lines(runs, spec)]}
        if spec.smoothed is not None:
            plot["smoothed"] = {"events": "train", "y": spec.smoothed, "method": SMOOTHING,
                                "lines": [{"run": line.run, "x": line.x, "y": line.y}
                                          for line in smoothed_lines(runs, spec)]}
        plots[spec.name] = plot
    return plots
