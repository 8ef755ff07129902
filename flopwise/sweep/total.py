"""One total budget shared by a sweep's trials.

A trial starts only when its whole budget fits in what is neither spent nor reserved by the trials still
running, so the sweep never starts a trial it cannot finish; a trial that ends (finished, pruned or failed)
gives back what it did not spend.  A seconds budget ends at the step nearest its end, so a trial can overrun
by part of a step: the largest share by which an ended trial overran is kept, and a trial starts only when
its budget and that share more still fit, so the sum stays within the total.  Amounts are in the budget's
unit: training seconds, FLOPs or tokens, as each trial's meter counts them.  The state is plain numbers,
saved with the sweep for ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 1e-9  # relative: a total split into equal trial budgets must fit them all despite rounding


@dataclass
class TotalBudget:
    total: float
    spent: float = 0.0
    reserved: dict[int, float] = field(default_factory=dict)  # trial number -> its budget, while it runs
    overrun: float = 0.0  # the largest share of its budget by which an ended trial overran it

    @property
    def left(self) -> float:
        """Neither spent nor reserved."""
        return self.total - self.spent - sum(self.reserved.values())

    def can_start(self, amount: float) -> bool:
        return amount * (1 + self.overrun) <= self.left + TOLERANCE * self.total

    def start(self, trial: int, amount: float) -> None:
        if trial in self.reserved:
            raise ValueError(f"trial {trial} is already running")
        if not self.can_start(amount):
            raise ValueError(f"trial {trial} needs {amount:g} but only {self.left:g} is left")
        self.reserved[trial] = amount

    def end(self, trial: int, used: float) -> None:
        """Trial ``trial`` ended after spending ``used``: its reservation is released and ``used`` is spent
        (an overrun too: it comes out of what is left, and raises the margin later trials must fit)."""
        reserved = self.reserved.pop(trial)
        self.spent += used
        if reserved > 0:
            self.overrun = max(self.overrun, used / reserved - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "spent": self.spent, "reserved": {str(k): v for k, v in self.reserved.items()},
                "overrun": self.overrun}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TotalBudget:
        return cls(float(data["total"]), float(data["spent"]),
                   {int(k): float(v) for k, v in data["reserved"].items()}, float(data.get("overrun", 0.0)))
