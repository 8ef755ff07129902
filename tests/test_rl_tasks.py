"""RL tasks and rewards: the built-in tasks are right by independent recomputation and held out by item, the
verifiers accept and refuse as documented, task files and reward functions are read or refused in one line."""

from __future__ import annotations

import importlib
import json
import math
import operator
import re
from pathlib import Path

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.posttrain.conversations import Message
from flopwise.rl.rewards import Rewarder, load_reward_function, verify
from flopwise.rl.tasks import BUILTIN_KINDS, Task, builtin_tasks, read_tasks

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def split() -> tuple[list[Task], list[Task]]:
    return builtin_tasks(0)


def kind(tasks: list[Task], name: str) -> list[Task]:
    return [task for task in tasks if task.source == f"built-in:{name}"]


def prompt(task: Task) -> str:
    return task.messages[-1].content


def operands(task: Task) -> tuple[str, frozenset | tuple]:
    """(operator, operands) of an arithmetic task, unordered for + and * (3 + 5 is the item 5 + 3)."""
    a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", prompt(task)).groups()
    return op, (int(a), int(b)) if op == "-" else frozenset((int(a), int(b)))


def item(task: Task) -> object:
    """What a task asks about, independent of the question's wording."""
    if task.source == "built-in:arithmetic":
        return operands(task)
    return re.search(r"`([^`]+)`", prompt(task)).group(1)


# ---------------------------------------------------------------- built-in tasks


def test_builtin_sizes_and_kinds(split):
    train, held_out = split
    assert len(train) >= 2000
    for name in BUILTIN_KINDS:
        assert len(kind(held_out, name)) == 64
        assert len(kind(train, name)) > 500
    assert {task.source for task in train[:50]} == {f"built-in:{name}" for name in BUILTIN_KINDS}  # mixed order


def test_arithmetic_answers_recomputed_and_include_easy_and_hard(split):
    tasks = kind(split[0] + split[1], "arithmetic")
    for task in tasks:
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", prompt(task)).groups()
        assert float(task.answer) == OPERATORS[op](int(a), int(b))
        assert task.verifier == "numeric" and prompt(task).endswith("Answer with the number only.")
        assert task.record == {"prompt": prompt(task), "answer": task.answer, "verifier": "numeric"}
        assert verify(task, task.answer) and not verify(task, str(int(task.answer) + 1))
    sizes = [max(int(n) for n in re.findall(r"\d+", prompt(task))) for task in tasks]
    assert sum(size < 10 for size in sizes) >= 100 and sum(size >= 10 for size in sizes) >= 500


def test_module_answers_define_the_name(split):
    for task in kind(split[0] + split[1], "modules"):
        name = item(task)
        value = getattr(importlib.import_module(task.answer), name)
        assert callable(value) and not name.startswith("_")
        assert task.verifier == "exact" and verify(task, task.answer) and not verify(task, task.answer + "x")


def test_expression_answers_evaluate_to_their_value(split):
    allowed = {"__builtins__": {}, "len": len, "abs": abs, "min": min, "max": max, "sum": sum}
    values = []
    for task in kind(split[0] + split[1], "expressions"):
        value = eval(item(task), dict(allowed))
        values.append(value)
        assert task.answer == str(value) and task.verifier == "exact"
        assert verify(task, f"`{value!r}`.")  # a string's quotes and code marks are removed
    assert {type(value) for value in values} == {int, str}


def test_held_out_items_never_appear_in_training(split):
    train, held_out = split
    for name in BUILTIN_KINDS:
        trained = {item(task) for task in kind(train, name)}
        held = {item(task) for task in kind(held_out, name)}
        assert len(held) == 64 and not held & trained


def test_same_seed_same_tasks_other_seed_different(split):
    assert builtin_tasks(0) == split
    other_train, other_held_out = builtin_tasks(1)
    assert other_held_out != split[1] and other_train != split[0]


# ---------------------------------------------------------------- verifiers


def task(answer: str, verifier: str, tolerance: float = 1e-6) -> Task:
    return Task((Message("user", "q"),), answer, verifier, "test", {}, tolerance)


@pytest.mark.parametrize("completion, expected", [
    ("json", True), ("  json  \nmore text", True), ("\n\n`json`.", True), ('"json"', True), ("'json'", True),
    ("json.", True), ("Json", False), ("json module", False), ("the answer:\njson", False), ("", False),
])
def test_exact_normalizations(completion, expected):
    assert verify(task("json", "exact"), completion) is expected


