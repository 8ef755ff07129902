"""The base of every config section and the field checks they share.

Each component owns its section (the model's in flopwise/model/config.py, the data's in
flopwise/data/config.py, each method's beside the method); flopwise/config.py composes them into
the run config.  Sections are frozen: the resolved config is never changed after validation.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are refused, and values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def one_or_many(cls: type, value: Any) -> Any:
    """A list field given one string (``--set data.sources=./docs``) becomes a list of it."""
    return [value] if isinstance(value, str) else value


def unit_share(cls: type, value: float) -> float:
    """Shares of the budget or of a mixture: in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError("must lie in [0, 1)")
    return value


def non_negative(cls: type, value: float) -> float:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def positive(cls: type, value: float | None) -> float | None:
    """Sizes, rates and counts: unset (None, where allowed) or above zero and finite."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError("must be positive (and finite)")
    return value
