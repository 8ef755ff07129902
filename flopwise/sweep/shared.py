"""A sweep on a shared storage (``--storage``): the machines that share one study share one total budget, and a
trial whose machine died is taken over by another.

The total is kept in the study itself, so it holds with an RDB server and no shared disk as well as with a
journal file on one: every trial records what it spent as it ends (``spent``), and a running or queued trial
holds one trial budget.  Optuna numbers new trials atomically (one storage transaction, or one journal record
under the journal's lock), and that order is the reservation: a new trial is funded when the total covers
what is spent and what every trial numbered below it holds, with its own budget on top.  Two machines that
ask at once get two numbers, and the higher one counts the lower one, so together they never pass the total.
A trial that lost that race is ended at once, spending nothing.

Takeover needs Optuna's heartbeat, which only its RDB storage has (Optuna 5's ``JournalStorage`` has none): a
running trial records a heartbeat every ``--heartbeat`` seconds, and one silent for twice that is failed by
whichever machine looks next, which queues a copy of it (``RetryHeartbeatStaleTrialCallback``).  The machine
that takes the copy resumes the dead trial's run from its newest checkpoint when its folder is readable there
(a shared disk), or restarts it.  The dead trial counts nothing; its copy counts the whole run once.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.rundir import is_run_dir
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.total import TOLERANCE

SPENT = "spent"  # trial user attr: what the trial's run spent, in the plan's unit, set as it ends
RUN_DIR = "run_dir"  # trial user attr: the trial's run folder, for a machine that takes it over
TOTAL = "total"  # study user attr: the shared total, in the plan's unit
MAX_RETRY = 3  # a trial that takes down its machine this often is left failed
DEFAULT_HEARTBEAT = 60  # seconds


def rdb_storage(url: str, heartbeat: int) -> Any:
    """Optuna's RDB storage at ``url`` with its heartbeat: a trial silent for two heartbeats is failed and
    queued again."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def agree_on_total(study: Any, total: float, flag: str) -> None:
    """Record the shared total in the study, or refuse a machine that came with another one."""
    recorded = study.user_attrs.get(TOTAL)
    if recorded is None:
        study.set_user_attr(TOTAL, total)
    elif recorded != total:
        raise FlopwiseError(f"--budget {flag} is not the total of the shared study ({recorded:g} in the same unit, "
                            "set by the machine that started it): every machine of a shared sweep gives the same "
                            "--budget")


def committed(trials: list[Any], amount: float, below: int | None = None) -> tuple[float, float]:
    """(what the study's trials have spent or hold, the largest overrun share an ended trial had): ended trials
    count what they spent; running and queued trials (those numbered below ``below``, when given) hold
    ``amount`` each.  A trial that died and was queued again counts nothing (its copy holds the budget and
    counts the run); one that died and was not (its retries used up) counts ``amount``: it may have spent it."""
    optuna = require_optuna()
    pending = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    used = overrun = 0.0
    for trial in trials:
        if trial.state in pending:
            used += amount if below is None or trial.number < below else 0.0
        elif SPENT in trial.user_attrs:
            used += trial.user_attrs[SPENT]
            overrun = max(overrun, trial.user_attrs[SPENT] / amount - 1)
        elif trial.number not in retried:
            used += amount
    return used, overrun


def funds(study: Any, total: float, amount: float, trial_number: int | None = None) -> bool:
    """Whether the shared total funds a trial of ``amount``: a new one (``trial_number`` None, before asking),
    or the trial just numbered ``trial_number``, counting only the trials numbered below it."""
    used, overrun = committed(study.get_trials(deepcopy=False), amount, trial_number)
    return amount * (1 + overrun) <= total - used + TOLERANCE * total


def queued(study: Any) -> bool:
    """A dead machine's trial waits to be taken over (the next ``ask`` takes it)."""
    optuna = require_optuna()
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def anything_pending(study: Any) -> bool:
    """Trials running elsewhere (which may give budget back, or die and be queued again) or queued."""
    optuna = require_optuna()
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,
                                                         optuna.trial.TrialState.WAITING)))


def fail_stale(study: Any) -> None:
    """Fail the trials whose heartbeat stopped (their copies are queued), where the storage has a heartbeat."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def heartbeat_seconds(study: Any) -> int | None:
    storage = study._storage  # Optuna keeps the storage there; its heartbeat is the storage's
    return storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None


@contextlib.contextmanager
def beating(study: Any, trial: Any) -> Iterator[None]:
    """Record ``trial``'s heartbeat every heartbeat interval while the block runs (as ``study.optimize`` does;
    the sweep asks and tells itself)."""
    interval = heartbeat_seconds(study)
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            study._storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def take_over(trial: Any, run_dir: Path) -> str | None:
    """A queued copy of a dead trial: its run folder copied into ``run_dir`` from where the dead trial ran it,
    when that is readable here (a shared disk) and holds a run, so that the copy resumes from its newest
    checkpoint; otherwise it restarts.  Returns the folder it resumes from, None when it restarts."""
    source = trial.user_attrs.get(RUN_DIR)
    if "failed_trial" not in trial.system_attrs or not source or run_dir.exists():
        return None
    if not is_run_dir(Path(source)):
        return None
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("*.lock"))
    return source
