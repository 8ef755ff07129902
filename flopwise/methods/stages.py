"""The stages of a progressive schedule: a quantity (window length, batch) starts at ``start`` times its
full amount, a power of 1/2, and doubles at evenly spaced points of budget progress until it is full from
``until`` on, as modded-nanoGPT grows its attention window and batch in a few discrete steps.  Doubling
keeps every stage a divisor of the full amount, so a full window is cut into whole shorter ones and a
global batch still splits evenly over the ranks."""

from __future__ import annotations

import math

from pydantic import field_validator

from flopwise.errors import FlopwiseError
from flopwise.methods.base import MethodConfig
from flopwise.section import in_range


class StagesConfig(MethodConfig):
    """``start``: the first stage's share of the full amount (1/2, 1/4, 1/8, ...); ``until``: the budget
    progress from which the amount is full, doubling at even steps of p before it."""

    start: float = 0.25
    until: float = 0.5

    _start = in_range("start", low=0, high=1, above=True)
    _until = in_range("until", low=0, high=1, above=True)

    @field_validator("start")
    @classmethod
    def _power_of_half(cls, value: float) -> float:
        if 2.0 ** -round(-math.log2(value)) != value:
            raise ValueError("must be 1, 1/2, 1/4, 1/8, ... (each stage doubles the amount)")
        return value

    @property
    def doublings(self) -> int:
        return round(-math.log2(self.start))

    def first(self, full: int, field: str) -> int:
        """The first stage's amount; a one-line refusal naming ``field`` when ``full`` does not halve that often."""
        if full % 2**self.doublings:
            raise FlopwiseError(f"{field}={full} cannot be halved {self.doublings} time(s) for start={self.start:g}: "
                                f"use a {field} divisible by {2**self.doublings}, or a larger start")
        return full >> self.doublings

    def value(self, full: int, p: float) -> int:
        """The amount at progress p."""
        if self.doublings == 0 or p >= self.until:
            return full
        return (full >> self.doublings) * 2 ** int(p * self.doublings / self.until)

    def breakpoints(self) -> tuple[float, ...]:
        """The progress values where the amount doubles."""
        return tuple(self.until * j / self.doublings for j in range(1, self.doublings + 1))
