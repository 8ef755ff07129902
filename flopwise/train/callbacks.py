"""What acts at the training loop's named points besides the methods (flopwise/train/trainer.py's
``LoopCallback``): the progress display, the metrics log, the stage's evaluation with its tasks and listener,
and the loss forecast.  A session composes the ones its stage needs; the loop knows none of them."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from flopwise.budget import Budget
from flopwise.train.display import ProgressDisplay
from flopwise.train.forecast import LossForecaster
from flopwise.train.trainer import LoopCallback, LoopState, Sampler, StepRecord, Trainer, next_mark, reached

EvalFields = Callable[[dict[str, Any]], tuple[dict[str, Any], str]]  # a result -> (its event's fields, a line)
AfterEval = Callable[[int, float, dict[str, Any]], str | None]  # (step, p, the eval event's fields) -> why to stop


class EventLog(Protocol):
    def append(self, event: dict[str, Any]) -> None: ...


class Progress(LoopCallback):
    """The live progress line: spent, ETA, loss, throughput and MFU after every step."""

    def __init__(self, display: ProgressDisplay, budget: Budget) -> None:
        self.display, self.budget = display, budget

    def on_step(self, loop: Trainer, state: LoopState, record: StepRecord) -> None:
        self.display.update(record.p, state.meter, self.budget, record.loss, record.tokens_per_second, record.mfu,
                            record.eta)


class Metrics(LoopCallback):
    """Each logged step's ``train`` event, to metrics.jsonl (and the loggers beside it)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def on_step(self, loop: Trainer, state: LoopState, record: StepRecord) -> None:
        if record.event is not None:
            self.log.append(record.event)


