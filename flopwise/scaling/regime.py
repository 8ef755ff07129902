"""Where a training curve's early regime ends, so that laws and forecasts are fitted past it.

A saturating power law L = E + A * D^-gamma falls ever more slowly in log-log: its local slope
d log L / d log D = -gamma * (1 - E / L) shrinks as the loss nears E.  Real curves can break that
early on.  On the default corpus every size's loss drops suddenly between about 1 and 2.5M tokens
(induction heads forming: bench/early_regime.py), so the curve is steepest there,
not at its start.  Points before such a drop follow a different, steeper law: a scaling law fitted
across it predicted 10-minute runs 10% and 20-minute runs 18% too low (bench/results/planner.json),
while one fitted on runs past it predicted the 20-minute runs within 3%.

The curve's steepest point is found as the most negative least-squares slope of log loss on log
tokens over a sliding window of WINDOW (a factor 1.5 in tokens, enough steps to average out the
batch-to-batch noise), on the points at full learning rate (a decay steepens the curve by design).
The early regime is taken to end MARGIN times further on, where the curves measured here had
settled back to a power law.  A curve without such a drop is steepest at its start, so only points
below MARGIN times the start of its stable phase are in its early regime.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from flopwise.optim.schedules import Schedule
from flopwise.train.loss_curve import CurvePoint, stable_points

WINDOW = math.log(1.5)  # width of the slope window, in log tokens
STRIDE = 0.05  # spacing of the windows' centres, in log tokens
MIN_WINDOW_POINTS = 8  # a window with fewer logged steps gives no slope
MARGIN = 1.5  # the early regime ends this factor in tokens after the steepest point


def steepest_tokens(points: Sequence[CurvePoint], schedule: Schedule) -> float | None:
    """Tokens at the centre of the window where the stable-phase loss falls fastest in log-log, or None
    for a curve too short to hold one window."""
    stable = stable_points(points, schedule, skip=0.0)
    if len(stable) < MIN_WINDOW_POINTS:
        return None
    log_d = np.log([pt.tokens for pt in stable])
    log_loss = np.log([pt.loss for pt in stable])
    best_slope, best_centre = math.inf, None
    for centre in np.arange(log_d[0] + WINDOW / 2, log_d[-1] - WINDOW / 2 + 1e-12, STRIDE):
        inside = np.abs(log_d - centre) <= WINDOW / 2
        if inside.sum() < MIN_WINDOW_POINTS:
            continue
        slope = float(np.polyfit(log_d[inside], log_loss[inside], 1)[0])
        if slope < best_slope:
            best_slope, best_centre = slope, float(centre)
    return math.exp(best_centre) if best_centre is not None else None


def early_regime_end(steepest: float | None) -> float:
    """Tokens from which a run's final loss, or a curve's points, are past the early regime (0: no curve seen)."""
    return MARGIN * steepest if steepest else 0.0
