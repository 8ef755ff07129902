"""In-run task scores for the report: each task's series, and how good a signal it is, as E2LM asks.

A run that sets ``train.eval_tasks`` logs a ``tasks`` event at each evaluation mark holding, per task, the
centered accuracy (0 at chance, 1 always right) and its 95% bootstrap interval.  Besides plotting them, the
report asks of each task what the E2LM competition asks of an early-training benchmark: does the score rise
steadily as the run trains (monotonicity: Spearman's rho against tokens), and how far does the final score
move when nothing but the seed changes (spread)?  A task that is flat or noisy at this scale cannot rank
small runs, however well it ranks large ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from flopwise.config import upgrade_legacy_keys
from flopwise.report.runs import Event, Run, final_eval
from flopwise.report.series import finite

TASKS_PLOT = "tasks_vs_tokens"  # the panels' PNG, without .png
MIN_POINTS = 3  # fewer evaluations give no meaningful rank correlation
NOT_AVAILABLE = "n/a"

SIGNAL_HEADERS = ("task", "run", "seed", "evals", "monotonicity (Spearman ρ vs tokens)", "final centered [95% CI]",
                  "spread (std of final over seeds)", "mean ρ over seeds")
SIGNAL_NUMERIC = (False, False, True, True, True, True, True, True)
SIGNAL_PER_GROUP = (True, False, False, False, False, False, True, True)  # one cell per seed group, not per run
SIGNAL_NOTE = ("Score: centered accuracy, (acc − random) / (1 − random) on the task's metric; 0 is chance. "
               "Monotonicity: Spearman's rank correlation ρ of the score against training tokens over the run's "
               f"evaluations (1: it rose at every one; n/a under {MIN_POINTS} evaluations or for a constant score). "
               "Final: the score at the end of the budget (p = 1), or the latest for an unfinished run, with its "
               "95% bootstrap interval. Runs whose config.toml differ only in train.seed form one group; spread: "
               "the standard deviation (n − 1) of their final scores (n/a for one seed); mean ρ: the mean of "
               "their monotonicities.")


@dataclass(frozen=True)
class TaskPoint:
    """One task's score at one evaluation: tokens seen, centered accuracy and its bootstrap interval."""

    tokens: float
    centered: float
    low: float | None
    high: float | None


@dataclass(frozen=True)
class TaskLine:
    """One run's scores on one task, in file order; ``index`` is the run's place in the report (its colour)."""

    run: str
    index: int
    points: list[TaskPoint]


@dataclass(frozen=True)
class RunSignal:
    """One run's signal on one task: how monotone its score was and where it ended."""

    run: str
    seed: int | None
    evaluations: int
    rho: float | None
    final: TaskPoint | None


@dataclass(frozen=True)
class TaskSignal:
    """One task over one seed group (runs whose configs differ only in ``train.seed``), in run order."""

    task: str
    runs: list[RunSignal]
    spread: float | None  # standard deviation (n - 1) of the final scores; None under two seeds
    mean_rho: float | None


def task_names(runs: list[Run]) -> list[str]:
    """Every task any run scored, in order of first appearance."""
    names: dict[str, None] = {}
    for run in runs:
        for event in run.tasks:
            names.update(dict.fromkeys(event["tasks"]))
    return list(names)


def _scored(run: Run, task: str) -> list[Event]:
    """The run's tasks events with a finite score of ``task`` at a known token count."""
    return [event for event in run.tasks if isinstance(score := event["tasks"].get(task), dict)
            and finite(score, "centered") is not None and finite(event, "tokens") is not None]


def _point(event: Event, task: str) -> TaskPoint:
    """``task``'s score in one event that :func:`_scored` kept (so tokens and centered are numbers)."""
    score = event["tasks"][task]
    return TaskPoint(finite(event, "tokens"), finite(score, "centered"), finite(score, "low"), finite(score, "high"))


def task_lines(runs: list[Run]) -> dict[str, list[TaskLine]]:
    """Per task that some run scored, one line per run that scored it: what the panels draw and report.json
    holds."""
    lines: dict[str, list[TaskLine]] = {}
    for task in task_names(runs):
        per_task = [TaskLine(run.name, index, [_point(event, task) for event in scored])
                    for index, run in enumerate(runs) if (scored := _scored(run, task))]
        if per_task:
            lines[task] = per_task
    return lines