@pytest.mark.parametrize("completion, expected", [
    ("12", True), ("The answer is 12.", True), ("12.0000001", True), ("12.01", False), ("-12", False),
    ("1,2", False), ("no number", False), ("11 or 12", False),
])
def test_numeric(completion, expected):
    assert verify(task("12", "numeric"), completion) is expected


def test_numeric_tolerance_is_relative_above_one_and_negative_numbers():
    assert verify(task("1000", "numeric", 0.01), "1009.9") and not verify(task("1000", "numeric", 0.01), "1010.1")
    assert verify(task("0.5", "numeric", 0.01), "0.509") and not verify(task("0.5", "numeric", 0.01), "0.52")
    assert verify(task("-3.5", "numeric"), "x = -3.5") and not verify(task("-3.5", "numeric"), "3.5")
    assert verify(task("0.5", "numeric"), ".5")


def test_regex_searches_anywhere():
    assert verify(task(r"\bjson\b", "regex"), "It is the json module")
    assert not verify(task(r"^json$", "regex"), "jsonx")


# ---------------------------------------------------------------- task files


def write(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_read_tasks_round_trip(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    path = write(tmp_path, {"prompt": "Capital of France?", "answer": "Paris", "id": 7}, "",
                 {"prompt": messages, "answer": 6, "verifier": "numeric", "tolerance": 0.05},
                 {"prompt": "Say hi", "answer": "^[Hh]i", "verifier": "regex"}, {"prompt": "pi?", "answer": 3.5,
                                                                                 "verifier": "numeric"})
    first, second, third, fourth = read_tasks(path)
    assert first == Task((Message("user", "Capital of France?"),), "Paris", "exact", str(path),
                         {"prompt": "Capital of France?", "answer": "Paris", "id": 7})
    assert second.messages == tuple(Message(m["role"], m["content"]) for m in messages)
    assert (second.answer, second.verifier, second.tolerance) == ("6", "numeric", 0.05)
    assert verify(second, "6.29") and not verify(second, "6.31")  # 0.05 * 6
    assert third.verifier == "regex" and verify(third, "hi there") and fourth.answer == "3.5"
    assert first.record["id"] == 7 and first.tolerance == 1e-6


LINE = "tasks file '{path}' line 1"


@pytest.mark.parametrize("line, message", [
    ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes at column 2): write one "
                  "JSON object per line"),
    ("[1, 2]", "is a JSON array, not an object: write one JSON object per line"),
    ({"answer": "x"}, "field 'prompt' is missing: give each record the prompt, as a string or a list of messages"),
    ({"prompt": " ", "answer": "x"}, "field 'prompt' is empty: give the prompt as a string or a list of messages"),
    ({"prompt": 3, "answer": "x"}, "field 'prompt' is a JSON number: give the prompt as a string or a list of "
                                   "messages"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "x"},
     "field 'prompt' ends with a assistant turn: a task's prompt must end with the user turn the model answers"),
    ({"prompt": "q"}, "field 'answer' is missing: give each record the reference answer the verifier checks"),
    ({"prompt": "q", "answer": ""}, "field 'answer' is empty: give each record the reference answer the verifier "
                                    "checks"),
    ({"prompt": "q", "answer": None}, "field 'answer' is a JSON null: give the answer as a string or a number"),
    ({"prompt": "q", "answer": "x", "verifier": "fuzzy"}, "field 'verifier' is 'fuzzy': use one of exact, numeric, "
                                                          "regex"),
    ({"prompt": "q", "answer": "x", "verifier": "numeric"}, "field 'answer' is 'x', not a finite number: the "
     "numeric verifier compares numbers; give it as 42 or 3.5, or use the exact verifier"),
    ({"prompt": "q", "answer": "(a", "verifier": "regex"}, "field 'answer' is not a valid regular expression "
     "(missing ), unterminated subpattern at position 0): fix the pattern"),
    ({"prompt": "q", "answer": 1, "verifier": "numeric", "tolerance": -0.1}, "field 'tolerance' is -0.1: give a "
     "finite number >= 0"),
    ({"prompt": "q", "answer": 1, "verifier": "numeric", "tolerance": "0.1"}, "field 'tolerance' is a JSON string: "
     "give a number >= 0"),
    ({"prompt": "q", "answer": "x", "tolerance": 0.1}, "field 'tolerance' is given for the exact verifier: only the "
     "numeric verifier has a tolerance; remove it or set \"verifier\": \"numeric\""),
])
def test_read_tasks_refusals(tmp_path, line, message):
    path = write(tmp_path, line)
    with pytest.raises(FlopwiseError) as error:
        read_tasks(path)
    assert str(error.value) == f"{LINE.format(path=path)} {message}"


