"""The training loop: budgeted, resumable, and short enough to read in one sitting.

Each step sets the learning rate from the schedule at the progress the budget will have spent once the step is
done: the spent progress p plus one predicted step (exact for token, FLOP and step limits; from the median recent
step time for a seconds limit).  Only what the budget has really spent moves the schedule, so a slow step or a
stall can neither start the decay early nor skip it.  The step the budget predicts to be its last runs at p = 1
with the schedule's final learning rate, and the run stops there: at its budget, fully annealed.  Where a stall
eats what the decay had left, the run finishes the decay within a bounded overrun (``DecayTail``) and says so.

The methods are the loop's algorithms (flopwise/methods/); everything else that acts during a run (logging,
evaluation, the loss forecast, a sweep's pruner) is a ``LoopCallback`` the loop calls at two named points:
``on_step`` after every step, and ``at_progress`` after each step that does not end the run.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from flopwise.budget import Budget, Meter, StepCost, scheduled_steps_left
from flopwise.errors import FlopwiseError
from flopwise.methods.stack import MethodStack
from flopwise.optim.schedules import Schedule
from flopwise.runtime import Ranks, gradient_sync, peak_memory_bytes, synchronize
from flopwise.train.checkpoint import save_checkpoint
from flopwise.train.display import ProgressDisplay
from flopwise.train.loss_curve import CurvePoint, points_from_events


def next_mark(p: float, every: float) -> float:
    """The next multiple of ``every`` above ``p`` (when the next evaluation or checkpoint is due)."""
    return (int(p / every + 1e-9) + 1) * every if every > 0 else 0.0


def is_logged_step(step: int, log_every: int) -> bool:
    """Steps logged on schedule (the first, then every ``log_every``-th); the last step and an
    interrupted one are logged too, off schedule."""
    return step == 1 or step % log_every == 0


def forecast_points(events: Iterable[dict[str, Any]], log_every: int,
                    through_step: float = math.inf) -> list[CurvePoint]:
    """The curve points a run's forecaster was fed, read back from its metrics.jsonl events: the train
    events logged on schedule, up to ``through_step`` (off-schedule ones are not fed, so that an
    interrupted and resumed run forecasts from the same points as an uninterrupted one)."""
    return points_from_events(e for e in events if e["event"] == "train" and e["step"] <= through_step
                              and is_logged_step(e["step"], log_every))


def eta_seconds(wall: float, p: float, p_at_start: float) -> float | None:
    """Wall-clock seconds until p = 1 at the pace since this process started at ``p_at_start``: none left past
    the budget (a decay's tail), unknown before any progress."""
    return wall * max(1.0 - p, 0.0) / (p - p_at_start) if p > p_at_start else None


def reached(p: float, mark: float) -> bool:
    """p has reached a mark, ignoring float rounding (12/20 must reach 6 * 0.1)."""
    return p + 1e-9 >= mark


class StepTimer:
    """Seconds per step: the median of the last ``window`` steps of the current shape.

    A median, not a running mean, so that a stall (one step many times slower while the machine is busy) does
    not move the prediction, while a lasting slowdown does once it holds for half the window.  The first step of
    a run or of a new shape (allocation, compile) is left out where an estimate exists."""

    def __init__(self, estimate: float | None = None, window: int = 9) -> None:
        self.estimate = estimate
        self._recent: deque[float] = deque(maxlen=window)
        self._first = True

    def rescale(self, factor: float) -> None:
        """The step's cost changed by ``factor`` (progressive training's next shape): predict its time from the
        old one's until steps of the new shape have been timed."""
        if self.estimate is not None:
            self.estimate *= factor
            self._recent.clear()
            self._first = True

    def update(self, seconds: float) -> None:
        first, self._first = self._first, False
        if first and self.estimate is not None:
            return
        if first:  # nothing better to go on until the second step
            self.estimate = seconds
            return
        self._recent.append(seconds)
        self.estimate = statistics.median(self._recent)


@dataclass(frozen=True)
class DecayTail:
    """The rest of a decay that a stall left no budget for.  The budget ran out (or has one step left) while the
    schedule stood at ``p_lr`` < 1, so ``steps`` more steps run it evenly on to p = 1, spending at most the larger
    of one step and ``OVERRUN_SHARE`` of the budget past where the stall left the run (``limit``: the progress
    the tail may reach)."""

    OVERRUN_SHARE = 0.02
    p_lr: float
    steps: int
    limit: float

    @classmethod
    def after(cls, p: float, p_lr: float, step_share: float) -> DecayTail:
        """The tail of a run at progress ``p`` whose schedule stands at ``p_lr``; ``step_share``: the predicted
        progress of one step."""
        limit = max(p, 1.0) + max(step_share, cls.OVERRUN_SHARE)
        steps = max(1, int((limit - p) / step_share + 1e-9)) if step_share > 0 else 1
        return cls(p_lr, steps, limit)

    def p_lr_of(self, taken: int) -> float:
        """Where the schedule stands at the tail's ``taken``-th step (from 1): evenly on to 1."""
        return 1.0 if taken >= self.steps else self.p_lr + (1.0 - self.p_lr) * taken / self.steps


@dataclass(frozen=True)
class DecayEnd:
    """How a decay ended that a stall cut into, for the summary, plan.json and metrics.jsonl (never silent).

    ``cut_at``: the schedule's progress where the budget ran out; ``tail_steps``: the steps run to finish it;
    ``overrun``: the share of the budget spent past it, the stall's included; ``finished``: the schedule reached
    its end (the final learning rate) within the bound; ``last_lr_multiplier``: the schedule at the last step;
    ``squeezed``: the share of the planned decay that ran in the tail instead of over its share of the budget;
    ``cut_short``: not finished, or too much of it squeezed to count as a decay."""

    cut_at: float
    tail_steps: int
    overrun: float
    finished: bool
    last_lr_multiplier: float
    squeezed: float

    SQUEEZED_TOO_MUCH = 0.25

    @classmethod
    def of(cls, tail: DecayTail, taken: int, p: float, p_lr: float, schedule: Schedule) -> DecayEnd:
        span = 1.0 - schedule.decay_start
        squeezed = (1.0 - max(tail.p_lr, schedule.decay_start)) / span if span > 0 else 0.0
        return cls(tail.p_lr, taken, max(p - 1.0, 0.0), p_lr >= 1.0, schedule(p_lr), squeezed)

    @property
    def cut_short(self) -> bool:
        return not self.finished or self.squeezed > self.SQUEEZED_TOO_MUCH

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cut_short": self.cut_short}

    def describe(self) -> str:
        head = f"the budget ran out at schedule progress {self.cut_at:.3f} (a slow step or a stall): the decay "
        tail = f"{self.tail_steps} more step(s), {100 * self.overrun:.1f}% of the budget past it"
        if not self.cut_short:
            return f"{head}finished in {tail}"
        reached = (f"reached {self.last_lr_multiplier:.3g} of the peak learning rate" if not self.finished else
                   f"ran its last {100 * self.squeezed:.0f}% in them")
        return (f"{head}was cut short: {tail}, {reached}. To run it in full, extend the run from its checkpoint "
                "before the decay: flopwise train --resume RUN --budget LARGER")


@dataclass
class LoopState:
    """Everything besides tensors that the next step depends on; saved in each checkpoint."""

    meter: Meter = field(default_factory=Meter)
    p_lr: float = 0.0
    next_eval: float = 0.0
    next_checkpoint: float = 0.0
    step_seconds: float | None = None
    finished: bool = False  # the last step is done: a resume only evaluates and saves the final model

    def to_dict(self) -> dict[str, Any]:
        return {"meter": self.meter.to_dict(), "p_lr": self.p_lr, "next_eval": self.next_eval,
                "next_checkpoint": self.next_checkpoint, "step_seconds": self.step_seconds,
                "finished": self.finished}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        return cls(meter=Meter.from_dict(data["meter"]), p_lr=data["p_lr"], next_eval=data["next_eval"],
                   next_checkpoint=data["next_checkpoint"], step_seconds=data["step_seconds"],
                   finished=data.get("finished", False))


@dataclass
class LoopSettings:
    budget: Budget
    schedule: Schedule
    peak_lr: float
    grad_accum: int
    grad_clip: float
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None
    eval_every: float
    checkpoint_every: float
    keep_checkpoints: int
    log_every: int
    stop_after: Budget | None = None
    # progressive training: (tokens, FLOPs) of a step taken at progress p, constant between the breakpoints;
    # None: every step costs tokens_per_step and flops_per_step
    step_costs: Callable[[float], tuple[float, float]] | None = None
    breakpoints: tuple[float, ...] = ()
    # FLOPs a step is expected to spend beyond step_costs' (RL's rollouts, metered as they are spent): the plan of
    # the remaining steps counts them; None: none
    expected_extra_flops: Callable[[], float] | None = None

    def costs_at(self, p: float) -> tuple[float, float]:
        """(tokens, FLOPs) of a step taken at budget progress ``p``."""
        return self.step_costs(p) if self.step_costs is not None else (self.tokens_per_step, self.flops_per_step)


@dataclass
class Outcome:
    state: LoopState
    finished: bool
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    last_lr: float = 0.0
    stop_reason: str | None = None
    decay: DecayEnd | None = None  # where a stall cut into the decay


class Objective(Protocol):
    """What a step trains on and for: pretraining's is the MethodStack (the methods choose and score packed
    windows of the corpus); post-training brings its own (flopwise/posttrain/objective.py).  An objective that
    spends FLOPs beyond the step's own as it runs (RL's rollouts, flopwise/rl/objective.py) also has
    ``take_extra_flops() -> float``: those FLOPs (all ranks) since its last call, which the meter adds."""

    def next_batch(self) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]: ...



