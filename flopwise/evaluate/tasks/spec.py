"""What a task is: examples scored by log-likelihood (multiple choice, cloze) or by generation (exact match),
and the documented JSONL file that holds one task.

One example per line.  Multiple choice (a cloze is the same, its choices being the candidate words):

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}

Generation, scored by exact match after stripping leading and trailing whitespace:

    {"context": "2 + 2 =", "target": "4", "until": ["\\n"]}

Each choice is appended to the context as it is written, so the space between them belongs in the choice (as
lm-eval's ``target_delimiter`` puts it there); ``until`` (default ``["\\n"]``) lists the strings that end a
generation.  The task's name is the file's stem; every line of a file must be of one kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flopwise.data.sources import jsonl_lines
from flopwise.errors import FlopwiseError

Kind = Literal["choice", "generate"]
DEFAULT_UNTIL = ("\n",)
DEFAULT_MAX_NEW_TOKENS = 32  # a generation task's answer is short; its until strings usually end it sooner


@dataclass(frozen=True)
class Example:
    """One item: a context and either the choices with the right one's index, or the target text to generate.
    ``delimiter`` goes between the context and each choice, scored with it but not counted in the choice's
    length (lm-eval's ``target_delimiter``; a JSONL task writes it into its choices instead).  ``verify``: a
    generation's own check (an RL task's verifier), where exact match is not the task's rule."""

    context: str
    choices: tuple[str, ...] = ()
    answer: int = 0
    target: str = ""
    until: tuple[str, ...] = DEFAULT_UNTIL
    delimiter: str = ""
    verify: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class Task:
    """A named list of examples of one kind; ``source`` says where it came from (a file, or "built-in")."""

    name: str
    kind: Kind
    examples: tuple[Example, ...]
    source: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @property
    def random_baseline(self) -> float:
        """The accuracy of guessing: the mean of 1/choices for multiple choice, 0 for exact match."""
        if self.kind == "generate" or not self.examples:
            return 0.0
        return sum(1.0 / len(e.choices) for e in self.examples) / len(self.examples)

    def head(self, count: int | None) -> Task:
        """The first ``count`` examples (all when None), as a task of the same name."""
        if count is None or count >= len(self.examples):
            return self
        return Task(self.name, self.kind, self.examples[:count], self.source, self.max_new_tokens)


def check_examples(task: Task) -> Task:
    """Refuse an empty task in one line (a task with no examples has no accuracy)."""
    if not task.examples:
        raise FlopwiseError(f"task '{task.name}' ({task.source}) has no examples: give it at least one line")
    return task


def read_task_file(path: Path) -> Task:
    """A JSONL task file (format above), each record checked; the first bad one is named by line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FlopwiseError(f"task file '{path}' cannot be read ({err}): give a UTF-8 JSONL file") from None
    kind: Kind | None = None
    examples = []
    for number, line in jsonl_lines(text):
        where = f"task file '{path}' line {number}"
        record = _record(line, where)
        this_kind: Kind = "generate" if "target" in record and "choices" not in record else "choice"
        if kind is not None and this_kind != kind:
            raise FlopwiseError(f"{where} is a {this_kind} example after {kind} ones: keep one kind per file")
        kind = this_kind
        examples.append(_generation(record, where) if kind == "generate" else _choice(record, where))
    return check_examples(Task(path.stem, kind or "choice", tuple(examples), str(path)))


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise FlopwiseError(f"{where} is not JSON ({err.msg}): write one JSON object per line") from None
    if not isinstance(record, dict):
        raise FlopwiseError(f"{where} is not a JSON object: write {{\"context\": ..., \"choices\": [...], "
                            "\"answer\": 0}} or {\"context\": ..., \"target\": ...}")
    if "context" not in record:
        raise FlopwiseError(f"{where} has no field 'context': every example needs the text it is scored after")
    if not isinstance(record["context"], str):
        raise FlopwiseError(f"{where} field 'context' must be a string")
    return record


def _choice(record: dict[str, Any], where: str) -> Example:
    for field in ("choices", "answer"):
        if field not in record:
            raise FlopwiseError(f"{where} has no field '{field}': a multiple-choice example needs 'choices' "
                                "(a list of strings) and 'answer' (the right one's index); a generation "
                                "example needs 'target'")
    choices = record["choices"]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise FlopwiseError(f"{where} field 'choices' must be a list of two or more non-empty strings")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FlopwiseError(f"{where} field 'answer' is {answer!r}, out of range for {len(choices)} choices: give "
                            f"the right choice's index, 0 to {len(choices) - 1}")
    return Example(record["context"], tuple(choices), answer)


def _generation(record: dict[str, Any], where: str) -> Example:
    target = record["target"]
    if not isinstance(target, str) or not target.strip():
        raise FlopwiseError(f"{where} field 'target' must be a non-empty string")
    until = record.get("until", list(DEFAULT_UNTIL))
    if not (isinstance(until, list) and all(isinstance(u, str) and u for u in until)):
        raise FlopwiseError(f"{where} field 'until' must be a list of non-empty strings, e.g. [\"\\n\"]")
    return Example(record["context"], target=target, until=tuple(until))
