"""The base of every config section and the field checks they share.

Each component owns its section (the model's in flopwise/model/section.py, the data's in
flopwise/data/config.py, each method's beside the method); flopwise/config.py composes them into
the run config.  Sections are frozen: the resolved config is never changed after validation.
"""

from __future__ import annotations

import math
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator


class Section(BaseModel):
    """A config section: unknown keys are refused, and values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def one_or_many(cls: type, value: Any) -> Any:
    """A list field given one string (``--set data.sources=./docs``) becomes a list of it."""
    return [value] if isinstance(value, str) else value


def in_range(*fields: str, low: float, high: float | None = None, above: bool = False, below: bool = False,
             rule: str | None = None) -> Any:
    """The check of the numeric ``fields`` of a section: each unset (None, where allowed) or a finite number (a
    whole one for int fields, never a boolean) from ``low`` to ``high``, those bounds excluded where ``above`` /
    ``below``.  A refusal states the range (``rule``, or one written from the bounds: "lie in [0, 1)", "be a
    whole number >= 1"), so validate_config's line reads ``optim.beta1=1.5: must lie in [0, 1)``."""

    def check(cls: type, value: Any, handler: Any, info: Any) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        whole = int in (get_args(annotation) or (annotation,))
        refusal = ValueError(f"must {rule or _describe(low, high, above, below, whole)}")
        if isinstance(value, bool):
            raise refusal
        try:
            value = handler(value)
        except ValidationError as err:  # not a number (or not whole): say what would be, unless a check said why
            if any(error["type"] == "value_error" for error in err.errors()):
                raise
            raise refusal from None
        if value is not None and not _within(value, low, high, above, below):
            raise refusal
        return value

    return field_validator(*fields, mode="wrap")(check)


def _within(value: float, low: float, high: float | None, above: bool, below: bool) -> bool:
    return ((isinstance(value, int) or math.isfinite(value)) and (value > low if above else value >= low)
            and (high is None or (value < high if below else value <= high)))


def _describe(low: float, high: float | None, above: bool, below: bool, whole: bool) -> str:
    if high is not None:
        bounds = f"{'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
        return f"be a whole number in {bounds}" if whole else f"lie in {bounds}"
    text = f"{'a whole number' if whole else 'a finite number'} {'>' if above else '>='} {low:g}"
    return f"be positive ({text})" if low == 0 and above else f"be {text}"
