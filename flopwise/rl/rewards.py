"""Rewards for reinforcement learning: a task's verifier (1.0 right, 0.0 wrong), or a function the user names.

The verifiers, lenient only where a correct reply commonly differs in form:

- ``exact``: the completion's first non-empty line, with surrounding whitespace, a trailing period and surrounding
  backticks or quotes removed, equals the answer normalized the same way.  Case-sensitive: module names and
  Python values are case-sensitive, and "True" is not "true".
- ``numeric``: the first number in the completion (an optional leading minus, digits, an optional decimal part;
  no thousands separators or exponents, so "1,234" reads as 1) is within ``task.tolerance * max(1, |answer|)``
  of the answer.
- ``regex``: ``re.search(answer, completion)`` finds a match anywhere.

A user's reward function, named ``module:function`` or ``path/to/file.py:function``, is called as
``function(prompt_text, completion, record)`` with the task's JSON record and must return a real, finite number;
``True``/``False`` count as 1.0/0.0, so a checker that returns a bool works as it is.  Importing it runs the
user's code, so it is imported only when the run names it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.posttrain.conversations import quoted
from flopwise.rl.tasks import VERIFIERS, Task

RewardFunction = Callable[[str, str, Mapping[str, Any]], float]  # (prompt text, completion, record) -> reward
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_QUOTES = "`'\""
_SIGNATURE = "a function (prompt, completion, record) -> float"


# ---------------------------------------------------------------- verifiers


def verify(task: Task, completion: str) -> bool:
    """Whether ``completion`` answers ``task`` correctly by its verifier."""
    if task.verifier == "exact":
        return _normalized(completion) == _normalized(task.answer)
    if task.verifier == "numeric":
        found = _NUMBER.search(completion)
        if found is None:
            return False
        answer = float(task.answer)
        return abs(float(found.group()) - answer) <= task.tolerance * max(1.0, abs(answer))
    if task.verifier == "regex":
        return re.search(task.answer, completion) is not None
    raise FlopwiseError(f"task verifier {task.verifier!r} is unknown: use one of {', '.join(VERIFIERS)}")


def _normalized(text: str) -> str:
    """The first non-empty line, stripped of whitespace, a trailing period and surrounding backticks or quotes
    ('`json`.' and '"json"' are json)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.removesuffix(".").strip()
    while len(line) >= 2 and line[0] == line[-1] and line[0] in _QUOTES:
        line = line[1:-1].strip()
    return line


# ---------------------------------------------------------------- a user's reward function


def load_reward_function(spec: str) -> RewardFunction:
    """The function ``spec`` names: ``module:function`` (imported from sys.path) or ``path/to/file.py:function``."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise FlopwiseError(f"--reward {spec!r} names no function: write module:function or "
                            "path/to/file.py:function")
    file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(Path(where), spec) if file else _import_module(where, spec)
    if not hasattr(module, name):
        raise FlopwiseError(f"--reward {spec}: '{where}' has no attribute {name!r}: name {_SIGNATURE} it defines")
    function = getattr(module, name)
    if not callable(function):
        raise FlopwiseError(f"--reward {spec}: {name} is a {type(function).__name__}, not callable: name "
                            f"{_SIGNATURE}")
    return function


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise FlopwiseError(f"--reward {spec}: module '{name}' could not be imported ({_first_line(error)}): "
                            "install it, or add its folder to PYTHONPATH") from None
    except Exception as error:  # the user's module itself failed: say so in one line, not a traceback
        raise FlopwiseError(f"--reward {spec}: importing '{name}' raised {_raised(error)}: fix the module") from None


def _import_file(path: Path, spec: str) -> ModuleType:
    """The file run as a module, registered in sys.modules first as importlib's recipe does (dataclasses and
    pickling look their module up there)."""
    if not path.is_file():
        raise FlopwiseError(f"--reward {spec}: the file '{path}' does not exist: give the path of a Python file")
    module_name = f"flopwise_reward_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise FlopwiseError(f"--reward {spec}: '{path}' cannot be loaded as Python: give a .py file")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as error:  # the user's file failed: one line, not a traceback
        del sys.modules[module_name]
        raise FlopwiseError(f"--reward {spec}: running '{path}' raised {_raised(error)}: fix the file") from None
    return module


# ---------------------------------------------------------------- scoring


class Rewarder:
    """Scores completions: the verifier's 1.0/0.0, or the user's function."""

    def __init__(self, function: RewardFunction | None = None, name: str | None = None) -> None:
        self.function = function
        self.name = name or (getattr(function, "__qualname__", repr(function)) if function else "verifier")

    def __call__(self, task: Task, prompt_text: str, completion: str) -> float:
        """The reward of ``completion``; a failing or non-numeric user function stops the run in one line, as a
        silently wrong reward would train toward it."""
        if self.function is None:
            return 1.0 if verify(task, completion) else 0.0
        where = f"(on a completion of the prompt {quoted(prompt_text)})"
        try:
            value = self.function(prompt_text, completion, task.record)
        except Exception as error:
            raise FlopwiseError(f"--reward {self.name} raised {_raised(error)} {where}: fix the function; the run's "
                                "last checkpoint is kept") from error
        if not isinstance(value, (numbers.Real, np.bool_)):
            raise FlopwiseError(f"--reward {self.name} returned a {type(value).__name__} "
                                f"({quoted(repr(value))}), not a number {where}: return a finite float")
        reward = float(value)
        if not math.isfinite(reward):
            raise FlopwiseError(f"--reward {self.name} returned {reward} {where}: return a finite float")
        return reward


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _raised(error: BaseException) -> str:
    """'ValueError: bad input', or just 'ValueError' when the exception has no message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
