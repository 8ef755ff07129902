"""A run from start to finish: folder, data, model and optimizer, the loop, the final model.

The run folder is the whole truth about a run: ``config.toml`` (resolved), ``plan.json``,
``metrics.jsonl``, ``tokenizer.json``, ``checkpoints/`` and ``final/``.  Resuming reads it
back; extending a finished run to a larger budget restarts from its pinned checkpoint, the
last one before the learning rate began to decay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flopwise.atomic import write_atomic, write_json_atomic
from flopwise.budget import Budget, Meter
from flopwise.config import RunConfig, config_to_toml, load_run_config
from flopwise.data.pipeline import PreparedData, cache_root, prepare_data
from flopwise.data.sampler import PackedSampler
from flopwise.data.sources import uses_builtin_corpus
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import FINAL_EVAL_SCALE, Evaluator
from flopwise.evaluate.tasks.builtin import HeldoutText
from flopwise.evaluate.tasks.engine import evaluate_tasks
from flopwise.evaluate.tasks.resolve import check_run_tasks, resolve_tasks
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.methods.base import RunResources, StepShape, World
from flopwise.methods.choose import estimate_for, memory_methods_of, resolve_memory_methods
from flopwise.methods.dense import build_model, plain_model
from flopwise.methods.progressive import PROGRESSIVE, resolve_progressive_methods
from flopwise.methods.salt import Teacher
from flopwise.methods.stack import MethodStack, check_methods
from flopwise.model.chatml import chat_files
from flopwise.model.config import NAMED_SIZES, ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config, resolve_hf_source, save_hf_folder
from flopwise.optim.build import build_optimizer
from flopwise.rundir import CONFIG_FILE, METRICS_FILE, PLAN_FILE, is_run_dir, planned_model_config, read_metrics
from flopwise.runtime import (
    choose_device,
    choose_dtype,
    device_name,
    full_model_state,
    init_ranks,
    keep_freed_cpu_memory,
    measure_matmul_peak,
    per_rank_batch,
    wrap_for_training,
)
from flopwise.scaling.law_file import law_for
from flopwise.train.checkpoint import CheckpointInfo, list_checkpoints, load_checkpoint, newest_intact
from flopwise.train.display import ProgressDisplay
from flopwise.train.forecast import LossForecaster
from flopwise.train.loggers import open_run_logger, require_backends
from flopwise.train.metrics import MetricsLog
from flopwise.train.trainer import (
    LoopSettings,
    LoopState,
    Objective,
    Outcome,
    Trainer,
    forecast_points,
    heldout_fields,
    next_mark,
)

MAX_RUN_SECONDS = 365 * 86400  # a budget that cannot be spent within a year at the device's peak is a mistake

# Model fields that an --init-from model's config.json decides.
_IMPORTED_SHAPE = {"size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "qk_norm", "tie_embeddings",
                   "rope_theta"}


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


class Session:
    """Sets up a run (new, resumed or extended), runs it and writes the final model.  Post-training
    (flopwise/posttrain/session.py) overrides the data, the objective and the evaluation."""

    objective: Objective | None = None  # the loop's default: the methods on the sampler's windows
    after_eval: Callable[[int, float, dict[str, Any]], str | None] | None = None  # see Trainer
    eval_fields = staticmethod(heldout_fields)
    adds_progressive = True  # a new run adds the default recipe's progressive methods (methods.progressive)

    def __init__(self, config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        require_backends(config.train.log)
        self.device = choose_device(config.train.device)
        self.ranks = init_ranks(self.device.type)
        if self.device.type == "cuda" and self.ranks.distributed:
            self.device = torch.device("cuda", self.ranks.local_rank)
        self.display = (display or ProgressDisplay()) if self.ranks.is_main else ProgressDisplay.quiet()
        self.dtype = choose_dtype(config.train.precision, self.device)
        self.compute_dtype = "bf16" if self.dtype == torch.bfloat16 else "fp32"  # the memory estimator's name for it
        self.init_folder: Path | None = None
        self.resume_step: int | None = None
        self.auto_plan: dict[str, Any] | None = None  # what `train --auto` planned, kept in plan.json
        check_methods(config, self.world)  # before any data is read
        check_run_tasks(config, self.ranks.distributed)
        if self.device.type == "cpu" and config.train.cpu_keep_freed_memory:
            keep_freed_cpu_memory()

    @classmethod
    def new(cls, config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None) -> Session:
        """A session for a new run in ``run_dir`` (refused where a run already is)."""
        if is_run_dir(run_dir):
            raise FlopwiseError(f"'{run_dir}' already holds a run: resume it with --resume {run_dir}, "
                                "or choose another --out")
        config.budget.build()  # fail on a missing budget before reading any data
        if config.model.init_from:
            clash = sorted(config.model.model_fields_set & _IMPORTED_SHAPE)
            if clash:
                raise FlopwiseError(f"model.{clash[0]} cannot be set with --init-from: the shape comes from the "
                                    "imported model's config.json (only model.seq_len can be chosen)")
            if "tokenizer" in config.data.model_fields_set:
                raise FlopwiseError("data.tokenizer cannot be set with --init-from: the imported model's own "
                                    "tokenizer is used as is")
        session = cls(config, run_dir, display)
        if session.adds_progressive:
            session.config, note = resolve_progressive_methods(session.config, session.world)
            if note:
                session.display.message(note)
        return session

    def prepare(self, tokenizer: Tokenizer | None = None, model_cfg: ModelConfig | None = None) -> None:
        """Data, model config and the per-step costs the budget is counted in.  A resumed run passes
        its saved tokenizer and shape; an imported model brings its own."""
        started = time.perf_counter()
        m = self.config.model
        if model_cfg is None and m.init_from:
            self.init_folder = resolve_hf_source(m.init_from)
            tokenizer = tokenizer or Tokenizer.load(self.init_folder)
            self.config = self.config.replace(**{"data.tokenizer": str(self.init_folder)})  # in config.toml
            seq_len = m.seq_len or NAMED_SIZES[m.size]["seq_len"]
            model_cfg = model_config_from_hf(read_hf_config(self.init_folder), self.init_folder, seq_len)
        with self.ranks.main_first():  # rank 0 tokenizes into the cache; the other ranks then read it
            self.data: PreparedData = prepare_data(self.config.data, self.config.train.seed, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.model_cfg: ModelConfig = model_cfg or m.build(self.data.tokenizer.vocab_size)
        if self.data.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise FlopwiseError(f"the tokenizer has {self.data.tokenizer.vocab_size} tokens but the model's "
                                f"vocab_size is {self.model_cfg.vocab_size}: use the model's own tokenizer")
        o = self.config.optim
        self.rank_batch = per_rank_batch(o.batch_size, self.ranks)
        # a resumed run has its methods already: then this only checks that they fit
        self.config, note = resolve_memory_methods(self.config, self.model_cfg, self.rank_batch, self.compute_dtype)
        if note:
            self.display.message(note)
        check_methods(self.config, self.world)
        t = self.config.train
        self.tasks = resolve_tasks(t.eval_tasks, self.heldout_text, t.seed, t.task_examples, "train.eval_tasks")
        self.tokens_per_step = o.batch_size * o.grad_accum * self.model_cfg.seq_len  # the whole job's
        self.flops_per_step = flops_per_token(self.model_cfg) * self.tokens_per_step
        self.check_budget_allows_a_step()
        cached = "cached" if self.data.corpus.cache_hit else "tokenized"
        meta = self.data.corpus.meta
        self.display.message(f"data: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} held-out tokens "
                             f"({cached}, {time.perf_counter() - started:.1f}s), vocab {self.data.tokenizer.vocab_size}"
                             + self.data.stats.describe() + self.data.hygiene.describe())

    def heldout_text(self) -> HeldoutText:
        """The held-out documents as text, for the built-in tasks."""
        return HeldoutText.from_corpus(self.data.corpus, self.data.tokenizer,
                                       uses_builtin_corpus(self.config.data.sources))

    @property
    def world(self) -> World:
        """The processes this run trains on, for the methods' checks."""
        return World(self.ranks.world_size, self.config.train.parallel, self.device)

    def per_step(self) -> dict[str, float]:
        """What one optimizer step spends of each budget limit counted in steps' units."""
        return {"tokens": self.tokens_per_step, "flops": self.flops_per_step, "steps": 1}

    def check_budget_allows_a_step(self) -> None:
        per_step = self.per_step()
        for name, amount in self.config.budget.build().set_limits().items():
            if name in per_step and amount < per_step[name]:
                raise FlopwiseError(f"budget.{name}={amount:.3g} is smaller than one step ({per_step[name]:.3g} "
                                    f"{name}): raise the budget or shrink optim.batch_size, model.seq_len or the model")

    def build(self, initial_weights: bool = False) -> None:
        """Methods, model (from --init-from weights when asked), its data-parallel wrapper, optimizer, data."""
        torch.manual_seed(self.config.train.seed)
        self.methods = MethodStack(self.config)
        self.methods.full = StepShape(self.config.optim.batch_size, self.model_cfg.seq_len, self.model_cfg.n_layers)
        # LoRA wraps the imported weights; SLTrain factorizes fresh ones
        self.model = build_model(self.model_cfg, self.methods.configure,
                                 self.load_initial_weights if initial_weights else None)
        self.model.to(self.device)
        train = self.config.train
        self.wrapped = wrap_for_training(self.model, train.parallel, self.ranks, self.device)
        # after FSDP has sharded the model
        self.optimizer = build_optimizer(self.model, self.config.optim, self.device, self.methods.shape_optimizer)
        self.compiled = torch.compile(self.wrapped) if train.compile else self.wrapped
        self.build_data()
        with self.ranks.main_first():  # measured once, cached for the other ranks
            self.peak_flops = measure_matmul_peak(self.device, self.dtype, cache_root(self.config.data))
        self.check_budget_is_spendable()

    def build_data(self) -> None:
        """The methods' setup, the sampler they shape, the held-out evaluator and the task scorer."""
        self.methods.setup(RunResources(self.data, self.config.data.sources, self.model_cfg.seq_len, self.device,
                                        self.dtype, self.ranks, self.display.message, self._teacher_loader()))
        corpus, options = self.data.corpus, self.methods.sampler_options()
        self.sampler = PackedSampler(corpus.train_tokens, self.model_cfg.seq_len, self.rank_batch,
                                     seed=self.config.train.seed, rank=self.ranks.rank,
                                     world_size=self.ranks.world_size, domain_ranges=corpus.train_domain_ranges(),
                                     weights=options.weights, domain_names=corpus.domains,
                                     difficulty=options.difficulty, pacing=options.pacing)
        self.methods.attach(self.sampler)
        self.evaluator = Evaluator(corpus, self.data.tokenizer.token_bytes(), self.model_cfg.seq_len,
                                   self.config.optim.batch_size, self.device, self.dtype)
        self.task_model = TaskModel(self.model, self.data.tokenizer, self.device, self.dtype,
                                    self.config.optim.batch_size)

    def check_budget_is_spendable(self) -> None:
        """Refuse a budget that even this device's best matmul speed could not spend within MAX_RUN_SECONDS
        (``--budget 1e30flops`` on a small model), which would otherwise train at a vanishing learning rate
        with an ETA of ages.  A seconds limit bounds the run by itself."""
        budget = self.config.budget.build()
        limits = budget.set_limits()
        steps = [limits[name] / amount for name, amount in self.per_step().items() if name in limits]
        if "seconds" in limits or not steps:
            return
        fastest = min(steps) * self.flops_per_step / self.peak_flops
        if fastest > MAX_RUN_SECONDS:
            raise FlopwiseError(f"the budget {budget.describe()} would take at least {fastest / 86400 / 365:.3g} years "
                                f"on {device_name(self.device)} ({self.peak_flops:.3g} FLOP/s at best): give a smaller "
                                "budget, or add a time limit to it (--budget <yours>,24h ends at whichever is "
                                "reached first)")

    def _teacher_loader(self) -> Callable[[str], Teacher]:
        """Loads each teacher source once, with this run's tokenizer and window length (SALT's teacher
        may also be the curriculum's scorer)."""
        loaded: dict[str, Teacher] = {}

        def load(source: str) -> Teacher:
            if source not in loaded:
                loaded[source] = Teacher.load(source, self.data.tokenizer.vocab_size, self.device,
                                              self.data.tokenizer.to_json(), seq_len=self.model_cfg.seq_len)
            return loaded[source]
        return load

    def write_run_files(self) -> None:
        if self.ranks.is_main:
            self._write_run_files()
        self.ranks.barrier()

    def _write_run_files(self) -> None:
        """tokenizer.json, plan.json, then config.toml, each whole: config.toml is what makes a folder a run, so
        an interruption before it leaves no run, and one after it a run that resumes (from step 0)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "tokenizer.json", self.tokenizer.to_json())
        budget = self.config.budget.build()
        plan = {"model": self.model_cfg.to_dict(), "parameters": count_parameters(self.model_cfg),
                "flops_per_token": flops_per_token(self.model_cfg), "tokens_per_step": self.tokens_per_step,
                "flops_per_step": self.flops_per_step, "budget": budget.to_dict(),
                "device": device_name(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "matmul_peak_flops": self.peak_flops, "world_size": self.ranks.world_size,
                "parallel": self.config.train.parallel if self.ranks.distributed else None,
                "memory": self.memory_plan(), **self.data_record(), "auto_plan": self.auto_plan}
        write_json_atomic(self.run_dir / PLAN_FILE, plan)
        write_atomic(self.run_dir / CONFIG_FILE, config_to_toml(self.config))

    def data_record(self) -> dict[str, Any]:
        """What plan.json keeps of the data: the corpus, what reading it found, the mixture."""
        return {"corpus": self.data.corpus.meta, "read": vars(self.data.stats), "data": self.data.summary()}

    def memory_plan(self) -> dict[str, Any]:
        """The memory methods and the estimated bytes of a step with them (flopwise/memory/estimate.py)."""
        c = self.config
        methods = memory_methods_of(c)
        estimate = estimate_for(self.model_cfg, self.rank_batch, methods, c.methods, c.optim.name, self.compute_dtype,
                                grad_accum=c.optim.grad_accum)
        return {"methods": methods, "limit": c.memory.limit, "estimate": estimate.to_dict()}

    def resume_from(self, checkpoint: CheckpointInfo) -> LoopState:
        configured = [group.get("peak_lr") for group in self.optimizer.param_groups]
        state = load_checkpoint(checkpoint, self.model, self.optimizer)
        for group, peak_lr in zip(self.optimizer.param_groups, configured):  # config.toml's rates rule (PBT edits them)
            if peak_lr is not None:
                group["peak_lr"] = peak_lr
        self.sampler.load_state_dict(state["sampler"])
        self.methods.load_state_dict(_methods_state(state))
        if self.ranks.is_main:
            MetricsLog(self.run_dir / METRICS_FILE).truncate_after(checkpoint.step)
        self.resume_step = checkpoint.step
        self.display.message(f"resuming {self.run_dir} from step {checkpoint.step} (saved on "
                             f"{state.get('world_size', 1)} process(es), resumed on {self.ranks.world_size})")
        return LoopState.from_dict(state["loop"])

    def restart(self) -> LoopState:
        """Start a run over from step 0: one interrupted after its folder was created but before its first
        checkpoint.  The model is built as the new run built it, so the curve is the uninterrupted one."""
        if self.config.model.init_from:
            self.init_folder = resolve_hf_source(self.config.model.init_from)
        self.build(initial_weights=self.init_folder is not None)
        if self.ranks.is_main:
            MetricsLog(self.run_dir / METRICS_FILE).truncate_after(0)
        self.resume_step = 0
        self.display.message(f"{self.run_dir} has no checkpoint yet: starting it again from step 0")
        return LoopState()

    def loop_settings(self, stop_after: Budget | None = None) -> LoopSettings:
        """What the training loop needs from the config and the measured per-step costs."""
        c = self.config
        return LoopSettings(
            budget=c.budget.build(), schedule=c.schedule.build(), peak_lr=c.optim.lr, grad_accum=c.optim.grad_accum,
            grad_clip=c.optim.grad_clip, tokens_per_step=self.tokens_per_step, flops_per_step=self.flops_per_step,
            peak_flops=self.peak_flops, eval_every=c.train.eval_every, checkpoint_every=c.train.checkpoint_every,
            keep_checkpoints=c.train.keep_checkpoints, log_every=c.train.log_every, stop_after=stop_after,
            **self.progressive_costs())

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
            return tokens, flops_per_token(cfg) * tokens
        return {"step_costs": lambda p: shape_costs(self.methods.shape_at(p)), "breakpoints": breakpoints}

    def describe(self) -> str:
        """One line on what is about to train: shape, budget, batch, device and processes."""
        cfg, ranks = self.model_cfg, self.ranks
        parallel = f"; {ranks.world_size} processes ({self.config.train.parallel})" if ranks.distributed else ""
        return (f"model: {cfg.d_model}d x {cfg.n_layers} layers, {count_parameters(cfg)['total']:,} parameters; "
                f"budget {self.config.budget.build().describe()}; {self.tokens_per_step:,} tokens/step; device "
                f"{self.device.type} ({str(self.dtype).removeprefix('torch.')}){parallel}")

    def run(self, state: LoopState, stop_after: Budget | None = None) -> Summary:
        c = self.config
        settings = self.loop_settings(stop_after)
        self.display.message(self.describe())
        log = (open_run_logger(self.run_dir, c.train.log, c.model_dump(mode="json"), self.resume_step,
                               c.train.wandb_project) if self.ranks.is_main else contextlib.nullcontext())
        with log as event_log:
            trainer = Trainer(self.compiled, self.optimizer, self.sampler, settings, self.run_dir, self.device,
                              self.dtype, self.evaluate_during_run, self.display,
                              event_log, methods=self.methods, module=self.model, ranks=self.ranks,
                              forecaster=self.forecaster(), evaluate_tasks=self.evaluate_tasks(),
                              objective=self.objective, eval_fields=self.eval_fields, after_eval=self.after_eval)
            self.before_training(trainer, state)
            with self.display:
                outcome: Outcome = trainer.run(state)
            final_eval = None
            if outcome.finished:
                try:
                    start = time.perf_counter()
                    final_eval = self.final_evaluation()
                    outcome.eval_seconds += time.perf_counter() - start
                    self.save_final()
                    trainer.log_eval(outcome.state, 1.0, final_eval)  # after the save: a resume logs it once
                    outcome.eval_seconds += trainer.log_tasks(outcome.state, 1.0)
                except KeyboardInterrupt:  # keep the trained steps: --resume then only evaluates and saves
                    if not self.ranks.distributed:  # ranks interrupted at different collectives cannot save together
                        trainer.checkpoint(outcome.state)
                        self.display.message(f"interrupted after the last step: checkpointed; flopwise train "
                                             f"--resume {self.run_dir} writes the final model")
                    raise
        return Summary(self.run_dir, outcome.finished, outcome.state.meter, final_eval, outcome.eval_seconds,
                       outcome.checkpoint_seconds, outcome.last_lr, count_parameters(self.model_cfg),
                       outcome.stop_reason, self.sampler.domain_epochs())

    def before_training(self, trainer: Trainer, state: LoopState) -> None:
        """What happens once the loop is set up, before its first step (nothing, for pretraining)."""

    def final_evaluation(self) -> dict[str, Any]:
        """The held-out loss on FINAL_EVAL_SCALE times the tokens each evaluation during the run reads."""
        return self.evaluator(self.model, self.config.train.eval_tokens * FINAL_EVAL_SCALE)

    def evaluate_during_run(self) -> dict[str, Any]:
        """Every FINAL_EVAL_SCALE-th window of the final evaluation's, so the logged curve estimates the
        quantity that the final evaluation measures more precisely."""
        return self.evaluator(self.model, self.config.train.eval_tokens * FINAL_EVAL_SCALE, stride=FINAL_EVAL_SCALE)

    def evaluate_tasks(self) -> Callable[[], dict[str, Any]] | None:
        """The run's tasks scored on the model being trained (train.eval_tasks), by the main process only: the
        others go on to their next step and wait for it there."""
        if not self.tasks or not self.ranks.is_main:
            return None
        seed = self.config.train.seed
        return lambda: evaluate_tasks(self.tasks, self.task_model, seed)

    def forecaster(self) -> LossForecaster | None:
        """The final-loss forecast, fed on resume with the logged steps the checkpoint includes."""
        t = self.config.train
        if t.forecast_every <= 0:
            return None
        metrics = self.run_dir / METRICS_FILE
        events = read_metrics(metrics) if metrics.is_file() else []
        points = forecast_points(events, t.log_every)
        law = law_for(self.config, device_name(self.device))
        prior = law.prior_for(count_parameters(self.model_cfg)["non_embedding"])
        return LossForecaster(self.config.schedule.build(), law.kappa, t.forecast_every,
                              t.target_loss, points, prior)

    def save_final(self) -> None:
        """``final/``: the model as a Hugging Face folder (loads with AutoModelForCausalLM; for models that
        transformers has no architecture for, weights and tokenizer only), written atomically.
        Under torchrun the weights are gathered into a plain copy first (a collective: every rank calls this)."""
        state = full_model_state(self.model) if self.ranks.distributed else None  # only rank 0 gets it
        if self.ranks.is_main:
            model = self.model
            if state is not None:
                model = build_model(self.model_cfg, self.methods.configure)
                model.load_state_dict(state, strict=True)
            save_hf_folder(plain_model(model), self.tokenizer, self.run_dir / "final",
                           weights_only=not self.model_cfg.llama_style,
                           **chat_files(self.config.posttrain.stage))
        self.ranks.barrier()

    def load_initial_weights(self, model: GPT) -> None:
        """Start from the --init-from model's weights (a new run; a resumed one loads its checkpoint)."""
        load_weights_into(model, self.init_folder)
        self.display.message(f"initialized from {self.init_folder}")


def _methods_state(state: dict[str, Any]) -> dict[str, Any]:
    """The methods' part of a checkpoint; one written before the method protocol kept the online
    mixture's state as ``objective.mixture``."""
    if "methods" in state:
        return state["methods"]
    legacy = state.get("objective", {})
    return {"online_mixture": legacy["mixture"]} if "mixture" in legacy else {}


def start_new(config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None,
              session_class: type[Session] = Session) -> Session:
    session = session_class.new(config, run_dir, display)
    session.prepare()
    session.build(initial_weights=bool(config.model.init_from))
    return session


def open_for_resume(run_dir: Path, budget: Budget | None, display: ProgressDisplay | None = None,
                    session_class: type[Session] = Session) -> tuple[Session, LoopState]:
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
    session = session_class(config, run_dir, display)
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
    progressive = [name for name in config.methods.use if name in PROGRESSIVE]
    if progressive:
        raise FlopwiseError(f"run '{run_dir}' trained with {', '.join(progressive)}, whose schedules follow the share "
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
