"""A sweep in one process: ask Optuna for a trial while the total budget can fund a whole one, run it, tell
the study how it ended, and write ``best.toml`` for the best trial so far.

The study lives in the sweep folder as an Optuna journal file (``journal.log``: safe for several processes, where
SQLite is not, optuna#4002), or in any storage ``--storage`` names.  ``sweep.json`` keeps the settings and the
total budget's accounting, written atomically after each change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flopwise.atomic import write_atomic, write_json_atomic
from flopwise.budget import Budget
from flopwise.config import RunConfig, config_to_toml, load_config
from flopwise.errors import FlopwiseError
from flopwise.rundir import METRICS_FILE, read_metrics
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.space import SearchSpace, read_space
from flopwise.sweep.total import TotalBudget
from flopwise.sweep.trial import run_trial, trial_config, trial_folder
from flopwise.train.display import ProgressDisplay

STRATEGIES = ("asha", "hyperband", "random")
SWEEP_FILE, JOURNAL_FILE, BEST_FILE, TRIALS = "sweep.json", "journal.log", "best.toml", "trials"
BASE_FILE, SPACE_FILE = "base.toml", "space.toml"  # the trials' base config and search space, for --resume
STUDY_NAME = "flopwise"


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep spends and how it searches: the total and each trial's budget, in one unit."""

    total: Budget
    trial: Budget
    strategy: str = "asha"
    seed: int = 0

    @property
    def unit(self) -> str:
        return next(iter(self.total.set_limits()))

    def amounts(self) -> tuple[float, float]:
        return self.total.set_limits()[self.unit], self.trial.set_limits()[self.unit]


def check_plan(plan: SweepPlan) -> None:
    """One limit each, the same unit, a trial no larger than the total, a known strategy."""
    total, trial = plan.total.set_limits(), plan.trial.set_limits()
    if len(total) != 1 or len(trial) != 1 or set(total) != set(trial):
        raise FlopwiseError(f"--budget {plan.total.describe()} and --trial-budget {plan.trial.describe()} must each be "
                            "one limit in the same unit (e.g. --budget 15m --trial-budget 1m)")
    if plan.amounts()[1] > plan.amounts()[0]:
        raise FlopwiseError(f"--trial-budget {plan.trial.describe()} is larger than --budget {plan.total.describe()}: "
                            "a sweep runs several trials within its budget")
    if plan.strategy not in STRATEGIES:
        raise FlopwiseError(f"--strategy {plan.strategy} is unknown: choose one of {', '.join(STRATEGIES)}")


def open_study(folder: Path, plan: SweepPlan, storage: str | None = None) -> Any:
    """The sweep's study (created, or loaded to go on): TPE seeded, or random search for ``random``; ASHA
    (successive halving) or Hyperband pruning on budget progress, none for ``random``."""
    optuna = require_optuna()
    backend = storage or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL_FILE)))
    random = plan.strategy == "random"
    sampler = (optuna.samplers.RandomSampler(seed=plan.seed) if random
               else optuna.samplers.TPESampler(seed=plan.seed))
    pruner = {"asha": optuna.pruners.SuccessiveHalvingPruner(), "hyperband": optuna.pruners.HyperbandPruner(),
              "random": optuna.pruners.NopPruner()}[plan.strategy]
    return optuna.create_study(study_name=STUDY_NAME, storage=backend, sampler=sampler, pruner=pruner,
                               direction="minimize", load_if_exists=True)


def spent_by(run_dir: Path, unit: str) -> float:
    """What a trial's run spent in ``unit``, from its last logged step (0 when it never stepped)."""
    path = run_dir / METRICS_FILE
    steps = [e for e in read_metrics(path) if e["event"] == "train"] if path.is_file() else []
    if not steps:
        return 0.0
    return float(steps[-1]["step"] if unit == "steps" else steps[-1][unit])


