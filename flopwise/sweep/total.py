"""One total budget shared by a sweep's trials.

A trial starts only when its whole budget fits in what is neither spent nor reserved by the trials still
running, so the sweep never starts a trial it cannot finish; a trial that ends (finished, pruned or failed)
gives back what it did not spend.  Amounts are in the budget's unit: training seconds, FLOPs or tokens, as
each trial's meter counts them.  The state is plain numbers, saved with the sweep for ``--resume``.
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

    @property
    def left(self) -> float:
        """Neither spent nor reserved."""
        return self.total - self.spent - sum(self.reserved.values())

    def can_start(self, amount: float) -> bool:
        return amount <= self.left + TOLERANCE * self.total

    def start(self, trial: int, amount: float) -> None:
        if trial in self.reserved:
            raise ValueError(f"trial {trial} is already running")
        if not self.can_start(amount):
            raise ValueError(f"trial {trial} needs {amount:g} but only {self.left:g} is left")
        self.reserved[trial] = amount

    def end(self, trial: int, used: float) -> None:
        """Trial ``trial`` ended after spending ``used``: its reservation is released and ``used`` is spent
        (a seconds budget can overrun by part of a step; that is spent too, and comes out of what is left)."""
        del self.reserved[trial]
        self.spent += used

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "spent": self.spent, "reserved": {str(k): v for k, v in self.reserved.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TotalBudget:
        return cls(float(data["total"]), float(data["spent"]),
                   {int(k): float(v) for k, v in data["reserved"].items()})
