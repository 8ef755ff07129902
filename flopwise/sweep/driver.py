"""A sweep in one process: ask Optuna for a trial while the total budget can fund a whole one, run it, tell
the study how it ended, and write ``best.toml`` for the best trial so far.

The study lives in the sweep folder as an Optuna journal file (``journal.log``: safe for several processes, where
SQLite is not, optuna#4002), or in any storage ``--storage`` names.  ``sweep.json`` keeps the settings and the
total budget's accounting, written atomically after each change.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flopwise.atomic import write_atomic, write_json_atomic
from flopwise.budget import Budget
from flopwise.config import RunConfig, config_to_toml, load_config
from flopwise.errors import FlopwiseError
from flopwise.filelock import LOCKS_WORK, held
from flopwise.resolve import resolve
from flopwise.runtime import Ranks
from flopwise.sweep.folder import (
    BASE_FILE,
    BEST_FILE,
    JOURNAL_FILE,
    LOCK_FILE,
    SPACE_FILE,
    STUDY_NAME,
    SWEEP_FILE,
    TRIALS,
)
from flopwise.sweep.journal import journal_storage
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.pbt import Population
from flopwise.sweep.sampling import seed_sampler
from flopwise.sweep.shared import (
    DEFAULT_HEARTBEAT,
    RUN_DIR,
    SPENT,
    agree_on_total,
    anything_pending,
    beating,
    fail_stale,
    funds,
    heartbeat_seconds,
    queued,
    rdb_storage,
    take_over,
)
from flopwise.sweep.space import SearchSpace, read_space
from flopwise.sweep.total import TotalBudget
from flopwise.sweep.trial import (
    SIGNALS,
    end_trials,
    final_loss,
    outcome,
    progress_step,
    run_trial,
    spent_by,
    trial_config,
    trial_folder,
    trial_values,
)
from flopwise.train.display import ProgressDisplay

STRATEGIES = ("asha", "hyperband", "random", "pbt")


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep spends and how it searches: the total and each trial's budget, in one unit."""

    total: Budget
    trial: Budget
    strategy: str = "asha"
    seed: int = 0
    signal: str = "loss"  # what a trial reports at its marks: the held-out loss or the forecast final loss
    interval: float = 0.25  # pbt: the budget progress between exploit-and-explore steps

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
    if plan.strategy == "pbt" and not 0 < plan.interval < 1:
        raise FlopwiseError(f"--pbt-interval {plan.interval:g} must be between 0 and 1 (e.g. 0.25: exploit and "
                            "explore at p = 0.25, 0.5, 0.75)")
    if plan.signal not in SIGNALS:
        raise FlopwiseError(f"--rung-signal {plan.signal} is unknown: choose one of {', '.join(SIGNALS)}")


def open_study(folder: Path, plan: SweepPlan, base: RunConfig, storage: str | None = None,
               heartbeat: int = DEFAULT_HEARTBEAT) -> Any:
    """The sweep's study (created, or loaded to go on), with ASHA (successive halving) or Hyperband pruning on
    budget progress, none for ``random`` and ``pbt``; its sampler is set before each trial is drawn
    (``sampling.seed_sampler``).  The
    first rung is the first evaluation mark (``train.eval_every``): a run also evaluates after its first step,
    still in warmup, and a loss there ranks initialisations, not trials."""
    optuna = require_optuna()
    backend = study_storage(folder, storage, heartbeat)
    first_rung = max(1, progress_step(base.train.eval_every))
    pruners = {"asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=first_rung,
                                                                   max_resource=progress_step(1.0)),
               "random": optuna.pruners.NopPruner, "pbt": optuna.pruners.NopPruner}
    study = optuna.create_study(study_name=STUDY_NAME, storage=backend, pruner=pruners[plan.strategy](),
                                direction="minimize", load_if_exists=True)
    if storage:  # machines that share the study share its total
        agree_on_total(study, plan.amounts()[0], plan.total.describe())
    return study


def study_of(folder: Path, settings: dict[str, Any], plan: SweepPlan, base: RunConfig) -> Any:
    """The study of the sweep in ``folder``, on the storage its sweep.json names (``settings``), with its
    heartbeat."""
    return open_study(folder, plan, base, settings["storage"], settings.get("heartbeat", DEFAULT_HEARTBEAT))


def study_storage(folder: Path, storage: str | None, heartbeat: int | None = None) -> Any:
    """Where the sweep's study lives: an RDB URL as given (``postgresql://...``; with Optuna's heartbeat every
    ``heartbeat`` seconds, so that a dead machine's trial is taken over), a journal file at the path given (on a
    shared disk, for several machines), or by default the journal file in the sweep folder."""
    if storage and "://" in storage:
        return rdb_storage(storage, heartbeat) if heartbeat else storage
    return journal_storage(Path(storage) if storage else folder / JOURNAL_FILE)


