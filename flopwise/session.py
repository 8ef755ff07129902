"""A run of any stage, built from its resolved config: the stage's data, the methods, the model and optimizer, the
loop with its callbacks, and the final model.

flopwise/api.py reads top to bottom: resolve (flopwise/resolve.py) -> build (``start_new``, or
flopwise/reopen.py's ``open_for_resume``) -> run -> finish (``Session.run``).  What differs between pretraining,
SFT and DPO is the stage's (flopwise/stages/): its data, objective, evaluation and starting weights; the session
overrides nothing per stage.

The run folder is the whole truth about a run: ``config.toml`` (resolved), ``plan.json``, ``metrics.jsonl``,
``tokenizer.json``, ``checkpoints/`` and ``final/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flopwise.atomic import write_atomic, write_json_atomic
from flopwise.budget import Budget, Meter, check_spendable
from flopwise.config import RunConfig, TrainSection, config_to_toml
from flopwise.data.pipeline import cache_root
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.base import StepShape, World
from flopwise.methods.choose import estimate_for, memory_methods_of
from flopwise.methods.dense import build_model, plain_model
from flopwise.methods.stack import MethodStack, int4_group
from flopwise.model.artifact import folder_bytes
from flopwise.model.chatml import chat_files
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.hf import export_kind, save_hf_folder
from flopwise.optim.build import build_optimizer
from flopwise.resolve import ResolvedRun, resolve
from flopwise.rundir import CONFIG_FILE, METRICS_FILE, PLAN_FILE, read_metrics
from flopwise.runtime import (
    Ranks,
    choose_device,
    device_name,
    full_model_state,
    init_ranks,
    keep_freed_cpu_memory,
    measure_matmul_peak,
    wrap_for_training,
)
from flopwise.scaling.law_file import law_for
from flopwise.stages import stage_class
from flopwise.stages.base import StageContext, StageEvaluation
from flopwise.train.callbacks import AfterEval, Evaluation, Forecast, LoopCallback, Metrics, Progress
from flopwise.train.checkpoint import CheckpointInfo, load_checkpoint, load_method_tensors
from flopwise.train.display import ProgressDisplay
from flopwise.train.forecast import LossForecaster
from flopwise.train.loggers import open_run_logger, require_backends
from flopwise.train.metrics import MetricsLog
from flopwise.train.trainer import DecayEnd, LoopSettings, LoopState, Outcome, Trainer, forecast_points, next_mark
from flopwise.wallclock import WallClock, process_seconds, run_origin


@dataclass
class Summary:
    run_dir: Path
    finished: bool
    meter: Meter
    final_eval: dict[str, Any] | None
    eval_seconds: float
    checkpoint_seconds: float
    last_lr: float
    parameters: dict[str, int]
    stop_reason: str | None = None
    domain_epochs: dict[str, float] | None = None  # times each domain's training tokens were seen
    decay: DecayEnd | None = None  # where a stall cut into the decay, and how it ended
    notes: tuple[str, ...] = ()  # what else the run must tell its user
    export: str | None = None  # how final/ loads in transformers: a stock architecture, or remote code
    wall: WallClock | None = None  # where this process's wall clock went (None on ranks other than the main)


@dataclass(frozen=True)
class Processes:
    """Where this process computes and its place among the processes torchrun started (one, without it)."""

    device: torch.device
    ranks: Ranks

    @classmethod
    def open(cls, train: TrainSection) -> Processes:
        """Join torchrun's process group, if any; under CUDA each process computes on its local device."""
        device = choose_device(train.device)
        ranks = init_ranks(device.type)
        if device.type == "cuda" and ranks.distributed:
            device = torch.device("cuda", ranks.local_rank)
        return cls(device, ranks)

    def world(self, parallel: str) -> World:
        """The processes as the methods' checks see them."""
        return World(self.ranks.world_size, parallel, self.device)