def test_read_tasks_refuses_an_empty_file(tmp_path):
    path = write(tmp_path, "", "  ")
    with pytest.raises(FlopwiseError) as error:
        read_tasks(path)
    assert str(error.value) == (f"tasks file '{path}' has no tasks: write one JSON object per line with a 'prompt' "
                                "and its 'answer'")


# ---------------------------------------------------------------- reward functions


SCORER = "def score(prompt, completion, record):\n    return float(len(completion) == record['n'])\nvalue = 3\n"


def refusal(spec: str) -> str:
    with pytest.raises(FlopwiseError) as error:
        load_reward_function(spec)
    return str(error.value)


def test_reward_function_from_a_module_and_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "myscorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("myscorer:score", f"{tmp_path / 'myscorer.py'}:score"):
        function = load_reward_function(spec)
        assert function("p", "abc", {"n": 3}) == 1.0 and function("p", "ab", {"n": 3}) == 0.0


def test_reward_function_refusals(tmp_path, monkeypatch):
    (tmp_path / "myscorer.py").write_text(SCORER)
    (tmp_path / "broken.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert refusal("myscorer") == ("--reward 'myscorer' names no function: write module:function or "
                                   "path/to/file.py:function")
    assert refusal("nosuchmodule_xyz:f") == ("--reward nosuchmodule_xyz:f: module 'nosuchmodule_xyz' could not be "
                                             "imported (No module named 'nosuchmodule_xyz'): install it, or add its "
                                             "folder to PYTHONPATH")
    assert refusal("broken:f") == "--reward broken:f: importing 'broken' raised RuntimeError: no config: fix the module"
    missing = tmp_path / "missing.py"
    assert refusal(f"{missing}:f") == (f"--reward {missing}:f: the file '{missing}' does not exist: give the path of "
                                       "a Python file")
    assert refusal("myscorer:nope") == ("--reward myscorer:nope: 'myscorer' has no attribute 'nope': name a function "
                                        "(prompt, completion, record) -> float it defines")
    assert refusal("myscorer:value") == ("--reward myscorer:value: value is a int, not callable: name a function "
                                         "(prompt, completion, record) -> float")


WHERE = "(on a completion of the prompt 'What is 2 + 2?')"


@pytest.mark.parametrize("result, message", [
    (ValueError("bad input"), f"--reward mod:score raised ValueError: bad input {WHERE}: fix the function; the run's "
                              "last checkpoint is kept"),
    (float("nan"), f"--reward mod:score returned nan {WHERE}: return a finite float"),
    (float("inf"), f"--reward mod:score returned inf {WHERE}: return a finite float"),
    ("1.0", f"--reward mod:score returned a str (\"'1.0'\"), not a number {WHERE}: return a finite float"),
])
def test_rewarder_stops_on_a_failing_function(result, message):
    def score(prompt: str, completion: str, record: dict) -> object:
        if isinstance(result, Exception):
            raise result
        return result

    with pytest.raises(FlopwiseError) as error:
        Rewarder(score, "mod:score")(task("4", "numeric"), "What is 2 + 2?", "4")
    assert str(error.value) == message and "\n" not in message


def test_rewarder_scores_by_verifier_or_function():
    four = task("4", "numeric")
    assert Rewarder()(four, "What is 2 + 2?", "4") == 1.0 and Rewarder()(four, "What is 2 + 2?", "5") == 0.0
    seen = []

    def score(prompt: str, completion: str, record: dict) -> object:
        seen.append((prompt, completion, record))
        return {"bool": True, "numpy": np.float32(0.25), "int": 2}[completion]

    rewarder = Rewarder(score)
    assert [rewarder(four, "p", c) for c in ("bool", "numpy", "int")] == [1.0, 0.25, 2.0]
    assert seen[0] == ("p", "bool", {}) and rewarder.name.endswith("score") and math.isfinite(rewarder(four, "", "int"))


def test_eval_tasks_verifiable_is_the_held_out_rl_tasks_checked_by_their_verifiers():
    from flopwise.evaluate.tasks.resolve import resolve_tasks
    from flopwise.posttrain.template import render_text

    [task] = resolve_tasks(["verifiable"], heldout=lambda: None, seed=0, limit=None)
    _, heldout = builtin_tasks(0)
    assert task.name == "verifiable" and task.kind == "generate" and len(task.examples) == len(heldout)
    for example, rl_task in zip(task.examples, heldout, strict=True):
        assert example.context == render_text(rl_task.messages, add_generation_prompt=True)[0]
        assert example.verify(rl_task.answer) and not example.verify("no such answer")
        assert example.verify(f"{rl_task.answer}\n") == verify(rl_task, f"{rl_task.answer}\n")