def run_sweep(folder: Path, base: RunConfig, space_file: Path, plan: SweepPlan, storage: str | None = None,
              display: ProgressDisplay | None = None, say: Callable[[str], None] = lambda line: None,
              workers: int = 1, ranks: Ranks | None = None, heartbeat: int = DEFAULT_HEARTBEAT) -> Any:
    """A new sweep in ``folder``: trials until the total budget cannot fund another whole one; returns the study.
    The folder keeps what ``resume_sweep`` needs: the base config, the space and the plan.  ``say`` gets one
    line per trial as it ends.  ``workers`` > 1 runs that many processes, the cores split between them.  Under
    torchrun this is rank 0's part (``ranks``): each trial runs on all ranks, the others ``follow_trials``."""
    ranks = ranks or Ranks()
    check_plan(plan)
    check_launch(plan, workers, ranks)
    if heartbeat < 1:
        raise FlopwiseError(f"--heartbeat {heartbeat}: give the seconds between a running trial's heartbeats, 1 or "
                            "more (default 60)")
    read_space(space_file)  # a bad space is refused before anything is written
    resolve(base, settle_memory=False)  # as are methods that cannot run together (each trial resolves its own)
    if plan.signal == "forecast" and base.train.forecast_every <= 0:
        raise FlopwiseError("--rung-signal forecast needs the loss forecast: train.forecast_every is 0, set it "
                            "above 0 (default 0.1)")
    if (folder / SWEEP_FILE).exists():
        raise FlopwiseError(f"'{folder}' already holds a sweep: continue it with flopwise sweep --resume {folder}, "
                            "or choose another --out")
    if storage:  # a shared study's total is checked (or recorded, by the first machine) before anything is written
        open_study(folder, plan, base, storage, heartbeat)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / BASE_FILE, config_to_toml(base))
    write_atomic(folder / SPACE_FILE, space_file.read_text(encoding="utf-8"))
    _start_file(folder, plan, storage, workers, heartbeat)
    return _run_workers(folder, workers, display, say, ranks)


def resume_sweep(folder: Path, display: ProgressDisplay | None = None,
                 say: Callable[[str], None] = lambda line: None, ranks: Ranks | None = None) -> Any:
    """Go on with the sweep in ``folder`` after its processes died: trials that ended are kept, the trials that
    were running resume their runs from their newest checkpoints, then new trials use what is left of the
    total, with the sweep's workers."""
    optuna = require_optuna()
    ranks = ranks or Ranks()
    settings, plan, base, space = _read_sweep(folder)
    check_launch(plan, settings.get("workers", 1), ranks)
    study = study_of(folder, settings, plan, base)
    if plan.strategy == "pbt":
        return _run_population(folder, base, space, plan, study, display, say)
    reserved = TotalBudget.from_dict(settings["budget"]).reserved
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.number in reserved:  # ours; another machine's running trials are not ours to take
            _finish(folder, base, space, plan, study, optuna.trial.Trial(study, frozen._trial_id), display, say,
                    ranks)
    return _run_workers(folder, settings.get("workers", 1), display, say, ranks)


def read_settings(folder: Path) -> dict[str, Any]:
    """``sweep.json`` of the sweep in ``folder``: its plan, storage, workers and accounting."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise FlopwiseError(f"'{folder}' is not a sweep folder (no {SWEEP_FILE}): give the --out of an earlier "
                            "flopwise sweep")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
        plan_of(settings)
        TotalBudget.from_dict(settings["budget"])
        if "storage" not in settings:  # --resume and report read it
            raise KeyError("storage")
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not UTF-8 or JSON, a key missing or mistyped
        raise FlopwiseError(f"'{path}' is damaged ({type(err).__name__}: {' '.join(str(err).split())}): it is "
                            "written whole, so something else changed it; restore it from a backup, or start the "
                            "sweep again with another --out") from None
    return settings


def plan_of(settings: dict[str, Any]) -> SweepPlan:
    """The plan a sweep's settings record."""
    return SweepPlan(Budget(**settings["total"]), Budget(**settings["trial"]), settings["strategy"], settings["seed"],
                     settings["signal"], settings.get("interval", 0.25))


def _read_sweep(folder: Path) -> tuple[dict[str, Any], SweepPlan, RunConfig, SearchSpace]:
    """The sweep's settings, plan, base config and space, as its folder keeps them."""
    settings = read_settings(folder)
    return settings, plan_of(settings), load_config(folder / BASE_FILE), read_space(folder / SPACE_FILE)


