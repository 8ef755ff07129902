"""The training loop: budgeted, resumable, and short enough to read in one sitting.

Each step asks the budget how many steps are left (exact for token, FLOP and step limits;
from the measured step time for a seconds limit) and sets the learning rate from the
schedule at progress p = (steps done + 1) / (steps done + steps left).  The step predicted to
be the last therefore runs at p = 1 with the schedule's final learning rate, and the run
stops there: at its budget, fully annealed.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from flopwise.budget import Budget, Meter, StepCost, scheduled_steps_left
from flopwise.errors import FlopwiseError
from flopwise.methods.stack import MethodStack
from flopwise.optim.schedules import Schedule
from flopwise.runtime import Ranks, gradient_sync, peak_memory_bytes, synchronize
from flopwise.train.checkpoint import save_checkpoint
from flopwise.train.display import ProgressDisplay
from flopwise.train.forecast import LossForecaster
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


def reached(p: float, mark: float) -> bool:
    """p has reached a mark, ignoring float rounding (12/20 must reach 6 * 0.1)."""
    return p + 1e-9 >= mark


class StepTimer:
    """Running estimate of seconds per step; the first step (allocation, compile) is left out."""

    def __init__(self, estimate: float | None = None, smoothing: float = 0.1) -> None:
        self.estimate = estimate
        self.smoothing = smoothing
        self._seen = 0

    def rescale(self, factor: float) -> None:
        """The step's cost changed by ``factor`` (progressive training's next shape): predict its time from the
        old one's until two steps of the new shape have been timed (the first may compile)."""
        if self.estimate is not None:
            self.estimate *= factor
            self._seen = 0

    def update(self, seconds: float) -> None:
        self._seen += 1
        if self.estimate is None or self._seen == 2:
            self.estimate = seconds
        elif self._seen > 2:
            self.estimate += self.smoothing * (seconds - self.estimate)


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


class Objective(Protocol):
    """What a step trains on and for: pretraining's is the MethodStack (the methods choose and score packed
    windows of the corpus); post-training brings its own (flopwise/posttrain/objective.py)."""

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


