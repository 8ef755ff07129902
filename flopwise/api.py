"""The Python API for a run, which the CLI, ``flopwise bench``, ``flopwise scan``, sweeps and the replay pilots
also use: ``run`` starts a new run in a folder, ``resume`` continues or extends one.  Every stage (pretraining,
SFT, DPO: ``posttrain.stage``) takes the same path: resolve -> build -> run -> finish.

    import flopwise
    config = flopwise.load_config("run.toml", overrides=["model.d_model=256"])
    summary = flopwise.run(config, "runs/mine")
    summary = flopwise.resume("runs/mine", budget="20m")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flopwise.budget import Budget
from flopwise.config import RunConfig, load_config
from flopwise.reopen import open_for_resume
from flopwise.rundir import writing
from flopwise.session import Summary, start_new
from flopwise.train.callbacks import AfterEval
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import LoopState


def run(config: RunConfig | str | Path, out: str | Path, *, stop_after: Budget | str | None = None,
        display: ProgressDisplay | None = None, auto_plan: dict[str, Any] | None = None,
        after_eval: AfterEval | None = None, extendable: bool = False, overwrite: bool = False) -> Summary:
    """Train a new run of ``config`` (a RunConfig, or the path of a TOML/YAML file) into the folder ``out``
    until its budget is spent (or ``stop_after`` is, checkpointed as if interrupted): pretraining, or SFT or
    DPO from ``model.init_from`` when ``posttrain.stage`` says so.  ``auto_plan``: the plan that chose its
    shape, kept in plan.json.  ``after_eval(step, p, fields)``: called after each evaluation during the run
    with the eval event's fields; a string it returns stops the run there, with a checkpoint, as the reason
    (a sweep's pruner).  ``extendable``: the run will be extended to larger budgets (``resume`` with a budget),
    so it takes no method whose schedule follows its own budget's share.  ``out`` must hold no run and no other
    files; ``overwrite``: the run files there are deleted first."""
    if not isinstance(config, RunConfig):
        config = load_config(config)
    with writing(Path(out), new=True, overwrite=overwrite):
        return run_held(config, Path(out), stop_after=stop_after, display=display, auto_plan=auto_plan,
                        after_eval=after_eval, extendable=extendable)


def run_held(config: RunConfig, out: Path, *, stop_after: Budget | str | None = None,
             display: ProgressDisplay | None = None, auto_plan: dict[str, Any] | None = None,
             after_eval: AfterEval | None = None, extendable: bool = False) -> Summary:
    """``run`` in a folder this process holds already (``rundir.writing``): the CLI takes the lock before it
    imports torch, so that a second run on the folder is refused at once."""
    session = start_new(config, out, display, extendable=extendable)  # resolve, then build
    session.write_run_files(auto_plan)
    return session.run(LoopState(), _budget(stop_after), after_eval)  # run, then finish


def resume(run_dir: str | Path, budget: Budget | str | None = None, *, stop_after: Budget | str | None = None,
           display: ProgressDisplay | None = None, after_eval: AfterEval | None = None) -> Summary:
    """Continue an interrupted run to its budget, or extend a finished one to a larger ``budget``, exactly
    as the uninterrupted run would have gone; ``after_eval`` as for ``run``."""
    with writing(Path(run_dir), new=False):
        return resume_held(Path(run_dir), budget, stop_after=stop_after, display=display, after_eval=after_eval)


def resume_held(run_dir: Path, budget: Budget | str | None = None, *, stop_after: Budget | str | None = None,
                display: ProgressDisplay | None = None, after_eval: AfterEval | None = None) -> Summary:
    """``resume`` of a run this process holds already (``rundir.writing``), as ``run_held``."""
    session, state = open_for_resume(run_dir, _budget(budget), display)  # resolve, then build
    return session.run(state, _budget(stop_after), after_eval)  # run, then finish


def _budget(value: Budget | str | None) -> Budget | None:
    return Budget.parse(value) if isinstance(value, str) else value
