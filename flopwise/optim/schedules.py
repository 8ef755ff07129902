"""Learning-rate schedules as functions of budget progress p in [0, 1].

Each returns a multiplier of the peak learning rate.  Because they read p rather than a
step count, a run ends at its budget with the learning rate fully decayed however fast the
machine is.  Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024) is the
default, with the (1 - sqrt) cooldown that Hägele et al. found better than a linear one;
it allows extending a finished run from its last checkpoint before the decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flopwise.errors import FlopwiseError

SCHEDULES = ("wsd", "cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate multiplier over progress.

    warmup: fraction of the budget spent warming up linearly from 0.
    decay: fraction at the end spent decaying (wsd only; cosine and linear decay after warmup).
    final_lr_frac: multiplier reached at p = 1.
    """

    name: str = "wsd"
    warmup: float = 0.02
    decay: float = 0.2
    final_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise FlopwiseError(f"schedule.name='{self.name}' is unknown: choose one of {', '.join(SCHEDULES)}")
        for field, value in (("warmup", self.warmup), ("decay", self.decay), ("final_lr_frac", self.final_lr_frac)):
            if not 0.0 <= value <= 1.0:
                raise FlopwiseError(f"schedule.{field}={value} must lie in [0, 1]")
        if self.name == "wsd" and self.warmup + self.decay > 1.0:
            raise FlopwiseError(
                f"schedule.warmup + schedule.decay = {self.warmup + self.decay} exceeds 1: shorten one of them")

    @property
    def decay_start(self) -> float:
        """Progress at which the learning rate starts to fall (the last point worth resuming from)."""
        return 1.0 - self.decay if self.name == "wsd" else self.warmup

    def __call__(self, p: float) -> float:
        p = min(max(p, 0.0), 1.0)
        if self.warmup > 0 and p < self.warmup:
            return p / self.warmup
        final = self.final_lr_frac
        if self.name == "constant":
            return 1.0
        if p >= 1.0:  # exactly the final value, free of rounding in the formulas below
            return final
        if self.name == "wsd":
            if p <= self.decay_start or self.decay == 0:
                return 1.0
            frac = (p - self.decay_start) / self.decay
            return final + (1.0 - final) * (1.0 - math.sqrt(frac))
        frac = (p - self.warmup) / (1.0 - self.warmup) if self.warmup < 1 else 1.0
        if self.name == "linear":
            return final + (1.0 - final) * (1.0 - frac)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