def heldout_fields(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The eval event's fields and display line for the held-out loss (flopwise/evaluate/heldout.py); every
    evaluation's fields hold ``val_loss``, the number the curve, the report and the forecast read."""
    fields = {"val_loss": result["loss"], "val_bpb": result["bpb"], "unigram_loss": result["unigram_loss"],
              "domains": {name: d["loss"] for name, d in result["domains"].items()}}
    return fields, f"val_loss {result['loss']:.4f}  bpb {result['bpb']:.4f}"


class Sampler(Protocol):
    """What the loop asks of the data order: the progress it paces by, epochs per domain, resumable state."""

    progress: float

    def domain_epochs(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...


class EventLog(Protocol):
    def append(self, event: dict[str, Any]) -> None: ...


class Trainer:
    """Runs steps until the budget is spent, or until an interruption (checkpointed first).

    ``model`` is what the step calls (possibly compiled or DDP-wrapped); ``module`` is the plain
    model whose state is checkpointed.  Under torchrun every rank runs this loop; only rank 0
    logs, and ``log`` is None on the others.  ``methods`` act through their hooks
    (flopwise/methods/base.py); the loop names none of them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler,
                 settings: LoopSettings, run_dir: Path, device: torch.device, dtype: torch.dtype,
                 evaluate: Callable[[], dict[str, Any]], display: ProgressDisplay, log: EventLog | None,
                 methods: MethodStack, module: torch.nn.Module | None = None, ranks: Ranks = Ranks(),
                 forecaster: LossForecaster | None = None,
                 evaluate_tasks: Callable[[], dict[str, Any]] | None = None,
                 objective: Objective | None = None,
                 eval_fields: Callable[[dict[str, Any]], tuple[dict[str, Any], str]] = heldout_fields,
                 after_eval: Callable[[int, float, dict[str, Any]], str | None] | None = None) -> None:
        self.model = model
        self.module = module if module is not None else model
        self.optimizer = optimizer
        self.sampler = sampler
        self.settings = settings
        self.run_dir = run_dir
        self.device = device
        self.dtype = dtype
        self.evaluate = evaluate
        self.display = display
        self.log = log
        self.ranks = ranks
        self.methods = methods
        self.forecaster = forecaster
        self.evaluate_tasks = evaluate_tasks
        self.objective = objective
        self.eval_fields = eval_fields
        self.after_eval = after_eval  # (step, p, the eval event's fields) -> why to stop, if it should
        self._eval_stop: str | None = None
        self._interrupted = False

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
            while True:
                start = time.perf_counter()
                p_before = state.meter.progress(s.budget)
                tokens, flops = s.costs_at(p_before)
                if previous_flops is not None and flops != previous_flops:
                    timer.rescale(flops / previous_flops)
                previous_flops = flops
                self.methods.begin_step(p_before, self.module, self.optimizer)
                left = self.steps_left(state, timer)
                if left is not None:
                    state.p_lr = max(state.p_lr, (state.meter.steps + 1) / (state.meter.steps + left))
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
                state.meter.add_step(seconds, tokens, flops + self.methods.take_extra_flops())
                timer.update(seconds)
                state.step_seconds = timer.estimate
                outcome.last_lr = lr
                p = state.meter.progress(s.budget)
                finished = left == 1 or p >= 1.0
                logging_start = time.perf_counter()
                self._log_step(state, p, lr, loss, seconds, wall_start, p_at_start, tokens, flops, finished)
                bookkeeping = time.perf_counter() - logging_start
                if finished:
                    outcome.finished = state.finished = True
                    break
                outcome.eval_seconds += self._maybe_evaluate(state, p)
                forecast_start = time.perf_counter()
                outcome.stop_reason = self._eval_stop or self._maybe_forecast(state, p_before, p)
                outcome.eval_seconds += time.perf_counter() - forecast_start
                stop = (self._interrupted or outcome.stop_reason is not None
                        or (s.stop_after is not None and state.meter.progress(s.stop_after) >= 1.0))
                outcome.checkpoint_seconds += self._maybe_checkpoint(state, p, timer, force=stop)
                if stop:
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        return outcome

    def _on_interrupt(self, signum: int, frame: object) -> None:
        """First Ctrl-C: finish the step, checkpoint, stop.  A second one aborts at once."""
        self._interrupted = True
        self.display.message("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def steps_left(self, state: LoopState, timer: StepTimer) -> int | None:
        """Steps the budget still allows, the next one included; a later shape's step time is predicted from
        this one's in proportion to their FLOPs."""
        s = self.settings
        flops_now = s.costs_at(state.meter.progress(s.budget))[1]

        def cost_at(p: float) -> StepCost:
            tokens, flops = s.costs_at(p)
            return StepCost(tokens, flops, None if timer.estimate is None else timer.estimate * flops / flops_now)
        return scheduled_steps_left(state.meter, s.budget, cost_at, s.breakpoints)

    def _log_step(self, state: LoopState, p: float, lr: float, loss: float, seconds: float, wall_start: float,
                  p_at_start: float, tokens: float, flops: float, last: bool) -> None:
        s = self.settings
        tokens_per_s = tokens / seconds
        mfu = flops / seconds / s.peak_flops if s.peak_flops else None
        wall = time.perf_counter() - wall_start
        eta = wall * (1 - p) / (p - p_at_start) if p > p_at_start else None
        self.display.update(p, state.meter, s.budget, loss, tokens_per_s, mfu, eta)
        step = int(state.meter.steps)
        regular = is_logged_step(step, s.log_every)
        if not (regular or last or self._interrupted):
            return
        event = {"event": "train", "step": step, "p": p, "p_lr": state.p_lr, "tokens": state.meter.tokens,
                 "flops": state.meter.flops, "seconds": state.meter.seconds, "wall": wall, "lr": lr, "loss": loss,
                 "throughput": tokens_per_s, "mfu": mfu, "memory": peak_memory_bytes(self.device)}
        event.update(self.methods.log_fields())
        if self.forecaster is not None and regular:  # the same points whether or not the run was interrupted
            self.forecaster.observe(event)
        if self.log is not None:
            self.log.append(event)

    def _maybe_forecast(self, state: LoopState, p_before: float, p: float) -> str | None:
        """Log the forecast final loss each time this step's progress crosses a multiple of ``forecast_every``
        (read from p alone, so a resume needs no state); returns why to stop, if the forecast says the
        target loss is out of reach."""
        every = self.forecaster.every if self.forecaster is not None else 0.0
        if every <= 0 or p >= 1.0 or not reached(p, next_mark(p_before, every)):
            return None
        forecast = self.forecaster.forecast(state.meter.tokens, p)
        if forecast is None:
            return None
        if self.log is not None:
            self.log.append({"event": "forecast", "step": int(state.meter.steps), "p": p,
                             "tokens": state.meter.tokens, **forecast.to_dict()})
        parts = (f"; curve {forecast.curve_loss:.4f}, law {forecast.law_loss:.4f} at weight {forecast.law_weight:.2f}"
                 if forecast.law_loss is not None else "")
        self.display.message(f"forecast at p={p:.2f}: final held-out loss {forecast.loss:.4f} "
                             f"({forecast.low:.4f}-{forecast.high:.4f}{parts})")
        if self.forecaster.cannot_reach(forecast):
            return (f"the forecast final loss {forecast.loss:.4f} (at best {forecast.low:.4f}) cannot reach "
                    f"train.target_loss {self.forecaster.target:g}")
        return None

    def _maybe_evaluate(self, state: LoopState, p: float) -> float:
        if self.settings.eval_every <= 0 or not reached(p, state.next_eval):
            return 0.0
        start = time.perf_counter()
        result = self.evaluate()
        self.model.train()
        state.next_eval = next_mark(p, self.settings.eval_every)
        fields = self.log_eval(state, p, result)
        if self.after_eval is not None:  # a sweep's pruner, say: it may rank by the forecast final loss
            forecast = self.forecaster.forecast(state.meter.tokens, p) if self.forecaster is not None else None
            extra = {"forecast_loss": forecast.loss} if forecast is not None else {}
            self._eval_stop = self.after_eval(int(state.meter.steps), p, {**fields, **extra})
        return time.perf_counter() - start + self.log_tasks(state, p)

    def log_tasks(self, state: LoopState, p: float) -> float:
        """Score the run's tasks (train.eval_tasks) and log them beside the held-out loss; returns the seconds
        it took, which are evaluation time, not training time."""
        if self.evaluate_tasks is None:
            return 0.0
        start = time.perf_counter()
        results = self.evaluate_tasks()
        seconds = time.perf_counter() - start
        if self.log is not None:
            self.log.append({"event": "tasks", "step": int(state.meter.steps), "p": p, "tokens": state.meter.tokens,
                             "flops": state.meter.flops, "seconds": state.meter.seconds, "eval_seconds": seconds,
                             "tasks": results})
        scores = "  ".join(f"{name} {r['centered']:+.3f}" for name, r in results.items())
        self.display.message(f"tasks step {int(state.meter.steps)}  p={p:.3f}  centered: {scores}  ({seconds:.1f}s)")
        return seconds

    def log_eval(self, state: LoopState, p: float, result: dict[str, Any]) -> dict[str, Any]:
        """Show and log one evaluation; returns its event fields."""
        fields, line = self.eval_fields(result)
        self.display.message(f"eval  step {int(state.meter.steps)}  p={p:.3f}  {line}")
        if self.log is not None:
            self.log.append({"event": "eval", "step": int(state.meter.steps), "p": p, "tokens": state.meter.tokens,
                             "flops": state.meter.flops, "seconds": state.meter.seconds, **fields,
                             "epochs": self.sampler.domain_epochs()})
        return fields

    def _maybe_checkpoint(self, state: LoopState, p: float, timer: StepTimer, force: bool) -> float:
        """Checkpoint every ``checkpoint_every`` of the budget, on interruption, and (pinned)
        just before the schedule starts to decay, which is where a finished run can be extended from."""
        s = self.settings
        left = self.steps_left(state, timer)
        next_p_lr = (state.meter.steps + 1) / (state.meter.steps + left) if left else state.p_lr
        pinned = state.p_lr <= s.schedule.decay_start < next_p_lr
        periodic = s.checkpoint_every > 0 and reached(p, state.next_checkpoint)
        if not (force or pinned or periodic):
            return 0.0
        start = time.perf_counter()
        if periodic:
            state.next_checkpoint = next_mark(p, s.checkpoint_every)
        self.checkpoint(state, pinned)
        return time.perf_counter() - start

    def checkpoint(self, state: LoopState, pinned: bool = False) -> None:
        s = self.settings
        save_checkpoint(self.run_dir / "checkpoints", int(state.meter.steps), self.module, self.optimizer,
                        {"loop": state.to_dict(), "sampler": self.sampler.state_dict(), "pinned": pinned,
                         "methods": self.methods.state_dict(),
                         "budget": s.budget.to_dict(), "world_size": self.ranks.world_size},
                        s.keep_checkpoints, self.ranks)
