"""The run's forecast of its own final held-out loss, logged as it goes (flopwise/train/loss_curve.py).

It reads only the logged training steps, so a resumed run, which reloads them from metrics.jsonl,
forecasts exactly as the uninterrupted one did.  With a target loss it also says when to give up:
once even the forecast's low end lies above the target, the rest of the budget cannot buy it.
"""

from __future__ import annotations

from typing import Any, Iterable

from flopwise.errors import FlopwiseError
from flopwise.optim.schedules import Schedule
from flopwise.train.loss_curve import (
    Calibration,
    CurvePoint,
    Forecast,
    LossPrior,
    forecast_final_loss,
    projected_total_tokens,
)


class LossForecaster:
    def __init__(self, schedule: Schedule, calibration: Calibration, every: float = 0.1,
                 target: float | None = None, points: Iterable[CurvePoint] = (), prior: LossPrior | None = None) -> None:
        self.schedule = schedule
        self.prior = prior
        self.calibration = calibration
        self.every = every
        self.target = target
        self.points: list[CurvePoint] = list(points)

    def observe(self, event: dict[str, Any]) -> None:
        """A logged train event (the same dict metrics.jsonl receives)."""
        self.points.append(CurvePoint(event["tokens"], event["loss"], event["p_lr"]))

    def forecast(self, tokens: float, p: float) -> Forecast | None:
        """Final loss at the end of the budget: total tokens are tokens / p, exact for token, FLOP and step
        limits and a projection from the throughput so far for a seconds limit."""
        try:
            return forecast_final_loss(self.points, self.schedule, projected_total_tokens(tokens, p), self.calibration,
                                       prior=self.prior)
        except FlopwiseError:
            return None

    def cannot_reach(self, forecast: Forecast) -> bool:
        return self.target is not None and forecast.low > self.target