def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, methods: MethodStack,
               grad_accum: int, grad_clip: float, device: torch.device, dtype: torch.dtype,
               ranks: Ranks = Ranks(), objective: Objective | None = None) -> float:
    """One optimizer step over ``grad_accum`` micro-batches, each chosen and scored by the objective (by
    default the methods: ``methods.next_batch``, ``methods.loss``); returns the mean cross-entropy over the
    global batch (all ranks).  The throughput probe (flopwise/plan/throughput.py) times this same code."""
    objective = objective if objective is not None else methods
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        batch = objective.next_batch()
        with gradient_sync(model, enabled=micro == grad_accum - 1):
            loss, cross_entropy = objective.loss(model, batch, device, dtype)
            (loss / grad_accum).backward()
        total += cross_entropy
    if grad_clip > 0 and methods.keeps_gradients:  # gradients used up in backward cannot be clipped
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ranks.mean(total.item() / grad_accum)


@dataclass(frozen=True)
class StepRecord:
    """One step as the loop saw it: progress after it, its loss, throughput, MFU and the ETA of the budget, and
    its ``train`` event of metrics.jsonl where the step is logged (None otherwise); ``regular``: logged on
    schedule (the last and an interrupted step are logged off it)."""

    p: float
    loss: float
    tokens_per_second: float
    mfu: float | None
    eta: float | None
    event: dict[str, Any] | None
    regular: bool


