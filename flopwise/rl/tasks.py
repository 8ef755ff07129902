"""Tasks for reinforcement learning with verifiable rewards: prompts whose answers a program can check.

A task is a prompt (a conversation ending in a user turn), a reference answer and the verifier that compares a
completion with it (flopwise/rl/rewards.py).  Users give JSONL files (``read_tasks``); without them the run uses
built-in tasks generated offline from the running Python (``builtin_tasks``), deterministic for a seed and a
Python version and platform, with nothing shipped or written to disk:

- ``arithmetic``: "What is 7 + 5?", single- and two-digit addition and subtraction and small multiplication,
  checked by the numeric verifier.  Every one-digit sum and difference and the times table up to 9 are in the
  pool, so a tiny model after a short SFT gets some right; the two-digit items are harder.
- ``modules``: "Which standard-library module defines `heappush`?", over the public functions and classes that
  exactly one of a fixed list of always-present stdlib modules defines (found with ``dir()``; a name that module
  only imports from another is skipped), checked by the exact verifier.
- ``expressions``: "What does the Python expression `len('abc') + 2` evaluate to?", small expressions over ints,
  short strings and len/abs/min/max/sum, generated here and evaluated with ``eval`` under empty builtins plus
  those five functions; the answer is ``str`` of the value (a string without quotes), checked by the exact
  verifier, so ints and strings are judged alike.

The held-out split is disjoint from training in the items themselves: held-out operand pairs (3 + 5 and 5 + 3
are one item), names and expressions never appear in training.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flopwise.config import PostTrainSection
from flopwise.errors import FlopwiseError
from flopwise.posttrain.builtin_data import builtin_instructions
from flopwise.posttrain.conversations import (
    OPENAI,
    Conversation,
    Message,
    RecordLine,
    json_records,
    json_type,
    parse_messages,
    quoted,
)
from flopwise.posttrain.data import BUILTIN_TASKS, read_split

VERIFIERS = ("exact", "numeric", "regex")
BUILTIN_KINDS = ("arithmetic", "modules", "expressions")
DEFAULT_TOLERANCE = 1e-6
HELD_OUT_PER_KIND = 64
ARITHMETIC_TRAIN = 900
EXPRESSIONS_TRAIN = 700  # the modules kind trains on every name it does not hold out (about 650)
# Modules every CPython build has, importable without side effects (no optional C extensions such as sqlite3,
# ssl or tkinter), whose public names make sensible questions.
STDLIB_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
                  "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq",
                  "html", "inspect", "io", "itertools", "json", "keyword", "logging", "math", "operator", "os",
                  "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "statistics", "string",
                  "struct", "tempfile", "textwrap", "threading", "time", "traceback", "types", "typing", "uuid",
                  "warnings", "weakref")
EXPRESSION_FUNCTIONS: Mapping[str, Callable[..., Any]] = {"len": len, "abs": abs, "min": min, "max": max, "sum": sum}
_WORDS = ("a", "ab", "abc", "cat", "dog", "sun", "tree", "data", "byte", "model", "py", "x", "hello", "io")
_ANSWER_NUMBER = " Answer with the number only."
_ARITHMETIC_QUESTIONS = ("What is {}?" + _ANSWER_NUMBER, "Compute {}." + _ANSWER_NUMBER,
                         "{} = ?" + _ANSWER_NUMBER)
_MODULE_QUESTIONS = ("Which standard-library module defines `{}`? Answer with the module name only.",
                     "In which Python standard-library module is `{}` defined? Answer with the module name only.")
_EXPRESSION_QUESTION = "What does the Python expression `{}` evaluate to? Answer with the value only."


@dataclass(frozen=True)
class Task:
    """One prompt with a checkable answer."""

    messages: tuple[Message, ...]  # the prompt: a conversation ending in a user turn (a system message may lead)
    answer: str  # the reference answer as text; for the regex verifier, the pattern
    verifier: str  # one of VERIFIERS
    source: str  # "built-in:<kind>" or the file the task came from
    record: Mapping[str, Any] = field(hash=False)  # the JSON object as read, for a user's reward function
    tolerance: float = DEFAULT_TOLERANCE  # numeric only: |given - answer| <= tolerance * max(1, |answer|)


# ---------------------------------------------------------------- built-in tasks


def builtin_tasks(seed: int) -> tuple[list[Task], list[Task]]:
    """(train, held-out) built-in tasks: HELD_OUT_PER_KIND of each kind held out; training shuffled by the seed
    so that any prefix mixes the kinds."""
    train: list[Task] = []
    held_out: list[Task] = []
    for kind, make in (("arithmetic", _arithmetic), ("modules", _modules), ("expressions", _expressions)):
        tasks = make(random.Random(f"flopwise-rl-{kind}:{seed}"))
        held_out += tasks[:HELD_OUT_PER_KIND]
        train += tasks[HELD_OUT_PER_KIND:]
    random.Random(f"flopwise-rl-order:{seed}").shuffle(train)
    return train, held_out


def _builtin(kind: str, prompt: str, answer: str, verifier: str) -> Task:
    return Task((Message("user", prompt),), answer, verifier, f"built-in:{kind}",
                {"prompt": prompt, "answer": answer, "verifier": verifier})


def _arithmetic(rng: random.Random) -> list[Task]:
    """Every easy item plus a seeded sample of the harder ones, shuffled; an item is an operator and its operands
    (unordered for + and *), written in a random order, so a held-out pair is held out both ways round."""
    easy = ([("+", a, b) for a in range(10) for b in range(a, 10)]
            + [("-", a, b) for a in range(10) for b in range(a + 1)]
            + [("*", a, b) for a in range(2, 10) for b in range(a, 10)])
    hard = ([("+", a, b) for a in range(10, 100) for b in range(a, 100)]
            + [("-", a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
            + [("*", a, b) for a in range(2, 13) for b in range(max(a, 10), 13)])
    items = easy + rng.sample(hard, HELD_OUT_PER_KIND + ARITHMETIC_TRAIN - len(easy))
    rng.shuffle(items)
    tasks = []
    for op, a, b in items:
        if op != "-" and rng.random() < 0.5:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        tasks.append(_builtin("arithmetic", rng.choice(_ARITHMETIC_QUESTIONS).format(f"{a} {op} {b}"), str(value),
                              "numeric"))
    return tasks


def _modules(rng: random.Random) -> list[Task]:
    names = list(_module_names())
    rng.shuffle(names)
    return [_builtin("modules", rng.choice(_MODULE_QUESTIONS).format(name), module, "exact")
            for name, module in names]


@functools.cache
def _module_names() -> tuple[tuple[str, str], ...]:
    """(name, module) for each public function or class that exactly one of STDLIB_MODULES has and defines
    itself (or in its C accelerator, ``_heapq`` for ``heapq``), sorted; cached, as imports cost time once."""
    holders: dict[str, list[str]] = {}
    for module in STDLIB_MODULES:
        for name in dir(importlib.import_module(module)):
            if not name.startswith("_"):
                holders.setdefault(name, []).append(module)
    return tuple(sorted((name, modules[0]) for name, modules in holders.items()
                        if len(modules) == 1 and _defines(modules[0], name)))


def _defines(module: str, name: str) -> bool:
    value = getattr(importlib.import_module(module), name)
    if not (inspect.isclass(value) or inspect.isroutine(value)):
        return False  # constants and imported modules: their __module__ says nothing about who defines them
    home = getattr(value, "__module__", None) or ""
    return home.split(".")[0].lstrip("_") == module


def _expressions(rng: random.Random) -> list[Task]:
    """Distinct generated expressions with their values; about a quarter have string values."""
    texts: dict[str, None] = {}
    while len(texts) < HELD_OUT_PER_KIND + EXPRESSIONS_TRAIN:
        texts[_string_expression(rng) if rng.random() < 0.25 else _int_expression(rng, rng.randint(0, 2))] = None
    return [_builtin("expressions", _EXPRESSION_QUESTION.format(text), str(_evaluate(text)), "exact")
            for text in texts]


def _evaluate(text: str) -> object:
    """The value of a generated expression: ``eval`` with no builtins but EXPRESSION_FUNCTIONS.  Only for the
    text this module writes; never for a user's."""
    return eval(text, {"__builtins__": {}, **EXPRESSION_FUNCTIONS})