def run_sweep(folder: Path, base: RunConfig, space_file: Path, plan: SweepPlan, storage: str | None = None,
              display: ProgressDisplay | None = None, say: Callable[[str], None] = lambda line: None) -> Any:
    """A new sweep in ``folder``: trials until the total budget cannot fund another whole one; returns the study.
    The folder keeps what ``resume_sweep`` needs: the base config, the space and the plan.  ``say`` gets one
    line per trial as it ends."""
    check_plan(plan)
    space = read_space(space_file)
    if (folder / SWEEP_FILE).exists():
        raise FlopwiseError(f"'{folder}' already holds a sweep: continue it with flopwise sweep --resume {folder}, "
                            "or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / BASE_FILE, config_to_toml(base))
    write_atomic(folder / SPACE_FILE, space_file.read_text(encoding="utf-8"))
    budget = TotalBudget(plan.amounts()[0])
    _save(folder, plan, budget, storage)
    return _run_trials(folder, base, space, plan, budget, open_study(folder, plan, storage), display, say)


def resume_sweep(folder: Path, display: ProgressDisplay | None = None,
                 say: Callable[[str], None] = lambda line: None) -> Any:
    """Go on with the sweep in ``folder`` after its process died: trials that ended are kept, a trial that was
    running resumes its run from its newest checkpoint, then new trials use what is left of the total."""
    optuna = require_optuna()
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise FlopwiseError(f"'{folder}' is not a sweep folder (no {SWEEP_FILE}): give the --out of an earlier "
                            "flopwise sweep")
    saved = json.loads(path.read_text(encoding="utf-8"))
    plan = SweepPlan(Budget(**saved["total"]), Budget(**saved["trial"]), saved["strategy"], saved["seed"])
    base, space = load_config(folder / BASE_FILE), read_space(folder / SPACE_FILE)
    budget = TotalBudget.from_dict(saved["budget"])
    study = open_study(folder, plan, saved["storage"])
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.number not in budget.reserved:  # another worker's trial, still running: not ours to take
            continue
        _finish(folder, base, space, plan, budget, study, optuna.trial.Trial(study, frozen._trial_id), display, say)
    return _run_trials(folder, base, space, plan, budget, study, display, say)


def _run_trials(folder: Path, base: RunConfig, space: SearchSpace, plan: SweepPlan, budget: TotalBudget,
                study: Any, display: ProgressDisplay | None, say: Callable[[str], None]) -> Any:
    trial_amount = plan.amounts()[1]
    while budget.can_start(trial_amount):
        trial = study.ask()
        budget.start(trial.number, trial_amount)
        _save(folder, plan, budget)
        _finish(folder, base, space, plan, budget, study, trial, display, say)
    return study


def _finish(folder: Path, base: RunConfig, space: SearchSpace, plan: SweepPlan, budget: TotalBudget, study: Any,
            trial: Any, display: ProgressDisplay | None, say: Callable[[str], None]) -> None:
    """Run (or resume) ``trial`` to its end, tell the study how it ended, and account what it spent."""
    optuna = require_optuna()
    try:
        study.tell(trial, run_trial(trial, base, space, plan.trial, folder / TRIALS, display))
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except FlopwiseError as err:  # a bad combination of values: recorded, and the sweep goes on
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    spent = spent_by(trial_folder(folder / TRIALS, trial.number), plan.unit)
    budget.end(trial.number, spent)
    _save(folder, plan, budget)
    _write_best(folder, study, base, plan)
    ended = study.trials[trial.number]
    result = f"final loss {ended.value:.4f}" if ended.value is not None else ended.user_attrs.get("error", "")
    say(f"trial {trial.number} {ended.state.name.lower()}: {result}; spent {spent:g} of {plan.amounts()[1]:g} "
        f"{plan.unit}, {budget.left:g} left")


def _save(folder: Path, plan: SweepPlan, budget: TotalBudget, storage: str | None = None) -> None:
    """``sweep.json``: the plan, where the study lives, and the accounting (the storage is kept as first given)."""
    path = folder / SWEEP_FILE
    if path.is_file():
        storage = json.loads(path.read_text(encoding="utf-8"))["storage"]
    write_json_atomic(path, {"total": plan.total.to_dict(), "trial": plan.trial.to_dict(), "strategy": plan.strategy,
                             "seed": plan.seed, "storage": storage, "budget": budget.to_dict()})


def _write_best(folder: Path, study: Any, base: RunConfig, plan: SweepPlan) -> None:
    """``best.toml``: the best finished trial's config, which `flopwise train --config` runs again."""
    optuna = require_optuna()
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return
    config = trial_config(base, study.best_trial.params, plan.trial)
    header = (f"# sweep {folder}: trial {study.best_trial.number}, final held-out loss {study.best_value:.4f}\n"
              f"# flopwise train --config {folder / BEST_FILE}\n")
    write_atomic(folder / BEST_FILE, header + config_to_toml(config))