class LoopCallback:
    """What acts at the loop's named points besides the methods: each point does nothing by default."""

    def on_step(self, loop: Trainer, state: LoopState, record: StepRecord) -> None:
        """After every step, with what it spent and saw (logging, the display, the forecast's curve); its time
        counts as training time."""

    def at_progress(self, loop: Trainer, state: LoopState, p_before: float, p: float) -> str | None:
        """After a step that did not end the run, from progress ``p_before`` to ``p``: act at the budget's marks
        (evaluate, forecast); returns why the run should stop, if it should.  Its time counts as evaluation."""
        return None


class Sampler(Protocol):
    """What the loop asks of the data order: the progress it paces by, epochs per domain, resumable state."""

    progress: float

    def domain_epochs(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...


class Trainer:
    """Runs steps until the budget is spent, or until an interruption (checkpointed first).

    ``model`` is what the step calls (possibly compiled or DDP-wrapped); ``module`` is the plain
    model whose state is checkpointed.  Under torchrun every rank runs this loop.  ``methods`` act through
    their hooks (flopwise/methods/base.py) and ``callbacks`` at the loop's named points
    (flopwise/train/callbacks.py: logging, evaluation, the forecast, a sweep's pruner); the loop names none
    of them."""

    TAIL_GAP = 2.5  # steps of schedule left at the budget's last step that only a stall leaves: finish with a tail
    CHECKPOINT_SHARE = 0.02  # a seconds budget's periodic checkpoints cost at most this share of its training

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler,
                 settings: LoopSettings, run_dir: Path, device: torch.device, dtype: torch.dtype,
                 methods: MethodStack, display: ProgressDisplay, module: torch.nn.Module | None = None,
                 ranks: Ranks = Ranks(), objective: Objective | None = None,
                 callbacks: Sequence[LoopCallback] = ()) -> None:
        self.model = model
        self.module = module if module is not None else model
        self.optimizer = optimizer
        self.sampler = sampler
        self.settings = settings
        self.run_dir = run_dir
        self.device = device
        self.dtype = dtype
        self.methods = methods
        self.display = display
        self.ranks = ranks
        self.objective = objective
        self.callbacks = tuple(callbacks)
        self._interrupted = False
        self._last_checkpoint: tuple[float, float] | None = None  # (training seconds then, seconds it took)

    def train_step(self, step: int, p: float) -> float:
        """One step at progress ``p``, which the sampler's pacing and the methods read."""
        s = self.settings
        self.sampler.progress = p
        self.methods.on_progress(step, p)
        return train_step(self.model, self.optimizer, self.methods, s.grad_accum, s.grad_clip, self.device,
                          self.dtype, self.ranks, self.objective)

    def run(self, state: LoopState) -> Outcome:
        s = self.settings
        timer = StepTimer(state.step_seconds)
        outcome = Outcome(state=state, finished=False)
        wall_start, p_at_start = time.perf_counter(), state.meter.progress(s.budget)
        if state.finished:  # checkpointed after its last step, interrupted before its final save
            outcome.finished, outcome.last_lr = True, s.peak_lr * s.schedule(state.p_lr)
            return outcome
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            self.model.train()
            bookkeeping = 0.0  # logging time of the previous step: training time too, unlike eval
            previous_flops: float | None = None
            tail: DecayTail | None = None
            tail_taken = 0
            while True:
                start = time.perf_counter()
                p_before = state.meter.progress(s.budget)
                tokens, flops = s.costs_at(p_before)
                if previous_flops is not None and flops != previous_flops:
                    timer.rescale(flops / previous_flops)
                previous_flops = flops
                self.methods.begin_step(p_before, self.module, self.optimizer)
                if tail is None:
                    left = self.steps_left(state, timer)
                    share = self.step_share(state, timer) if left == 1 else 0.0
                    if left == 1 and 1.0 - state.p_lr > self.TAIL_GAP * share:  # a stall took the decay's steps
                        tail = DecayTail.after(p_before, state.p_lr, share)
                if tail is None:
                    state.p_lr = self.next_p_lr(state, timer, left)
                else:
                    tail_taken += 1
                    state.p_lr = tail.p_lr_of(tail_taken)
                step = int(state.meter.steps)
                self.methods.before_step(step, self.module, self.optimizer)
                multiplier = s.schedule(state.p_lr) * self.methods.lr_factor(step)
                lr = s.peak_lr * multiplier
                for group in self.optimizer.param_groups:
                    group["lr"] = group.get("peak_lr", s.peak_lr) * multiplier
                loss = self.train_step(step, state.p_lr)
                if not math.isfinite(loss):  # the same on every rank: the loss is averaged over them
                    raise FlopwiseError(f"the training loss became {loss} at step {step + 1}: stopped, and no "
                                        "checkpoint holds that step; the earlier checkpoints are kept. Lower "
                                        "optim.lr or raise schedule.warmup, or check the data")
                self.methods.after_step(step + 1, self.module, self.optimizer)
                synchronize(self.device)
                # all ranks take the slowest rank's time and stop together on an interrupt
                seconds, interrupted = self.ranks.max(time.perf_counter() - start + bookkeeping,
                                                      float(self._interrupted))
                self._interrupted = bool(interrupted)
                extra = self.methods.take_extra_flops()
                if hasattr(self.objective, "take_extra_flops"):  # the optional part of the Objective protocol
                    extra += self.objective.take_extra_flops()
                state.meter.add_step(seconds, tokens, flops + extra)
                timer.update(seconds)
                state.step_seconds = timer.estimate
                outcome.last_lr = lr
                p = state.meter.progress(s.budget)
                if tail is None:
                    finished = left == 1 or p >= 1.0
                    if finished and state.p_lr < 1.0:  # a slow step spent what the decay had left
                        tail = DecayTail.after(p, state.p_lr, self.step_share(state, timer))
                        finished = False
                else:
                    finished = state.p_lr >= 1.0 or p >= tail.limit or self._interrupted
                if finished and tail is not None:
                    outcome.decay = DecayEnd.of(tail, tail_taken, p, state.p_lr, s.schedule)
                logging_start = time.perf_counter()
                record = self._record(state, p, lr, loss, seconds, wall_start, p_at_start, tokens, flops, finished)
                for callback in self.callbacks:
                    callback.on_step(self, state, record)
                bookkeeping = time.perf_counter() - logging_start
                if finished:
                    outcome.finished = state.finished = True  # a cut decay is said by the summary
                    break
                if tail is not None:  # at the budget's end: no evaluation or checkpoint until the decay is done
                    continue
                marks_start = time.perf_counter()
                outcome.stop_reason = self._at_progress(state, p_before, p)
                outcome.eval_seconds += time.perf_counter() - marks_start
                stop = (self._interrupted or outcome.stop_reason is not None
                        or (s.stop_after is not None and state.meter.progress(s.stop_after) >= 1.0))
                outcome.checkpoint_seconds += self._maybe_checkpoint(state, p, timer, force=stop)
                if stop:
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        return outcome

    def _at_progress(self, state: LoopState, p_before: float, p: float) -> str | None:
        """The callbacks' turn after a step that did not end the run (evaluation and forecast time, not training
        time); the first reason to stop ends the round."""
        for callback in self.callbacks:
            reason = callback.at_progress(self, state, p_before, p)
            if reason is not None:
                return reason
        return None

    def _on_interrupt(self, signum: int, frame: object) -> None:
        """First Ctrl-C: finish the step, checkpoint, stop.  A second one aborts at once."""
        self._interrupted = True
        self.display.message("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def step_costs(self, state: LoopState, timer: StepTimer) -> Callable[[float], StepCost]:
        """What a step taken at progress p costs: its tokens and FLOPs (with those expected beyond them), and its
        seconds, a later shape's predicted from this one's step time in proportion to their FLOPs (unknown until a
        step is timed)."""
        s = self.settings
        extra = s.expected_extra_flops() if s.expected_extra_flops is not None else 0.0
        flops_now = s.costs_at(state.meter.progress(s.budget))[1] + extra

        def cost_at(p: float) -> StepCost:
            tokens, flops = s.costs_at(p)
            flops += extra
            return StepCost(tokens, flops, None if timer.estimate is None else timer.estimate * (flops / flops_now))
        return cost_at

    def steps_left(self, state: LoopState, timer: StepTimer) -> int | None:
        """Steps the budget still allows, the next one included."""
        s = self.settings
        return scheduled_steps_left(state.meter, s.budget, self.step_costs(state, timer), s.breakpoints)

    def progress_after_next_step(self, state: LoopState, timer: StepTimer) -> float:
        """The progress the budget will have spent after one more step, as predicted: exact for token, FLOP and
        step limits, from the step time for a seconds limit (which counts what it has spent until a step has
        been timed)."""
        s = self.settings
        meter = state.meter
        cost = self.step_costs(state, timer)(meter.progress(s.budget))
        return max((getattr(meter, name) + (getattr(cost, name) or 0.0)) / limit
                   for name, limit in s.budget.set_limits().items())

    def step_share(self, state: LoopState, timer: StepTimer) -> float:
        """The share of the budget one more step will spend, as predicted."""
        return self.progress_after_next_step(state, timer) - state.meter.progress(self.settings.budget)

    def next_p_lr(self, state: LoopState, timer: StepTimer, left: int | None) -> float:
        """The schedule's progress for the next step: 1 where the budget allows no other, else the progress the
        budget will have spent after it.  It never moves back (after a step faster than predicted)."""
        if left == 1:
            return 1.0
        return max(state.p_lr, min(1.0, self.progress_after_next_step(state, timer)))

    def _record(self, state: LoopState, p: float, lr: float, loss: float, seconds: float, wall_start: float,
                p_at_start: float, tokens: float, flops: float, last: bool) -> StepRecord:
        """What the step spent and saw; its ``train`` event where the step is logged."""
        s = self.settings
        tokens_per_s = tokens / seconds
        mfu = flops / seconds / s.peak_flops if s.peak_flops else None
        wall = time.perf_counter() - wall_start
        eta = eta_seconds(wall, p, p_at_start)
        step = int(state.meter.steps)
        regular = is_logged_step(step, s.log_every)
        event = None
        if regular or last or self._interrupted:
            event = {"event": "train", "step": step, "p": p, "p_lr": state.p_lr, "tokens": state.meter.tokens,
                     "flops": state.meter.flops, "seconds": state.meter.seconds, "wall": wall, "lr": lr,
                     "loss": loss, "throughput": tokens_per_s, "mfu": mfu, "memory": peak_memory_bytes(self.device)}
            event.update(self.methods.log_fields())
        return StepRecord(p, loss, tokens_per_s, mfu, eta, event, regular)

    def _maybe_checkpoint(self, state: LoopState, p: float, timer: StepTimer, force: bool) -> float:
        """Checkpoint every ``checkpoint_every`` of the budget (under a seconds budget, where it pays:
        ``checkpoint_pays``), on interruption, and (pinned) just before the schedule starts to decay, which is
        where a finished run can be extended from."""
        s = self.settings
        next_p_lr = self.next_p_lr(state, timer, self.steps_left(state, timer))
        pinned = state.p_lr <= s.schedule.decay_start < next_p_lr
        periodic = s.checkpoint_every > 0 and reached(p, state.next_checkpoint) and self.checkpoint_pays(state)
        if not (force or pinned or periodic):
            return 0.0
        start = time.perf_counter()
        if periodic:
            state.next_checkpoint = next_mark(p, s.checkpoint_every)
        self.checkpoint(state, pinned)
        seconds = time.perf_counter() - start
        self._last_checkpoint = (state.meter.seconds, seconds)
        return seconds

    def checkpoint_pays(self, state: LoopState) -> bool:
        """Whether a periodic checkpoint is due by its cost: under a seconds budget, once the training since the
        last checkpoint is 1 / CHECKPOINT_SHARE times what that one took (a 12 s budget's ten marks would
        otherwise cost up to a tenth of it, to save seconds of work); always under the other limits, whose
        checkpoints stay where the budget's shares put them on any machine."""
        if "seconds" not in self.settings.budget.set_limits() or self._last_checkpoint is None:
            return True
        at, took = self._last_checkpoint
        return state.meter.seconds - at >= took / self.CHECKPOINT_SHARE

    def checkpoint(self, state: LoopState, pinned: bool = False) -> None:
        s = self.settings
        save_checkpoint(self.run_dir / "checkpoints", int(state.meter.steps), self.module, self.optimizer,
                        {"loop": state.to_dict(), "sampler": self.sampler.state_dict(), "pinned": pinned,
                         "methods": self.methods.state_dict(),
                         "budget": s.budget.to_dict(), "world_size": self.ranks.world_size},
                        s.keep_checkpoints, self.ranks, self.methods.tensor_state())