class Evaluation(LoopCallback):
    """The stage's held-out evaluation every ``every`` of the budget, logged as an ``eval`` event, then the
    run's tasks (``tasks``: their results, scored by the main process) as a ``tasks`` event.  ``after_eval``
    (a sweep's pruner) reads each eval event's fields, with the forecast final loss where ``forecast`` gives
    one, and may stop the run.  The session also logs the start's and the final evaluation through it.
    ``evaluate`` is given the tokens trained so far (the stage may size its sample by them)."""

    def __init__(self, evaluate: Callable[[float], dict[str, Any]], fields: EvalFields, every: float, sampler: Sampler,
                 display: ProgressDisplay, log: EventLog | None,
                 tasks: Callable[[], dict[str, Any]] | None = None, after_eval: AfterEval | None = None,
                 forecast: Callable[[float, float], float | None] | None = None,
                 before_change: dict[str, Any] | None = None) -> None:
        self.evaluate, self.fields, self.every, self.sampler = evaluate, fields, every, sampler
        self.display, self.log, self.tasks = display, log, tasks
        self.after_eval, self.forecast = after_eval, forecast
        self.before_change = before_change  # the eval event before the run's last change of shape (resumed)
        self.notes: list[str] = []  # what the evaluations found the user must hear

    def at_progress(self, loop: Trainer, state: LoopState, p_before: float, p: float) -> str | None:
        self.evaluate_before_last_change(loop, state, p_before, p)
        if self.every <= 0 or not reached(p, state.next_eval):
            return None
        result = self.evaluate(state.meter.tokens)
        loop.model.train()
        state.next_eval = next_mark(p, self.every)
        fields = self.log_eval(state, p, result)
        reason = None
        if self.after_eval is not None:
            forecast = self.forecast(state.meter.tokens, p) if self.forecast is not None else None
            extra = {"forecast_loss": forecast} if forecast is not None else {}
            reason = self.after_eval(int(state.meter.steps), p, {**fields, **extra})
        self.log_tasks(state, p)
        return reason

    def evaluate_before_last_change(self, loop: Trainer, state: LoopState, p_before: float, p: float) -> None:
        """Evaluate the model as it is before the run's last change of shape (progressive training's growth, at
        its last breakpoint, which the next step's shape follows once the budget has spent it), so that the end
        can be held to it: a slowdown that leaves too few steps after a growth must not leave the run worse
        than it was without saying so."""
        last = max(loop.settings.breakpoints, default=None)
        if last is None or self.before_change is not None or not (p_before < last and reached(p, last)):
            return
        result = self.evaluate(state.meter.tokens)
        loop.model.train()
        self.log_eval(state, p, result, before_change=True)

    def log_eval(self, state: LoopState, p: float, result: dict[str, Any], before_change: bool = False
                 ) -> dict[str, Any]:
        """Show and log one evaluation; returns its event fields.  ``before_change``: the evaluation before the
        run's last change of shape, which the final one is held to on the same held-out sample (the final
        result's ``by_stride``, where the stage gives one), with a ``note`` event where it ends above."""
        fields, line = self.fields(result)
        self.display.message(f"eval  step {int(state.meter.steps)}  p={p:.3f}  {line}")
        at = {"step": int(state.meter.steps), "p": p, "tokens": state.meter.tokens, "flops": state.meter.flops,
              "seconds": state.meter.seconds}
        on_sample = None
        if p >= 1.0 and not before_change and self.before_change is not None:
            on_sample = result.get("by_stride", {}).get(self.before_change.get("val_stride"), result["loss"])
        event = {"event": "eval", **at, **fields, "epochs": self.sampler.domain_epochs(),
                 **({"before_change": True} if before_change else {}),
                 **({"before_change_sample_loss": on_sample} if on_sample is not None else {})}
        if self.log is not None:
            self.log.append(event)
        if before_change:
            self.before_change = event
        elif on_sample is not None and on_sample > self.before_change["val_loss"]:
            note = (f"the run ended at held-out loss {on_sample:.4f} on the sample it was measured on before its "
                    f"last change of shape, above the {self.before_change['val_loss']:.4f} it had before its last "
                    "change of shape (a growth): too few steps followed it to recover, as a slowdown leaves them; "
                    "a larger budget gives them more")
            self.notes.append(note)  # the summary says it
            if self.log is not None:
                self.log.append({"event": "note", **at, "note": note})
        return fields

    def log_tasks(self, state: LoopState, p: float) -> float:
        """Score the run's tasks (train.eval_tasks) and log them beside the held-out loss; returns the seconds
        it took, which are evaluation time, not training time."""
        if self.tasks is None:
            return 0.0
        start = time.perf_counter()
        results = self.tasks()
        seconds = time.perf_counter() - start
        if self.log is not None:
            self.log.append({"event": "tasks", "step": int(state.meter.steps), "p": p, "tokens": state.meter.tokens,
                             "flops": state.meter.flops, "seconds": state.meter.seconds, "eval_seconds": seconds,
                             "tasks": results})
        scores = "  ".join(f"{name} {r['centered']:+.3f}" for name, r in results.items())
        self.display.message(f"tasks step {int(state.meter.steps)}  p={p:.3f}  centered: {scores}  ({seconds:.1f}s)")
        return seconds


class Forecast(LoopCallback):
    """The final held-out loss forecast from the curve so far (flopwise/train/forecast.py): fed every step
    logged on schedule, logged each time progress crosses a multiple of ``forecaster.every`` (read from p
    alone, so a resume needs no state), and the reason to stop once it says the target loss is out of reach."""

    def __init__(self, forecaster: LossForecaster, display: ProgressDisplay, log: EventLog | None) -> None:
        self.forecaster, self.display, self.log = forecaster, display, log

    def final_loss(self, tokens: float, p: float) -> float | None:
        """The forecast final loss now, for a listener of the evaluations."""
        forecast = self.forecaster.forecast(tokens, p)
        return forecast.loss if forecast is not None else None

    def on_step(self, loop: Trainer, state: LoopState, record: StepRecord) -> None:
        if record.regular and record.event is not None:  # the same points whether or not the run was interrupted
            self.forecaster.observe(record.event)

    def at_progress(self, loop: Trainer, state: LoopState, p_before: float, p: float) -> str | None:
        every = self.forecaster.every
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
