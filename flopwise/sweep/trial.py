"""One sweep trial: a run of the base config with the values Optuna drew, under the trial budget, reporting
each evaluation during the run to the study so that its pruner can stop the trial there (with a checkpoint,
so a promoted or resumed trial continues exactly).  The value Optuna minimizes is the final held-out loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flopwise import api
from flopwise.budget import Budget
from flopwise.config import RunConfig
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.space import SearchSpace
from flopwise.train.display import ProgressDisplay

PROGRESS_STEPS = 1000  # Optuna's steps are ints: p in thousandths


def progress_step(p: float) -> int:
    """The Optuna step of budget progress ``p``, so that rungs compare trials at the same share of their budget."""
    return round(p * PROGRESS_STEPS)


def trial_config(base: RunConfig, values: dict[str, Any], trial_budget: Budget) -> RunConfig:
    """``base`` with the trial's values and the trial budget (every budget limit replaced)."""
    return base.replace(**values, **trial_budget.config_values())


def run_trial(trial: Any, base: RunConfig, space: SearchSpace, trial_budget: Budget, folder: Path,
              display: ProgressDisplay | None = None) -> float:
    """Run ``trial`` in ``folder / <number>``; its final held-out loss, or ``optuna.TrialPruned`` when the
    study's pruner stopped it at an evaluation mark."""
    optuna = require_optuna()
    config = trial_config(base, space.suggest(trial), trial_budget)

    def report(step: int, p: float, fields: dict[str, Any]) -> str | None:
        trial.report(fields["val_loss"], step=progress_step(p))
        return f"pruned by the sweep at p={p:.2f}" if trial.should_prune() else None

    summary = api.run(config, folder / f"{trial.number:04d}", display=display or ProgressDisplay.quiet(),
                      after_eval=report)
    if not summary.finished:
        raise optuna.TrialPruned(summary.stop_reason)
    return float(summary.final_eval["loss"])