def monotonicity(points: list[TaskPoint]) -> float | None:
    """Spearman's rho of the score against tokens (ties share their mean rank); None where it is undefined.

    Undefined under ``MIN_POINTS`` points, and where either side is constant (a score stuck at chance has no
    order to correlate: scipy would return NaN with a warning).
    """
    tokens, scores = [point.tokens for point in points], [point.centered for point in points]
    if len(points) < MIN_POINTS or len(set(tokens)) < 2 or len(set(scores)) < 2:
        return None
    rho = float(spearmanr(tokens, scores).statistic)
    return rho if math.isfinite(rho) else None


def seed_of(run: Run) -> int | None:
    """The run's ``train.seed``, shown beside its row so a seed group's members can be told apart."""
    seed = (run.config.get("train") or {}).get("seed")
    return seed if isinstance(seed, int) else None


def _without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """The config with ``train.seed`` left out (and older keys moved where they are now, as runs load).

    Read from the raw config.toml rather than validated with ``load_run_config``: validating imports the
    methods and so torch, which a report does not need.  config.toml names no output folder.
    """
    data = upgrade_legacy_keys(config)  # copies each section, so the pop below leaves the run's config whole
    if isinstance(data.get("train"), dict):
        data["train"].pop("seed", None)
    return data


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs whose configs are equal but for ``train.seed``, each group in run order, groups by first member."""
    groups: list[tuple[dict[str, Any], list[Run]]] = []
    for run in runs:
        key = _without_seed(run.config)
        members = next((members for other, members in groups if other == key), None)
        if members is None:
            groups.append((key, [run]))
        else:
            members.append(run)
    return [members for _, members in groups]


def run_signal(run: Run, task: str) -> RunSignal:
    """``run``'s monotonicity on ``task`` and its final score (at p = 1, else the latest, as the held-out loss)."""
    scored = _scored(run, task)
    final = final_eval(scored)
    return RunSignal(run.name, seed_of(run), len(scored), monotonicity([_point(event, task) for event in scored]),
                     _point(final, task) if final is not None else None)


def task_signals(runs: list[Run]) -> list[TaskSignal]:
    """Per task, per seed group with a score of it: each run's signal, and the spread and mean rho across seeds."""
    groups = seed_groups(runs)
    signals = []
    for task in task_names(runs):
        for members in groups:
            per_run = [signal for run in members if (signal := run_signal(run, task)).evaluations]
            if not per_run:
                continue
            finals = [signal.final.centered for signal in per_run if signal.final is not None]
            rhos = [signal.rho for signal in per_run if signal.rho is not None]
            signals.append(TaskSignal(task, per_run, float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
                                      float(np.mean(rhos)) if rhos else None))
    return signals


def _rho(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:+.2f}"


def _final(point: TaskPoint | None) -> str:
    if point is None:
        return NOT_AVAILABLE
    if point.low is None or point.high is None:
        return f"{point.centered:.3f}"
    return f"{point.centered:.3f} [{point.low:.3f}, {point.high:.3f}]"


def signal_rows(signal: TaskSignal) -> list[list[str]]:
    """The table's cells for one task and seed group, one row per run; the per-group cells repeat on each row."""
    spread = NOT_AVAILABLE if signal.spread is None else f"{signal.spread:.3f}"
    return [[signal.task, run.run, NOT_AVAILABLE if run.seed is None else str(run.seed), str(run.evaluations),
             _rho(run.rho), _final(run.final), spread, _rho(signal.mean_rho)] for run in signal.runs]


def tasks_json(runs: list[Run]) -> dict[str, Any] | None:
    """The panels' series and the signal table for report.json; None when no run scored a task."""
    lines = task_lines(runs)
    if not lines:
        return None
    return {"png": f"{TASKS_PLOT}.png", "x": "tokens", "y": "centered",
            "panels": {task: [{"run": line.run, "x": [p.tokens for p in line.points],
                               "y": [p.centered for p in line.points], "low": [p.low for p in line.points],
                               "high": [p.high for p in line.points]} for line in per_task]
                       for task, per_task in lines.items()},
            "signal": [asdict(signal) for signal in task_signals(runs)], "signal_note": SIGNAL_NOTE}
