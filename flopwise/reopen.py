"""Reopening a run folder: continue an interrupted run from its newest intact checkpoint (from step 0 if it was
interrupted before its first), or extend a finished one to a larger budget from its pinned checkpoint, the last
one before the learning rate began to decay.  The run folder is the whole truth: config.toml (resolved),
plan.json's shape, tokenizer.json and the checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from flopwise.atomic import write_atomic
from flopwise.budget import Budget, Meter
from flopwise.config import RunConfig, config_to_toml, load_run_config
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.resolve import resolve, unextendable
from flopwise.rundir import CONFIG_FILE, PLAN_FILE, planned_model_config
from flopwise.session import Processes, Session
from flopwise.train.checkpoint import CheckpointInfo, list_checkpoints, newest_intact
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import LoopState, next_mark


def open_for_resume(run_dir: Path, budget: Budget | None,
                    display: ProgressDisplay | None = None) -> tuple[Session, LoopState]:
    """Reopen a run: continue an interrupted one (from its newest intact checkpoint, or from step 0 if it
    was interrupted before its first), or extend a finished one to a larger budget."""
    config = load_run_config(run_dir)
    planned = planned_model_config(run_dir)
    _check_config_matches_plan(run_dir, config, planned)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    finished = (run_dir / "final").is_dir()
    if finished and budget is None:
        raise FlopwiseError(f"run '{run_dir}' already spent its budget: to train longer, pass a larger "
                            f"--budget with --resume {run_dir}")
    skipped: list[str] = []  # corrupt checkpoints, said once the session's display is up
    old_budget = config.budget.build()
    checkpoint: CheckpointInfo | None = None
    if budget is not None:
        checkpoint, config = _extension_point(run_dir, config, checkpoints, budget, skipped.append)
    elif checkpoints:
        checkpoint = newest_intact(run_dir, checkpoints, skipped.append)
    processes = Processes.open(config.train)
    resolved = resolve(config, processes.world(config.train.parallel), new=False, model=planned)
    session = Session(resolved, run_dir, processes, display)
    for line in skipped:
        session.display.message(line)
    session.prepare(Tokenizer.load(run_dir / "tokenizer.json"), planned)
    if checkpoint is None:
        return session, session.restart()
    session.build()
    state = session.resume_from(checkpoint)
    if budget is not None:
        _rescale_progress(state, old_budget, budget, config)
        write_atomic(run_dir / CONFIG_FILE, config_to_toml(config))
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    return session, state


def _check_config_matches_plan(run_dir: Path, config: RunConfig, planned: ModelConfig) -> None:
    """Refuse a config.toml whose model section no longer describes the shape the run was planned and
    checkpointed with (plan.json), e.g. after a hand edit; an imported model's shape is its own."""
    if config.model.init_from:
        return
    try:
        described = config.model.build(planned.vocab_size).to_dict()
    except FlopwiseError as err:
        raise FlopwiseError(f"'{run_dir / CONFIG_FILE}': {err}") from None
    for key, value in planned.to_dict().items():
        if described.get(key) != value:
            raise FlopwiseError(f"'{run_dir / CONFIG_FILE}' gives model.{key} = {described.get(key)}, but the run was "
                                f"planned and checkpointed with {value} ({PLAN_FILE}): set it back, or start a new run")


def _rescale_progress(state: LoopState, old: Budget, new: Budget, config: RunConfig) -> None:
    """Express the loop's progress marks in the new budget's terms."""
    p_new = state.meter.progress(new)
    state.p_lr *= p_new / state.meter.progress(old)
    state.next_eval = next_mark(p_new, config.train.eval_every)
    state.next_checkpoint = next_mark(p_new, config.train.checkpoint_every)


def _extension_point(run_dir: Path, config: RunConfig, checkpoints: list[CheckpointInfo], budget: Budget,
                     say: Callable[[str], None]) -> tuple[CheckpointInfo, RunConfig]:
    """The newest intact pinned checkpoint, and the config with its budget replaced and its warmup rescaled so
    that the steps already taken keep the learning rates they had."""
    fixed = unextendable(config.methods.use)
    if fixed:
        raise FlopwiseError(f"run '{run_dir}' trained with {', '.join(fixed)}, whose schedules follow the share "
                            "of its original budget, so it cannot be extended: start a new run with the larger budget")
    pinned = [info for info in checkpoints if info.pinned]
    if not pinned:
        raise FlopwiseError(f"run '{run_dir}' has no checkpoint from before its decay phase, so it cannot be "
                            "extended: start a new run with the larger budget")
    checkpoint = newest_intact(run_dir, pinned, say)
    meter = Meter.from_dict(checkpoint.state["loop"]["meter"])
    old_p, new_p = meter.progress(config.budget.build()), meter.progress(budget)
    schedule = config.schedule.build()
    if new_p >= schedule.decay_start:
        raise FlopwiseError(f"--budget {budget.describe()} is not larger than what run '{run_dir}' had spent "
                            "before its decay: give a larger budget")
    extended = config.replace(**{"schedule.warmup": schedule.warmup * new_p / old_p}, **budget.config_values())
    return checkpoint, extended