class Session:
    """One run of a resolved config: ``prepare`` reads the stage's data, ``build`` makes the methods, model,
    optimizer and the stage's loop parts, ``run`` trains to the budget and finishes."""

    def __init__(self, resolved: ResolvedRun, run_dir: Path, processes: Processes,
                 display: ProgressDisplay | None = None) -> None:
        self.origin = run_origin()
        self.imports_seconds = process_seconds() - self.origin  # the start-up until this run's session begins
        self.data_seconds = self.build_seconds = 0.0
        self.resolved, self.config, self.run_dir = resolved, resolved.config, run_dir
        self.device, self.ranks = processes.device, processes.ranks
        self.display = (display or ProgressDisplay()) if self.ranks.is_main else ProgressDisplay.quiet()
        self.dtype = torch.bfloat16 if resolved.compute_dtype == "bf16" else torch.float32
        require_backends(self.config.train.log)
        self.resume_step: int | None = None
        if self.device.type == "cpu" and self.config.train.cpu_keep_freed_memory:
            keep_freed_cpu_memory()
        for note in resolved.notes:
            self.display.message(note)
        self.stage = stage_class(resolved.stage)(StageContext(
            self.config, resolved.model, self.device, self.dtype, self.ranks, self.display, resolved.rank_batch,
            resolved.vocab_known, resolved.frozen_embedding))

    @classmethod
    def new(cls, resolved: ResolvedRun, run_dir: Path, processes: Processes,
            display: ProgressDisplay | None = None) -> Session:
        """A new run, prepared and built: its data read, its model initialized (``--init-from``: loaded)."""
        session = cls(resolved, run_dir, processes, display)
        session.prepare()
        session.build(initial_weights=bool(resolved.config.model.init_from))
        return session

    # -- build ------------------------------------------------------------------------------------

    def prepare(self, tokenizer: Tokenizer | None = None, planned: ModelConfig | None = None) -> None:
        """The stage's data, the model shape with its tokenizer, and the per-step costs the budget is counted
        in.  A resumed run passes its saved tokenizer and shape."""
        started = time.perf_counter()
        prepared = self.stage.prepare(tokenizer, planned)
        self.data_seconds += time.perf_counter() - started
        self.tokenizer, self.model_cfg = prepared.tokenizer, prepared.model
        self.tokens_per_step, self.flops_per_step = prepared.tokens_per_step, prepared.flops_per_step
        self.data_record = prepared.record
        self.check_budget_allows_a_step()
        self.display.message(prepared.description)

    def build(self, initial_weights: bool = False) -> None:
        """Methods, model (from the stage's starting weights when asked), its data-parallel wrapper, optimizer,
        and the stage's sampler, objective and evaluation."""
        started = time.perf_counter()
        torch.manual_seed(self.config.train.seed)
        self.methods = MethodStack(self.config.methods, self.config.train.seed)
        self.methods.full = StepShape(self.config.optim.batch_size, self.model_cfg.seq_len, self.model_cfg.n_layers)
        # LoRA wraps the imported weights; SLTrain factorizes fresh ones
        self.model = build_model(self.model_cfg, self.methods.configure,
                                 functools.partial(self.stage.initial_weights, methods=self.methods)
                                 if initial_weights else None)
        self.model.to(self.device)
        train = self.config.train
        self.wrapped = wrap_for_training(self.model, train.parallel, self.ranks, self.device)
        # after FSDP has sharded the model
        self.optimizer = build_optimizer(self.model, self.config.optim, self.device, self.methods.shape_optimizer)
        self.compiled = torch.compile(self.wrapped) if train.compile else self.wrapped
        loop = self.stage.build(self.model, self.methods)
        self.sampler, self.objective, self.evaluation = loop.sampler, loop.objective, loop.evaluation
        self.expected_extra_flops = self.extra_flops_expected(loop.expected_extra_flops)
        with self.ranks.main_first():  # measured once, cached for the other ranks
            self.peak_flops = measure_matmul_peak(self.device, self.dtype, cache_root(self.config.data))
        self.check_budget_is_spendable()
        self.build_seconds += time.perf_counter() - started

    def extra_flops_expected(self, stage_extra: Callable[[], float] | None) -> Callable[[], float] | None:
        """What a step is expected to spend beyond its model's FLOPs: the stage's objective's (RL's rollouts) and
        the methods' (a teacher's forward), which the loop plans the budget's remaining steps with."""
        self.method_extra_flops = self.methods.expected_extra_flops(self.tokens_per_step)
        if not self.method_extra_flops:
            return stage_extra
        return lambda: self.method_extra_flops + (stage_extra() if stage_extra is not None else 0.0)

    def per_step(self) -> dict[str, float]:
        """What one optimizer step spends of each budget limit counted in steps' units."""
        return {"tokens": self.tokens_per_step, "flops": self.flops_per_step, "steps": 1}

    def check_budget_allows_a_step(self) -> None:
        per_step = self.per_step()
        for name, amount in self.config.budget.build().set_limits().items():
            if name in per_step and amount < per_step[name]:
                raise FlopwiseError(f"budget.{name}={amount:.3g} is smaller than one step ({per_step[name]:.3g} "
                                    f"{name}): raise the budget or shrink optim.batch_size, model.seq_len or the model")

    def check_budget_is_spendable(self) -> None:
        """Refuse a budget that even this device's best matmul speed could not spend in a year (as `plan` does)."""
        check_spendable(self.config.budget.build(), self.per_step(), self.peak_flops, device_name(self.device))

    # -- the run folder ---------------------------------------------------------------------------

    def write_run_files(self, auto_plan: dict[str, Any] | None = None) -> None:
        """tokenizer.json, plan.json, then config.toml, each whole: config.toml is what makes a folder a run, so
        an interruption before it leaves no run, and one after it a run that resumes (from step 0).
        ``auto_plan``: what `train --auto` planned, kept in plan.json."""
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "tokenizer.json", self.tokenizer.to_json())
            write_json_atomic(self.run_dir / PLAN_FILE, self.plan(auto_plan))
            write_atomic(self.run_dir / CONFIG_FILE, config_to_toml(self.config))
        self.ranks.barrier()

    def plan(self, auto_plan: dict[str, Any] | None) -> dict[str, Any]:
        """plan.json: the shape, costs, budget, device and processes, the memory plan and the stage's data."""
        return {"model": self.model_cfg.to_dict(), "parameters": count_parameters(self.model_cfg),
                "flops_per_token": flops_per_token(self.model_cfg), "tokens_per_step": self.tokens_per_step,
                "flops_per_step": self.flops_per_step, "method_flops_per_step": self.method_extra_flops,
                "budget": self.config.budget.build().to_dict(),
                "device": device_name(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "matmul_peak_flops": self.peak_flops, "world_size": self.ranks.world_size,
                "parallel": self.config.train.parallel if self.ranks.distributed else None,
                "memory": self.memory_plan(), **self.data_record, "auto_plan": auto_plan,
                "export": export_kind(self.model_cfg).to_dict(), "size": self.resolved.size}

    def memory_plan(self) -> dict[str, Any]:
        """The memory methods and the estimated bytes of a step with them (flopwise/memory/estimate.py)."""
        c = self.config
        methods = memory_methods_of(c.methods.use)
        estimate = estimate_for(self.model_cfg, self.resolved.rank_batch, methods, c.methods, c.optim.name,
                                self.resolved.compute_dtype, grad_accum=c.optim.grad_accum)
        plan = {"methods": methods, "limit": c.memory.limit, "estimate": estimate.to_dict()}
        return plan if self.stage.memory_note is None else {**plan, "note": self.stage.memory_note}

    # -- resume -----------------------------------------------------------------------------------

    def resume_from(self, checkpoint: CheckpointInfo) -> LoopState:
        configured = [group.get("peak_lr") for group in self.optimizer.param_groups]
        state = load_checkpoint(checkpoint, self.model, self.optimizer)
        for group, peak_lr in zip(self.optimizer.param_groups, configured):  # config.toml's rates rule (PBT edits them)
            if peak_lr is not None:
                group["peak_lr"] = peak_lr
        self.sampler.load_state_dict(state["sampler"])
        self.methods.load_checkpoint(state)
        self.methods.load_tensor_state(load_method_tensors(checkpoint))
        if self.ranks.is_main:
            MetricsLog(self.run_dir / METRICS_FILE).truncate_after(checkpoint.step)
        self.resume_step = checkpoint.step
        self.display.message(f"resuming {self.run_dir} from step {checkpoint.step} (saved on "
                             f"{state.get('world_size', 1)} process(es), resumed on {self.ranks.world_size})")
        return LoopState.from_dict(state["loop"])

    def restart(self) -> LoopState:
        """Start a run over from step 0: one interrupted after its folder was created but before its first
        checkpoint.  The model is built as the new run built it, so the curve is the uninterrupted one."""
        self.build(initial_weights=bool(self.config.model.init_from))
        if self.ranks.is_main:
            MetricsLog(self.run_dir / METRICS_FILE).truncate_after(0)
        self.resume_step = 0
        self.display.message(f"{self.run_dir} has no checkpoint yet: starting it again from step 0")
        return LoopState()

    # -- run and finish ---------------------------------------------------------------------------

    def loop_settings(self, stop_after: Budget | None = None) -> LoopSettings:
        """What the training loop needs from the config and the measured per-step costs."""
        c = self.config
        return LoopSettings(
            budget=c.budget.build(), schedule=c.schedule.build(), peak_lr=c.optim.lr, grad_accum=c.optim.grad_accum,
            grad_clip=c.optim.grad_clip, tokens_per_step=self.tokens_per_step, flops_per_step=self.flops_per_step,
            peak_flops=self.peak_flops, eval_every=c.train.eval_every, checkpoint_every=c.train.checkpoint_every,
            keep_checkpoints=c.train.keep_checkpoints, log_every=c.train.log_every, stop_after=stop_after,
            expected_extra_flops=self.expected_extra_flops, **self.progressive_costs())

    def progressive_costs(self) -> dict[str, Any]:
        """The loop's per-step costs where progressive methods change the step's shape as p grows (nothing
        otherwise: every step then costs the run's own shape)."""
        breakpoints = self.methods.shape_breakpoints()
        if not breakpoints:
            return {}
        grad_accum = self.config.optim.grad_accum

        @functools.lru_cache(maxsize=None)
        def shape_costs(shape: StepShape) -> tuple[float, float]:
            tokens = shape.batch_size * grad_accum * self.model_cfg.seq_len  # shorter windows cut the same tokens
            cfg = dataclasses.replace(self.model_cfg, n_layers=shape.n_layers, seq_len=shape.seq_len)
            return tokens, flops_per_token(cfg, shape.block_sparsity) * tokens
        return {"step_costs": lambda p: shape_costs(self.methods.shape_at(p)), "breakpoints": breakpoints}

    def describe(self) -> str:
        """One line on what is about to train: shape, budget, batch, device and processes."""
        cfg, ranks = self.model_cfg, self.ranks
        parallel = f"; {ranks.world_size} processes ({self.config.train.parallel})" if ranks.distributed else ""
        return (f"model: {cfg.d_model}d x {cfg.n_layers} layers, {count_parameters(cfg)['total']:,} parameters; "
                f"budget {self.config.budget.build().describe()}; {self.tokens_per_step:,} tokens/step; device "
                f"{self.device.type} ({str(self.dtype).removeprefix('torch.')}){parallel}")

    def run(self, state: LoopState, stop_after: Budget | None = None, after_eval: AfterEval | None = None) -> Summary:
        """Train from ``state`` until the budget (or ``stop_after``) is spent, then finish: the final evaluation
        and the final model.  ``after_eval``: a listener of each evaluation during the run that may stop it."""
        c = self.config
        settings = self.loop_settings(stop_after)
        self.display.message(self.describe())
        log = (open_run_logger(self.run_dir, c.train.log, c.model_dump(mode="json"), self.resume_step,
                               c.train.wandb_project) if self.ranks.is_main else contextlib.nullcontext())
        with log as event_log:
            evaluation, callbacks = self.callbacks(settings, event_log, after_eval)
            trainer = Trainer(self.compiled, self.optimizer, self.sampler, settings, self.run_dir, self.device,
                              self.dtype, self.methods, self.display, module=self.model, ranks=self.ranks,
                              objective=self.objective, callbacks=callbacks)
            startup, trained_before = process_seconds() - self.origin, state.meter.seconds
            scored = self.score_start(evaluation, state, settings.eval_every)
            with self.display:
                outcome: Outcome = trainer.run(state)
            if outcome.decay is not None and self.ranks.is_main:
                self.record_decay(outcome.decay, outcome.state.meter, event_log)
            during = outcome.eval_seconds
            final_eval, saved = self.finish(trainer, evaluation, outcome) if outcome.finished else (None, 0.0)
            meter = outcome.state.meter
            wall = WallClock(self.imports_seconds, self.data_seconds, self.build_seconds, startup,
                             meter.seconds - trained_before, outcome.eval_seconds + scored,
                             outcome.eval_seconds - during, outcome.checkpoint_seconds, saved,
                             process_seconds() - self.origin)
            if self.ranks.is_main:
                event_log.append({"event": "wall", "step": int(meter.steps), **wall.to_dict()})
        return Summary(self.run_dir, outcome.finished, meter, final_eval, outcome.eval_seconds,
                       outcome.checkpoint_seconds, outcome.last_lr, count_parameters(self.model_cfg),
                       outcome.stop_reason, self.sampler.domain_epochs(), outcome.decay, tuple(evaluation.notes),
                       self.export_note(), wall if self.ranks.is_main else None)

    def export_note(self) -> str:
        """How final/ loads, and, when it was written, its precision and bytes (what a size budget caps)."""
        precision, final = self.config.artifact.precision, self.run_dir / "final"
        note = export_kind(self.model_cfg, precision).describe()
        if not final.is_dir():
            return note
        cap = self.config.budget.size
        within = "" if cap is None else f" (size budget {cap:,.0f})"
        return f"{note}; weights in {precision}, {folder_bytes(final):,} bytes{within}"

    def record_decay(self, decay: DecayEnd, meter: Meter, log: Any) -> None:
        """A decay that a stall cut into is kept where the run is read later: a ``decay`` event in
        metrics.jsonl and plan.json's ``decay`` (the summary says it too)."""
        log.append({"event": "decay", "step": int(meter.steps), "p": meter.progress(self.config.budget.build()),
                    "tokens": meter.tokens, "flops": meter.flops, **decay.to_dict(), "note": decay.describe()})
        plan = json.loads((self.run_dir / PLAN_FILE).read_text())
        write_json_atomic(self.run_dir / PLAN_FILE, {**plan, "decay": decay.to_dict()})

    def callbacks(self, settings: LoopSettings, log: Any, after_eval: AfterEval | None
                  ) -> tuple[Evaluation, list[LoopCallback]]:
        """The stage's evaluation (with its tasks, the listener and the forecast it reads), and every callback in
        the order they act: the display, the metrics log, the evaluation, the forecast."""
        ev: StageEvaluation = self.evaluation
        metrics = self.run_dir / METRICS_FILE
        logged = read_metrics(metrics) if self.resume_step is not None and metrics.is_file() else []
        forecast = self.forecast_callback(log, logged) if ev.forecasts else None
        before_change = next((e for e in logged if e["event"] == "eval" and e.get("before_change")), None)
        evaluation = Evaluation(ev.during, ev.fields, settings.eval_every, self.sampler, self.display, log, ev.tasks,
                                after_eval, forecast.final_loss if forecast is not None else None, before_change)
        return evaluation, [Progress(self.display, settings.budget), *([Metrics(log)] if log is not None else []),
                            evaluation, *([forecast] if forecast is not None else [])]

    def forecast_callback(self, log: Any, logged: list[dict[str, Any]]) -> Forecast | None:
        """The final-loss forecast, fed on resume with the logged steps the checkpoint includes (``logged``: the
        events of metrics.jsonl, truncated to the checkpoint)."""
        t = self.config.train
        if t.forecast_every <= 0:
            return None
        points = forecast_points(logged, t.log_every)
        law = law_for(self.config, device_name(self.device))
        prior = law.prior_for(count_parameters(self.model_cfg)["non_embedding"])
        forecaster = LossForecaster(self.config.schedule.build(), law.kappa, t.forecast_every, t.target_loss, points,
                                    prior)
        return Forecast(forecaster, self.display, log)

    def score_start(self, evaluation: Evaluation, state: LoopState, eval_every: float) -> float:
        """Where the stage asks for it, a new run scores its starting model first (step 0): the baseline of
        what the budget buys.  Returns the seconds it took."""
        if not (self.evaluation.scores_start and self.resume_step is None and state.meter.steps == 0):
            return 0.0
        started = time.perf_counter()
        evaluation.log_eval(state, 0.0, self.evaluation.final())
        state.next_eval = next_mark(0.0, eval_every)  # not again at step 1
        seconds = time.perf_counter() - started
        self.display.message(f"(starting model scored in {seconds:.1f}s)")
        return seconds

    def finish(self, trainer: Trainer, evaluation: Evaluation, outcome: Outcome) -> tuple[dict[str, Any], float]:
        """The final evaluation, the final model, then their log events (after the save: a resume logs them
        once); returns the evaluation and the seconds the save took.  Interrupted here, the trained steps are
        kept: --resume then only evaluates and saves."""
        try:
            start = time.perf_counter()
            self.methods.finish(self.model)  # the final weights (a weight average's) are what is scored and saved
            final_eval = self.evaluation.final()
            saving = time.perf_counter()
            outcome.eval_seconds += saving - start
            self.save_final()
            saved = time.perf_counter() - saving
            evaluation.log_eval(outcome.state, 1.0, final_eval)
            outcome.eval_seconds += evaluation.log_tasks(outcome.state, 1.0)
            return final_eval, saved
        except KeyboardInterrupt:
            if not self.ranks.distributed:  # ranks interrupted at different collectives cannot save together
                trainer.checkpoint(outcome.state)
                self.display.message(f"interrupted after the last step: checkpointed; flopwise {self.command} "
                                     f"--resume {self.run_dir} writes the final model")
            raise

    @property
    def command(self) -> str:
        """The command that resumes this run."""
        return "train" if self.resolved.stage == "pretrain" else self.resolved.stage

    def save_final(self) -> None:
        """``final/``: the model as a Hugging Face folder (loads with AutoModelForCausalLM; with flopwise's
        modeling code for a model that transformers has no architecture for), written atomically.
        Under torchrun the weights are gathered into a plain copy first (a collective: every rank calls this)."""
        state = full_model_state(self.model) if self.ranks.distributed else None  # only rank 0 gets it
        if self.ranks.is_main:
            model = self.model
            if state is not None:
                model = build_model(self.model_cfg, self.methods.configure)
                model.load_state_dict(state, strict=True)
            save_hf_folder(plain_model(model), self.tokenizer, self.run_dir / "final",
                           **chat_files(self.resolved.stage), precision=self.config.artifact.precision,
                           group=int4_group(self.config.methods), cap=self.config.budget.size)
        self.ranks.barrier()


def start_new(config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None, *,
              extendable: bool = False) -> Session:
    """Resolve and build a new run of ``config`` in ``run_dir`` (``rundir.writing`` refuses a folder that holds a run);
    ``extendable``: it will be extended to larger budgets (a pilot)."""
    config.budget.build()  # fail on a missing budget before reading any data
    processes = Processes.open(config.train)
    resolved = resolve(config, processes.world(config.train.parallel), extendable=extendable)
    return Session.new(resolved, run_dir, processes, display)