def _int_expression(rng: random.Random, depth: int) -> str:
    """An int-valued expression; depth 0 is one term (the easy ones), deeper ones combine terms with + - *."""
    if depth > 0 and rng.random() < 0.7:
        left, right = _int_expression(rng, depth - 1), _int_expression(rng, depth - 1)
        text = f"{left} {rng.choice('+-*')} {right}"
        return f"({text})" if depth == 1 and rng.random() < 0.3 else text
    numbers = [rng.randint(0, 9) for _ in range(3)]
    return rng.choice((str(numbers[0]), f"len('{rng.choice(_WORDS)}')", f"abs({-numbers[0]})",
                       f"min({numbers[0]}, {numbers[1]})", f"max({numbers[0]}, {numbers[1]})",
                       f"sum([{numbers[0]}, {numbers[1]}, {numbers[2]}])"))


def _string_expression(rng: random.Random) -> str:
    first, second = rng.sample(_WORDS, 2)
    return rng.choice((f"'{first}' + '{second}'", f"'{first}' * {rng.randint(2, 3)}", f"max('{first}', '{second}')",
                       f"min('{first}', '{second}')"))


# ---------------------------------------------------------------- task files


def read_tasks(path: Path) -> list[Task]:
    """The tasks of a JSONL file, in file order: ``prompt`` (a string, or OpenAI-style messages ending in a user
    turn), ``answer`` (a string or a number), ``verifier`` (default "exact") and, for the numeric verifier,
    ``tolerance``.  Other fields are kept in ``record`` for a reward function."""
    path = Path(path)
    tasks = [_task(record, line) for line, record in json_records(path, "tasks")]
    if not tasks:
        raise FlopwiseError(f"tasks file '{path}' has no tasks: write one JSON object per line with a 'prompt' and "
                            "its 'answer'")
    return tasks


