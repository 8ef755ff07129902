"""One sweep trial: a run of the base config with the values Optuna drew, under the trial budget, reporting
each evaluation during the run to the study so that its pruner can stop the trial there (with a checkpoint,
so a promoted or resumed trial continues exactly).  The value Optuna minimizes is the final held-out loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flopwise import api
from flopwise.budget import Budget
from flopwise.config import RunConfig, config_to_toml, tomllib, validate_config
from flopwise.errors import FlopwiseError
from flopwise.rundir import METRICS_FILE, is_run_dir, read_metrics
from flopwise.runtime import Ranks
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.space import SearchSpace
from flopwise.train.display import ProgressDisplay

PROGRESS_STEPS = 1000  # Optuna's steps are ints: p in thousandths
SIGNALS = {"loss": "val_loss", "forecast": "forecast_loss"}  # rung signal -> the eval field it reports


def progress_step(p: float) -> int:
    """The Optuna step of budget progress ``p``, so that rungs compare trials at the same share of their budget."""
    return round(p * PROGRESS_STEPS)


def trial_config(base: RunConfig, values: dict[str, Any], trial_budget: Budget) -> RunConfig:
    """``base`` with the trial's values and the trial budget (every budget limit replaced)."""
    return base.replace(**values, **trial_budget.config_values())


def trial_folder(folder: Path, number: int) -> Path:
    return folder / f"{number:04d}"


def run_trial(trial: Any, base: RunConfig, space: SearchSpace, trial_budget: Budget, folder: Path,
              display: ProgressDisplay | None = None, signal: str = "loss", ranks: Ranks | None = None) -> float:
    """Run ``trial`` in ``folder / <number>``; its final held-out loss, or ``optuna.TrialPruned`` when the
    study's pruner stopped it at an evaluation mark.  ``signal``: what each mark reports to the pruner, the
    held-out loss there (``loss``) or the forecast final loss (``forecast``, from the run's loss forecaster:
    under WSD a mid-run loss is not annealed, and a forecast of the end may rank trials more truly).  A trial
    whose folder already holds a run (its process died) resumes that run from its newest checkpoint, with the
    values it was drawn.  Under torchrun this is rank 0's part: it tells the other ranks (``follow_trials``)
    what to run and, at each mark, whether to stop."""
    optuna = require_optuna()
    ranks = ranks or Ranks()
    run_dir = trial_folder(folder, trial.number)

    def report(step: int, p: float, fields: dict[str, Any]) -> str | None:
        value, decision = fields.get(SIGNALS[signal]), ""
        if value is not None:  # none: no forecast yet this early, nothing to rank by at this mark
            trial.report(value, step=progress_step(p))
            decision = f"pruned by the sweep at p={p:.2f}" if trial.should_prune() else ""
        return ranks.broadcast_text(decision) or None

    display = display or ProgressDisplay.quiet()
    if (run_dir / "final").is_dir():  # it finished, and its process died before the study was told
        return final_loss(run_dir)
    if is_run_dir(run_dir):
        ranks.broadcast_text(json.dumps({"number": trial.number, "resume": True}))
        summary = api.resume(run_dir, display=display, after_eval=report)
    else:
        config = trial_config(base, space.suggest(trial), trial_budget)
        ranks.broadcast_text(json.dumps({"number": trial.number, "config": config_to_toml(config)}))
        summary = api.run(config, run_dir, display=display, after_eval=report)
    if not summary.finished:
        raise optuna.TrialPruned(summary.stop_reason)
    return float(summary.final_eval["loss"])


def end_trials(ranks: Ranks) -> None:
    """Tell the other ranks that no trial follows."""
    ranks.broadcast_text(json.dumps({"done": True}))


def follow_trials(folder: Path, ranks: Ranks) -> None:
    """A rank other than 0 under torchrun: run each trial rank 0 names, in step with it (DDP or FSDP, as the
    config says), and stop where rank 0's pruner stops it, until rank 0 says the sweep is done."""
    def told(step: int, p: float, fields: dict[str, Any]) -> str | None:
        return ranks.broadcast_text("") or None

    while True:
        order = json.loads(ranks.broadcast_text(""))
        if order.get("done"):
            return
        run_dir = trial_folder(folder, order["number"])
        try:
            if order.get("resume"):
                api.resume(run_dir, display=ProgressDisplay.quiet(), after_eval=told)
            else:
                config = validate_config(tomllib.loads(order["config"]), f"trial {order['number']}")
                api.run(config, run_dir, display=ProgressDisplay.quiet(), after_eval=told)
        except FlopwiseError:  # rank 0 meets the same error and records the trial as failed
            continue


def final_loss(run_dir: Path) -> float:
    """A finished run's final held-out loss, from its last evaluation."""
    return float([e for e in read_metrics(run_dir / METRICS_FILE) if e["event"] == "eval"][-1]["val_loss"])


def spent_by(run_dir: Path, unit: str) -> float:
    """What a trial's run spent in ``unit``: the furthest any logged step or evaluation got (training events are
    logged every ``train.log_every`` steps, the last evaluation is at the end), 0 when it never stepped."""
    path = run_dir / METRICS_FILE
    key = "step" if unit == "steps" else unit
    events = [e for e in read_metrics(path) if e["event"] in ("train", "eval")] if path.is_file() else []
    return max((float(e[key]) for e in events if key in e), default=0.0)


def trial_values(trial: Any) -> dict[str, Any]:
    """The config values a trial ended with: those it drew, or a PBT member's after its last copy."""
    return trial.user_attrs.get("values") or trial.params


def outcome(trial: Any) -> str:
    """How a trial ended, in a few words: its final held-out loss, where it was pruned, or its error."""
    state = trial.state.name.lower()
    if state == "complete":
        return f"final loss {trial.value:.4f}"
    if state == "pruned" and trial.value is not None:
        return f"at p={trial.last_step / PROGRESS_STEPS:.2f}, held-out loss {trial.value:.4f}"
    return trial.user_attrs.get("error", "") if state == "fail" else state