def _run_workers(folder: Path, workers: int, display: ProgressDisplay | None, say: Callable[[str], None],
                 ranks: Ranks) -> Any:
    """The trials, in this process or in ``workers`` processes; returns the study as they left it."""
    settings, plan, base, space = _read_sweep(folder)
    if plan.strategy == "pbt":
        return _run_population(folder, base, space, plan, study_of(folder, settings, plan, base), display, say)
    if workers == 1:
        return _run_trials(folder, base, space, plan, study_of(folder, settings, plan, base), display, say, ranks)
    threads = max(1, usable_cores() // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
    processes = [context.Process(target=_worker, args=(folder, index, threads)) for index in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [index for index, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise FlopwiseError(f"sweep worker(s) {', '.join(map(str, failed))} of '{folder}' stopped with an error "
                            f"(see above): continue with flopwise sweep --resume {folder}")
    return study_of(folder, settings, plan, base)


def check_launch(plan: SweepPlan, workers: int, ranks: Ranks) -> None:
    """Refuse the launches that cannot work: several workers (processes of their own) under torchrun (which
    already runs one process per rank), and a PBT population (trained in one process) under either."""
    if workers < 1:
        raise FlopwiseError(f"--workers {workers}: give 1 or more")
    if workers > 1 and not LOCKS_WORK:
        raise FlopwiseError(f"--workers {workers} needs file locks (fcntl), which this platform lacks: use "
                            "--workers 1, or run one sweep per machine with --storage")
    if workers > 1 and ranks.distributed:
        raise FlopwiseError(f"--workers {workers} under torchrun: torchrun runs each trial on its "
                            f"{ranks.world_size} processes already; use --workers 1")
    if plan.strategy == "pbt" and (workers > 1 or ranks.distributed):
        raise FlopwiseError("--strategy pbt trains its population in lockstep in one process: run it without "
                            "--workers and without torchrun, or choose another strategy")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset), where the platform tells."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker(folder: Path, index: int, threads: int) -> None:
    """One worker process: its share of the cores, trials while the total funds them."""
    import torch

    torch.set_num_threads(threads)
    settings, plan, base, space = _read_sweep(folder)
    study = study_of(folder, settings, plan, base)
    _run_trials(folder, base, space, plan, study, None, lambda line: print(f"worker {index}: {line}", flush=True))


def _run_trials(folder: Path, base: RunConfig, space: SearchSpace, plan: SweepPlan, study: Any,
                display: ProgressDisplay | None, say: Callable[[str], None], ranks: Ranks | None = None) -> Any:
    """Ask for a trial and reserve its budget (one step, under the accounting's lock, so that parallel workers
    never both take the last share), run it, and repeat while a whole trial fits."""
    total, trial_amount = plan.amounts()
    shared = read_settings(folder)["storage"] is not None
    while True:
        if shared and not _shared_turn(study, total, trial_amount):
            end_trials(ranks or Ranks())
            return study
        with accounting(folder) as budget:
            if not budget.can_start(trial_amount):
                end_trials(ranks or Ranks())
                return study
            seed_sampler(study, plan.seed, plan.strategy, shared)
            with warnings.catch_warnings():  # Optuna's heartbeat expects study.optimize: the sweep beats itself
                warnings.filterwarnings("ignore", "Heartbeat of storage")
                trial = study.ask()
            budget.start(trial.number, trial_amount)
        if shared and not funds(study, total, trial_amount, trial.number):
            _unfunded(folder, study, trial)
            continue
        _finish(folder, base, space, plan, study, trial, display, say, ranks)


def _shared_turn(study: Any, total: float, amount: float) -> bool:
    """Whether this machine asks for another trial of a shared study: when the shared total funds one, or a dead
    machine's trial is queued to be taken over.  Where neither, it waits while trials run elsewhere and the
    storage keeps their heartbeats: they may give budget back, or die and be queued here."""
    while True:
        fail_stale(study)
        if funds(study, total, amount) or queued(study):
            return True
        interval = heartbeat_seconds(study)
        if interval is None or not anything_pending(study):
            return False
        time.sleep(min(interval, 5))


def _unfunded(folder: Path, study: Any, trial: Any) -> None:
    """A trial that another machine's trial, numbered below it, left no budget for: ended unrun."""
    optuna = require_optuna()
    trial.set_user_attr(SPENT, 0.0)
    trial.set_user_attr("error", "not run: another machine's trial took the last of the shared total first")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    with accounting(folder) as budget:
        budget.end(trial.number, 0.0)


def _finish(folder: Path, base: RunConfig, space: SearchSpace, plan: SweepPlan, study: Any, trial: Any,
            display: ProgressDisplay | None, say: Callable[[str], None], ranks: Ranks | None = None) -> None:
    """Run (or resume) ``trial`` to its end, tell the study how it ended, and account what it spent."""
    optuna = require_optuna()
    run_dir = trial_folder(folder / TRIALS, trial.number)
    resumed = take_over(study.get_trials(deepcopy=False)[trial.number], run_dir)
    if resumed:
        say(f"trial {trial.number} takes over a trial whose machine died: resumes {resumed}")
    try:
        with beating(study, trial):
            trial.set_user_attr(RUN_DIR, str(run_dir.resolve()))
            try:
                ended = {"values": run_trial(trial, base, space, plan.trial, folder / TRIALS, display, plan.signal,
                                             ranks)}
            except optuna.TrialPruned:
                ended = {"state": optuna.trial.TrialState.PRUNED}
            except FlopwiseError as err:  # a bad combination of values: recorded, and the sweep goes on
                trial.set_user_attr("error", str(err))
                ended = {"state": optuna.trial.TrialState.FAIL}
            trial.set_user_attr(SPENT, spent_by(run_dir, plan.unit))  # the shared total's record
            study.tell(trial, **ended)
    except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeat was missed: another machine took it over
        say(f"trial {trial.number} was taken over by another machine (its heartbeat stopped for too long)")
    spent = spent_by(run_dir, plan.unit)
    with accounting(folder) as budget:
        budget.end(trial.number, spent)
        left = budget.left
        _write_best(folder, study, base, plan)
    ended = study.trials[trial.number]
    say(f"trial {trial.number} {ended.state.name.lower()}: {outcome(ended)}; spent {spent:g} of {plan.amounts()[1]:g} "
        f"{plan.unit}, {left:g} left")


def _run_population(folder: Path, base: RunConfig, space: SearchSpace, plan: SweepPlan, study: Any,
                    display: ProgressDisplay | None, say: Callable[[str], None]) -> Any:
    """A PBT sweep (new or resumed from ``pbt.json``): the population reserves the whole total it can fund,
    trains to the end, and each member is told its final loss and spends what its own segments spent."""
    optuna = require_optuna()
    population = Population(folder, folder / TRIALS, study, lambda values: trial_config(base, values, plan.trial),
                            plan.unit, plan.seed, display, say)
    if not population.state:
        with accounting(folder) as budget:
            population.start(space, budget, plan.amounts()[1], plan.interval)
    state = population.run()
    for number, member in sorted(state["members"].items(), key=lambda item: int(item[0])):
        frozen = study.trials[int(number)]
        if frozen.state != optuna.trial.TrialState.RUNNING:
            continue  # told before the process died
        trial = optuna.trial.Trial(study, frozen._trial_id)
        if "error" in member:
            trial.set_user_attr("error", member["error"])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            trial.set_user_attr("lineage_s" if plan.unit == "seconds" else f"lineage_{plan.unit}",
                                population.lineage_spent(int(number)))
            study.tell(trial, final_loss(trial_folder(folder / TRIALS, int(number))))
        with accounting(folder) as budget:
            budget.end(int(number), member["spent"])
            _write_best(folder, study, base, plan)
    return study


@contextlib.contextmanager
def accounting(folder: Path) -> Iterator[TotalBudget]:
    """The total budget's accounting in ``sweep.json``, read, changed and written back (atomically) while this
    process holds the sweep's lock file, so the workers of a machine take turns.  Workers on several machines
    share a study through ``--storage``; each machine's folder keeps its own accounting of its own trials."""
    path = folder / SWEEP_FILE
    with held(folder / LOCK_FILE):
        saved = json.loads(path.read_text(encoding="utf-8"))
        budget = TotalBudget.from_dict(saved["budget"])
        yield budget
        write_json_atomic(path, {**saved, "budget": budget.to_dict()})


def _start_file(folder: Path, plan: SweepPlan, storage: str | None, workers: int, heartbeat: int) -> None:
    """``sweep.json`` of a new sweep: the plan, where the study lives, the workers, and the accounting."""
    write_json_atomic(folder / SWEEP_FILE, {"total": plan.total.to_dict(), "trial": plan.trial.to_dict(),
                                            "strategy": plan.strategy, "seed": plan.seed, "signal": plan.signal,
                                            "interval": plan.interval,
                                            "storage": storage,
                                            "workers": workers, "heartbeat": heartbeat,
                                            "budget": TotalBudget(plan.amounts()[0]).to_dict()})


def _write_best(folder: Path, study: Any, base: RunConfig, plan: SweepPlan) -> None:
    """``best.toml``: the best finished trial's config, which `flopwise train --config` runs again.  A PBT
    member's config holds the values it ended with; the rates its lineage trained at before are in pbt.json."""
    optuna = require_optuna()
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return
    best = study.best_trial
    config = trial_config(base, trial_values(best), plan.trial)
    header = (f"# sweep {folder}: trial {best.number}, final held-out loss {study.best_value:.4f}\n"
              + ("# PBT: the learning rates this member ended with; its lineage's earlier rates are in pbt.json\n"
                 if plan.strategy == "pbt" else "")
              + f"# flopwise train --config {folder / BEST_FILE}\n")
    write_atomic(folder / BEST_FILE, header + config_to_toml(config))
