"""The task engine: scores tasks on a model (``flopwise eval --tasks``, in-run task evaluation)."""

from __future__ import annotations

import time
from typing import Any

from flopwise.evaluate.tasks.metrics import choice_correct, exact_match, summarize
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.evaluate.tasks.spec import Task


def choice_loglikelihoods(task: Task, model: TaskModel) -> list[list[float]]:
    """log P(choice | context) of every choice of every example, in order."""
    pairs = [(e.context, e.delimiter + choice) for e in task.examples for choice in e.choices]
    flat = [score for score, _ in model.loglikelihood(pairs)]
    result, start = [], 0
    for example in task.examples:
        result.append(flat[start:start + len(example.choices)])
        start += len(example.choices)
    return result


def evaluate_task(task: Task, model: TaskModel, seed: int = 0) -> dict[str, Any]:
    """The task's accuracies, centered accuracy and interval, with its size and examples per second."""
    start = time.perf_counter()
    if task.kind == "choice":
        correct = choice_correct(task.examples, choice_loglikelihoods(task, model))
    else:
        outputs = [model.generate(e.context, e.until, task.max_new_tokens) for e in task.examples]
        correct = exact_match(task.examples, outputs)
    seconds = time.perf_counter() - start
    return {"kind": task.kind, "source": task.source, **summarize(correct, task.kind, task.random_baseline, seed),
            "seconds": seconds, "examples_per_s": len(task.examples) / seconds if seconds > 0 else None}


def evaluate_tasks(tasks: list[Task], model: TaskModel, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each task's result by name, in the order given."""
    return {task.name: evaluate_task(task, model, seed) for task in tasks}
