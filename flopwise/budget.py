"""Budgets, the meter that spends them, and the progress `p` every schedule reads.

A run may be limited by wall-clock training seconds, model FLOPs, tokens and steps in
any combination; whichever limit binds first ends the run (`p` = the largest fraction
spent).  Human units follow what people write: ``90s``, ``3m``, ``1.5h``, ``2e15flops``,
``5M`` (tokens), ``40steps``.  A byte amount (``4MB``, ``2MiB``) caps the size of the exported model
(``size``, flopwise/size.py): it is no spend limit, so ``p`` never reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

from pydantic import field_validator

from flopwise.errors import FlopwiseError
from flopwise.section import Section, in_range

LIMITS = ("seconds", "flops", "tokens", "steps")
SIZE = "size"  # the cap on the exported model's bytes: set with the limits, but spent by none of them

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
               "mins": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hours": 3600.0,
               "d": 86400.0, "days": 86400.0}
_WORD_UNITS = {"flops": "flops", "flop": "flops", "steps": "steps", "step": "steps",
               "tokens": "tokens", "token": "tokens", "tok": "tokens", "": "tokens"}
# a sign is read, so that '-5s' is refused as a negative budget rather than as unreadable
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_EXAMPLES = "use e.g. 90s, 3m, 1.5h, 2e15flops, 5M (tokens), 40steps, and a size cap such as 4MB or 2MiB"


def parse_limit(text: str) -> tuple[str, float]:
    """Parse one budget term such as ``3m`` or ``2e15flops`` into (limit name, amount).

    Lower-case ``m`` is minutes and upper-case ``M`` is mega (tokens), as people write them.  A byte unit
    (``kB``, ``MB``, ``GB``: decimal, as Parameter Golf's 16 MB artifact; ``KiB``, ``MiB``, ``GiB``: binary;
    ``bytes``) gives ``size``; ``B`` alone stays billions of tokens and ``5M`` mega tokens.
    """
    match = _PATTERN.match(text)
    if not match:
        raise FlopwiseError(f"budget '{text}' is not a number with a unit: {_EXAMPLES}")
    value, unit = float(match.group(1)), match.group(2)
    if unit.lower() in _SIZE_UNITS:
        name, amount = SIZE, value * _SIZE_UNITS[unit.lower()]
    elif unit in _TIME_UNITS:
        name, amount = "seconds", value * _TIME_UNITS[unit]
    else:
        prefix, word = _split_si_prefix(unit)
        if word is None:
            raise FlopwiseError(f"budget '{text}' has an unknown unit '{unit}': {_EXAMPLES}")
        name, amount = _WORD_UNITS[word], value * _SI[prefix]
    if not (amount > 0 and math.isfinite(amount)):
        raise FlopwiseError(f"budget '{text.strip()}' (budget.{name}={amount:g}) must be a positive number: "
                            f"{_EXAMPLES}")
    return name, amount


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# a budget's size units: a bare 'b' is not one, since 'B' alone is billions of tokens
_SIZE_UNITS = {**{unit: size for unit, size in _BYTE_UNITS.items() if unit != "b"}, "bytes": 1, "byte": 1}
_BYTES = _PATTERN  # a number (signed: memory.limit refuses a negative one) and a unit


def parse_bytes(text: str) -> float:
    """A memory size: ``8GiB``, ``512MiB``, ``16GB`` or a plain number of bytes."""
    match = _BYTES.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _BYTE_UNITS):
        raise FlopwiseError(f"memory size '{text}' is not understood: use e.g. 8GiB, 512MiB or 16GB")
    return float(match.group(1)) * _BYTE_UNITS.get(unit, 1)


def format_bytes(amount: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``: binary units, as torch.cuda.memory_summary prints."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(amount) >= size:
            return f"{amount / size:.2f} {unit}" if unit == "GiB" else f"{amount / size:.1f} {unit}"
    return f"{amount:.0f} B"


MAX_RUN_SECONDS = 365 * 86400  # a budget that cannot be spent within a year at the device's peak is a mistake


def check_spendable(budget: Budget, per_step: dict[str, float], peak_flops: float, device: str) -> None:
    """Refuse a budget that even ``device``'s best speed (``peak_flops``) could not spend within MAX_RUN_SECONDS
    (``--budget 1e30flops`` on a small model), which would otherwise train at a vanishing learning rate with an
    ETA of ages.  ``per_step``: what one optimizer step spends of the limits counted in steps' units (tokens,
    flops, steps).  A seconds limit bounds the run by itself.  `train` checks its run with it and `plan` its
    plan, so that a plan never suggests a run that `train` refuses."""
    limits = budget.set_limits()
    steps = [limits[name] / amount for name, amount in per_step.items() if name in limits]
    if "seconds" in limits or not steps:
        return
    fastest = min(steps) * per_step["flops"] / peak_flops
    if fastest > MAX_RUN_SECONDS:
        raise FlopwiseError(f"the budget {budget.describe()} would take at least {fastest / 86400 / 365:.3g} years "
                            f"on {device} ({peak_flops:.3g} FLOP/s at best): give a smaller budget, or add a time "
                            "limit to it (--budget <yours>,24h ends at whichever is reached first)")


def _split_si_prefix(unit: str) -> tuple[str, str | None]:
    """Split ``Mtok`` into ('M', 'tok'); the word part is matched case-insensitively."""
    for prefix in ("",) + tuple(_SI):
        if prefix and not unit.startswith(prefix):
            continue
        word = unit[len(prefix):].lower()
        if word in _WORD_UNITS:
            return prefix, word
    return "", None


@dataclass
class Budget:
    """The limits of a run; unset limits are None."""

    seconds: float | None = None
    flops: float | None = None
    tokens: float | None = None
    steps: float | None = None
    size: float | None = None  # bytes of the exported model (final/), a cap rather than a spend limit

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"3m"`` or ``"3m,5M"`` (several limits, comma- or plus-separated; a plus after an
        exponent's e, as in ``1.92e+19flops``, belongs to the number)."""
        budget = cls()
        for term in re.split(r",|(?<![eE])\+", text):
            if term.strip():
                name, amount = parse_limit(term)
                setattr(budget, name, amount)
        budget.validate()
        return budget

    def validate(self) -> None:
        if not self.is_set() and self.size is not None:
            raise FlopwiseError(f"the budget {format_amount(SIZE, self.size)} caps the model's size but sets no "
                                "limit to spend: add a time, FLOP, token or step limit, e.g. --budget 2m,"
                                f"{format_amount(SIZE, self.size).replace(' ', '')}")
        if not self.is_set():
            raise FlopwiseError(f"the budget sets no limit: give --budget, {_EXAMPLES}")
        for name in (*LIMITS, SIZE):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise FlopwiseError(f"budget.{name}={value} must be a positive number")

    def is_set(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMITS)

    def set_limits(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LIMITS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def config_values(self) -> dict[str, float | None]:
        """This budget as the dotted config keys that set it (``budget.seconds``...), unset limits as None."""
        return {f"budget.{name}": value for name, value in self.to_dict().items()}

    def describe(self) -> str:
        cap = [] if self.size is None else [f"size <= {format_amount(SIZE, self.size)}"]
        return ", ".join([*(format_amount(name, value) for name, value in self.set_limits().items()), *cap])

    def as_flag(self) -> str:
        """This budget as ``--budget`` reads it back exactly (``1e+17flops,40.0steps,4000000.0bytes``), for
        commands to suggest."""
        units = {"seconds": "s", "flops": "flops", "tokens": "tokens", "steps": "steps", SIZE: "bytes"}
        terms = {**self.set_limits(), **({} if self.size is None else {SIZE: self.size})}
        return ",".join(f"{float(value)!r}{units[name]}" for name, value in terms.items())


@dataclass
class Meter:
    """What a run has spent.  Seconds count training steps only, not evaluation or saving."""

    seconds: float = 0.0
    flops: float = 0.0
    tokens: float = 0.0
    steps: float = 0.0

    def add_step(self, seconds: float, tokens: float, flops: float) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def progress(self, budget: Budget) -> float:
        """p = the largest fraction spent over the limits that are set (1.0 ends the run)."""
        return max(getattr(self, name) / limit for name, limit in budget.set_limits().items())

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Meter:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class StepCost:
    """What one step spends of each limit; ``seconds`` is None until a step has been timed."""

    tokens: float
    flops: float
    seconds: float | None
    steps: float = 1.0


def steps_left(meter: Meter, budget: Budget, tokens_per_step: float, flops_per_step: float,
               seconds_per_step: float | None) -> int | None:
    """How many more steps the budget allows when every step costs the same; see ``scheduled_steps_left``."""
    cost = StepCost(tokens_per_step, flops_per_step, seconds_per_step)
    return scheduled_steps_left(meter, budget, lambda p: cost)


def scheduled_steps_left(meter: Meter, budget: Budget, cost_at: Callable[[float], StepCost],
                         breakpoints: Sequence[float] = ()) -> int | None:
    """How many more steps the budget allows, counting the next one; None if unknown yet.

    ``cost_at(p)``: the cost of a step taken at progress p, constant between ``breakpoints`` (progressive
    training's shapes).  The future is walked segment by segment: in each, the steps until p reaches the next
    breakpoint are counted in closed form.  Token, FLOP and step limits are exact; a seconds limit uses the
    (predicted) step time and its last count is rounded to the nearest step, so the run lands as close to the
    budget as a step allows.
    """
    every = budget.set_limits()
    spent = {name: getattr(meter, name) for name in every}

    def progress() -> float:  # a seconds limit not yet timed keeps the share it has spent
        return max(spent[name] / limit for name, limit in every.items())

    limits = dict(every)
    if cost_at(progress()).seconds is None:  # not timed yet: the other limits count alone
        limits.pop("seconds", None)
        if not limits:
            return None
    taken = 0
    for mark in sorted(b for b in breakpoints if progress() < b < 1.0):  # steps that start below the mark
        per_step = {name: getattr(cost_at(progress()), name) for name in limits}
        count = max(1, min(math.ceil((mark * limit - spent[name]) / per_step[name] - 1e-9)
                           for name, limit in limits.items()))
        taken += count
        for name in limits:
            spent[name] += count * per_step[name]
        if progress() >= 1.0:
            return taken
    per_step = {name: getattr(cost_at(progress()), name) for name in limits}
    counts = {name: (limit - spent[name]) / per_step[name] for name, limit in limits.items()}
    return taken + max(1, min(round(c) if name == "seconds" else math.ceil(c - 1e-9) for name, c in counts.items()))


def format_amount(name: str, value: float) -> str:
    """Human form of one limit: ``3.0m``, ``2.0e+15 FLOPs``, ``5.00M tokens``."""
    if name == "seconds":
        if value >= 3600:
            return f"{value / 3600:.2f}h"
        return f"{value / 60:.1f}m" if value >= 120 else f"{value:.0f}s"
    if name == "flops":
        return f"{value:.2e} FLOPs"
    if name == "steps":
        return f"{value:.0f} steps"
    if name == SIZE:
        return format_size(value)
    return f"{format_count(value)} tokens"


def format_size(value: float) -> str:
    """An artifact's bytes in the decimal units a size budget is written in: ``4.00 MB``, ``500.0 kB``."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}" if unit != "kB" else f"{value / scale:.1f} {unit}"
    return f"{value:.0f} bytes"


def format_count(value: float) -> str:
    """A count from hundreds (a test run) to trillions (a cluster's plan): ``950``, ``12.30k``, ``18.13B``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


class BudgetSection(Section):
    """Limits of the run; numbers or strings with units (``seconds = "3m"``)."""

    seconds: float | None = None
    flops: float | None = None
    tokens: float | None = None
    steps: float | None = None
    size: float | None = None

    @field_validator(*LIMITS, SIZE, mode="before")
    @classmethod
    def _units(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            try:
                name, amount = parse_limit(value)
            except FlopwiseError as err:  # as a ValueError, so the refusal names the key
                raise ValueError(str(err)) from None
            if name != info.field_name:
                raise ValueError(f"'{value}' is a {name} amount, not {info.field_name}")
            return amount
        return value

    _limits = in_range(*LIMITS, SIZE, low=0, above=True)

    def build(self) -> Budget:
        budget = Budget(**self.model_dump())
        budget.validate()
        return budget
