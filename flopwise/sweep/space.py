"""The search space of a sweep: a TOML file with one table per config key, read strictly.

    [optim.lr]                  # a float between low and high, on a log scale
    low = 1e-4
    high = 3e-2
    log = true

    [model.d_model]             # an int (low and high are ints), in steps of 32
    low = 64
    high = 256
    step = 32

    [optim.batch_size]          # one of these values
    choices = [8, 16, 32]

Tables may be nested (``[optim.lr]``) or quoted (``["optim.lr"]``); a table with ``low``/``high`` or
``choices`` is a parameter.  Every endpoint and choice is validated as the config would validate it, so an
unknown key or a value outside a key's range is refused in one line before any trial runs.  The budget keys
are refused: a trial's budget is ``--trial-budget``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PARAMETER_FIELDS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Parameter:
    """One config key's range: ``choices``, or ``low``..``high`` (ints when both are ints), optionally on a
    log scale or in steps."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from flopwise.sweep.optuna_dep import require_optuna

        distributions = require_optuna().distributions
        if self.choices is not None:
            return distributions.CategoricalDistribution(list(self.choices))
        if self.is_int:
            return distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                 step=int(self.step or 1))
        return distributions.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    source: str

    def distributions(self) -> dict[str, Any]:
        return {p.key: p.distribution() for p in self.parameters}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's config values (dotted keys), drawn by ``suggest_float``, ``suggest_int`` or
        ``suggest_categorical`` as the parameter's kind says, so Optuna's samplers see the space as declared."""
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.choices is not None:
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
            elif p.is_int:
                values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
        return values


def read_space(path: Path) -> SearchSpace:
    """The search space in ``path``, every parameter checked against the run config."""
    if not path.is_file():
        raise FlopwiseError(f"search space '{path}' does not exist: give a TOML file (docs/sweeps.md shows one)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FlopwiseError(f"search space '{path}' is not valid TOML: {str(err).splitlines()[0]}") from None
    tables = list(_parameter_tables(data, ""))
    if not tables:
        raise FlopwiseError(f"search space '{path}' has no parameter: add a table such as [optim.lr] with low and "
                            "high, or choices")
    return SearchSpace(tuple(_parameter(key, table, path) for key, table in tables), str(path))


def _parameter_tables(data: dict[str, Any], prefix: str):
    """(dotted key, table) of every parameter table, nested or quoted."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(value, dict):
            raise _error(None, key, f"is {value!r}: give a table with low and high, or choices")
        if PARAMETER_FIELDS & set(value):
            yield key, value
        else:
            yield from _parameter_tables(value, f"{key}.")


def _parameter(key: str, table: dict[str, Any], path: Path) -> Parameter:
    unknown = sorted(set(table) - PARAMETER_FIELDS)
    if unknown:
        raise _error(path, key, f"has the unknown field '{unknown[0]}': use low, high, log, step or choices")
    if key.startswith("budget."):
        raise _error(path, key, "is a budget: a trial's budget is --trial-budget, the sweep's --budget")
    if "choices" in table:
        parameter = _choices(key, table, path)
        values = list(parameter.choices)
    else:
        parameter = _range(key, table, path)
        values = [parameter.low, parameter.high]
    for value in values:
        _check_config_value(key, value, path)
    return parameter


def _choices(key: str, table: dict[str, Any], path: Path) -> Parameter:
    choices = table["choices"]
    if set(table) != {"choices"}:
        raise _error(path, key, "gives choices and a range: give one of the two")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _error(path, key, "choices must be a list of at least two values")
    if len(set(map(repr, choices))) < len(choices):
        raise _error(path, key, "choices repeat a value: list each once")
    return Parameter(key, choices=tuple(choices))


def _range(key: str, table: dict[str, Any], path: Path) -> Parameter:
    if "low" not in table or "high" not in table:
        raise _error(path, key, "needs low and high (or choices)")
    low, high, log, step = table["low"], table["high"], table.get("log", False), table.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise _error(path, key, f"{name} = {value!r} is not a finite number")
    if not isinstance(log, bool):
        raise _error(path, key, f"log = {log!r}: give true or false")
    if not low < high:
        raise _error(path, key, f"low = {low} is not below high = {high}")
    if log and low <= 0:
        raise _error(path, key, f"log = true needs low > 0 (low = {low})")
    if step is not None:
        if log:
            raise _error(path, key, "step and log = true cannot be combined")
        if step <= 0:
            raise _error(path, key, f"step = {step} must be positive")
        if isinstance(low, int) and isinstance(high, int) and (not isinstance(step, int) or (high - low) % step):
            raise _error(path, key, f"step = {step} must be a whole number dividing high - low = {high - low}")
    return Parameter(key, low, high, log, step)


def _check_config_value(key: str, value: Any, path: Path) -> None:
    """The value as the run config would take it: unknown keys and out-of-range values are refused."""
    from flopwise.config import load_config

    try:
        load_config(values={key: value})
    except FlopwiseError as err:
        reason = str(err).split(": ", 1)[-1] if str(err).startswith("config (") else str(err)
        reason = reason.removeprefix(f"{key}={value}: ")
        raise _error(path, key, f"= {value!r} is not a valid config value: {reason}") from None


def _error(path: Path | None, key: str, problem: str) -> FlopwiseError:
    where = f"search space '{path}'" if path is not None else "search space"
    return FlopwiseError(f"{where}: [{key}] {problem}")