def _task(record: dict, line: RecordLine) -> Task:
    messages = _prompt(record, line)
    verifier = record.get("verifier", "exact")
    if verifier not in VERIFIERS:
        shown = quoted(verifier) if isinstance(verifier, str) else f"a JSON {json_type(verifier)}"
        raise line.error(f"is {shown}: use one of {', '.join(VERIFIERS)}", "verifier")
    return Task(messages, _answer(record, line, verifier), verifier, str(line.path), record,
                _tolerance(record, line, verifier))


def _prompt(record: dict, line: RecordLine) -> tuple[Message, ...]:
    if "prompt" not in record:
        raise line.error("is missing: give each record the prompt, as a string or a list of messages", "prompt")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        messages = parse_messages(prompt, "prompt", line, OPENAI)
        if messages[-1].role != "user":
            raise line.error(f"ends with a {messages[-1].role} turn: a task's prompt must end with the user turn "
                             "the model answers", "prompt")
        return tuple(messages)
    if isinstance(prompt, str) and prompt.strip():
        return (Message("user", prompt),)
    shown = "empty" if isinstance(prompt, str) else f"a JSON {json_type(prompt)}"
    raise line.error(f"is {shown}: give the prompt as a string or a list of messages", "prompt")


def _answer(record: dict, line: RecordLine, verifier: str) -> str:
    """The answer as text: a JSON number as Python writes it (42, 3.5), checked to suit the verifier."""
    if "answer" not in record:
        raise line.error("is missing: give each record the reference answer the verifier checks", "answer")
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise line.error(f"is a JSON {json_type(value)}: give the answer as a string or a number", "answer")
    answer = str(value)
    if not answer.strip():
        raise line.error("is empty: give each record the reference answer the verifier checks", "answer")
    if verifier == "numeric" and not _finite_number(answer):
        raise line.error(f"is {quoted(answer)}, not a finite number: the numeric verifier compares numbers; "
                         "give it as 42 or 3.5, or use the exact verifier", "answer")
    if verifier == "regex":
        try:
            re.compile(answer)
        except re.error as error:
            raise line.error(f"is not a valid regular expression ({error.msg} at position {error.pos}): fix the "
                             "pattern", "answer") from None
    return answer


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _tolerance(record: dict, line: RecordLine, verifier: str) -> float:
    if "tolerance" not in record:
        return DEFAULT_TOLERANCE
    value = record["tolerance"]
    if verifier != "numeric":
        raise line.error(f"is given for the {verifier} verifier: only the numeric verifier has a tolerance; remove "
                         "it or set \"verifier\": \"numeric\"", "tolerance")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise line.error(f"is a JSON {json_type(value)}: give a number >= 0", "tolerance")
    if not math.isfinite(value) or value < 0:
        raise line.error(f"is {value}: give a finite number >= 0", "tolerance")
    return float(value)


def builtin_sft_data(seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """SFT's built-in data, (train, held-out): the standard-library questions (flopwise/posttrain/builtin_data.py)
    and the built-in tasks with their answers, each on its own split.  The training tasks teach the answers' form
    ("Answer with the number only."), so that `flopwise rl` after `flopwise sft` starts from a model that solves
    some held-out tasks, which RL needs (a group with no right answer teaches nothing).  With the same seed, SFT
    never trains on RL's held-out tasks."""
    instructions, held_instructions = builtin_instructions(seed)
    tasks, held_tasks = builtin_tasks(seed)
    return instructions + answered(tasks), held_instructions + answered(held_tasks)


def answered(tasks: Sequence[Task]) -> list[Conversation]:
    """Each task's prompt followed by its reference answer, as a conversation."""
    return [Conversation((*task.messages, Message("assistant", task.answer)), f"{BUILTIN_TASKS}:{task.source}")
            for task in tasks if task.verifier != "regex"]  # a pattern is not an answer to imitate


def task_split(section: PostTrainSection, seed: int) -> tuple[list[Task], list[Task], list[str]]:
    """(training, held-out) tasks of ``section.data`` (or the built-in ones), and their sources in order."""
    train, heldout = read_split(section, seed, read_tasks, builtin_tasks)
    return train, heldout, list(dict.fromkeys(task.source for task in train + heldout))
