"""A run from start to finish: folder, data, model and optimizer, the loop, the final model.

The run folder is the whole truth about a run: ``config.toml`` (resolved), ``plan.json``,
``metrics.jsonl``, ``tokenizer.json``, ``checkpoints/`` and ``final/``.  Resuming reads it
back; extending a finished run to a larger budget restarts from its pinned checkpoint, the
last one before the learning rate began to decay.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from flopwise.budget import Budget, Meter
from flopwise.config import RunConfig, config_to_toml, load_config
from flopwise.data.pipeline import PreparedData, cache_root, prepare_data
from flopwise.data.sampler import PackedSampler
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import Evaluator
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.train.checkpoint import (CheckpointInfo, list_checkpoints, load_checkpoint, require_checkpoint,
                                       write_json_atomic)
from flopwise.train.device import (choose_device, choose_dtype, device_name, keep_freed_cpu_memory,
                                   measure_matmul_peak)
from flopwise.train.display import ProgressDisplay
from flopwise.train.metrics import MetricsLog
from flopwise.train.trainer import LoopSettings, LoopState, Outcome, Trainer, next_mark

CONFIG_FILE = "config.toml"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def load_run_config(run_dir: Path) -> RunConfig:
    if not is_run_dir(run_dir):
        raise FlopwiseError(f"'{run_dir}' is not a flopwise run folder (no {CONFIG_FILE}): "
                            "give the --out folder of an earlier `flopwise train`")
    return load_config(run_dir / CONFIG_FILE)


def build_optimizer(model: GPT, config: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on the matrices of linear layers only (not on
    embeddings or norm gains), as in GPT-2/LLaMA practice."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda" or None)


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


class Session:
    """Sets up a run (new, resumed or extended), runs it and writes the final model."""

    def __init__(self, config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.display = display or ProgressDisplay()
        self.device = choose_device(config.train.device)
        self.dtype = choose_dtype(config.train.precision, self.device)
        if self.device.type == "cpu" and config.train.cpu_keep_freed_memory:
            keep_freed_cpu_memory()

    @classmethod
    def new(cls, config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None) -> Session:
        if is_run_dir(run_dir):
            raise FlopwiseError(f"'{run_dir}' already holds a run: resume it with --resume {run_dir}, "
                                "or choose another --out")
        config.budget.build()  # fail on a missing budget before reading any data
        return cls(config, run_dir, display)

    def prepare(self, tokenizer: Tokenizer | None = None) -> None:
        """Data, model config and the per-step costs the budget is counted in."""
        started = time.perf_counter()
        self.data: PreparedData = prepare_data(self.config.data, self.config.train.seed, tokenizer)
        self.model_cfg: ModelConfig = self.config.model.build(self.data.tokenizer.vocab_size)
        o = self.config.optim
        self.tokens_per_step = o.batch_size * o.grad_accum * self.model_cfg.seq_len
        self.flops_per_step = flops_per_token(self.model_cfg) * self.tokens_per_step
        self.check_budget_allows_a_step()
        cached = "cached" if self.data.corpus.cache_hit else "tokenized"
        meta = self.data.corpus.meta
        self.display.message(f"data: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} held-out tokens "
                             f"({cached}, {time.perf_counter() - started:.1f}s), vocab {self.data.tokenizer.vocab_size}"
                             + (f", {self.data.stats.replaced_bytes} undecodable bytes replaced"
                                if self.data.stats.replaced_bytes else ""))

    def check_budget_allows_a_step(self) -> None:
        per_step = {"tokens": self.tokens_per_step, "flops": self.flops_per_step, "steps": 1}
        for name, amount in self.config.budget.build().set_limits().items():
            if name in per_step and amount < per_step[name]:
                raise FlopwiseError(f"budget.{name}={amount:.3g} is smaller than one step ({per_step[name]:.3g} "
                                    f"{name}): raise the budget or shrink optim.batch_size, model.seq_len or the model")

    def build(self) -> None:
        torch.manual_seed(self.config.train.seed)
        self.model = GPT(self.model_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, self.config, self.device)
        self.compiled = torch.compile(self.model) if self.config.train.compile else self.model
        corpus = self.data.corpus
        o = self.config.optim
        self.sampler = PackedSampler(corpus.train_tokens, self.model_cfg.seq_len, o.batch_size,
                                     seed=self.config.train.seed)
        self.evaluator = Evaluator(corpus, self.data.tokenizer.token_bytes(), self.model_cfg.seq_len,
                                   o.batch_size, self.device, self.dtype)
        self.peak_flops = measure_matmul_peak(self.device, self.dtype, cache_root(self.config.data))

    def write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data.tokenizer.save(self.run_dir / "tokenizer.json")
        (self.run_dir / CONFIG_FILE).write_text(config_to_toml(self.config))
        budget = self.config.budget.build()
        plan = {"model": self.model_cfg.to_dict(), "parameters": count_parameters(self.model_cfg),
                "flops_per_token": flops_per_token(self.model_cfg), "tokens_per_step": self.tokens_per_step,
                "flops_per_step": self.flops_per_step, "budget": budget.to_dict(),
                "device": device_name(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "matmul_peak_flops": self.peak_flops, "corpus": self.data.corpus.meta,
                "read": vars(self.data.stats)}
        write_json_atomic(self.run_dir / "plan.json", plan)

    def resume_from(self, checkpoint: CheckpointInfo) -> LoopState:
        state = load_checkpoint(checkpoint, self.model, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        MetricsLog(self.run_dir / "metrics.jsonl").truncate_after(checkpoint.step)
        self.display.message(f"resuming {self.run_dir} from step {checkpoint.step}")
        return LoopState.from_dict(state["loop"])

    def loop_settings(self, stop_after: Budget | None = None) -> LoopSettings:
        """What the training loop needs from the config and the measured per-step costs."""
        c = self.config
        return LoopSettings(
            budget=c.budget.build(), schedule=c.schedule.build(), peak_lr=c.optim.lr, grad_accum=c.optim.grad_accum,
            grad_clip=c.optim.grad_clip, tokens_per_step=self.tokens_per_step, flops_per_step=self.flops_per_step,
            peak_flops=self.peak_flops, eval_every=c.train.eval_every, checkpoint_every=c.train.checkpoint_every,
            keep_checkpoints=c.train.keep_checkpoints, log_every=c.train.log_every, stop_after=stop_after)

    def run(self, state: LoopState, stop_after: Budget | None = None) -> Summary:
        c = self.config
        settings = self.loop_settings(stop_after)
        trainer = Trainer(self.compiled, self.optimizer, self.sampler, settings, self.run_dir, self.device, self.dtype,
                          lambda: self.evaluator(self.model, c.train.eval_tokens), self.display)
        with self.display:
            outcome: Outcome = trainer.run(state)
        final_eval = None
        if outcome.finished:
            start = time.perf_counter()
            final_eval = self.evaluator(self.model, c.train.eval_tokens * 4)
            outcome.eval_seconds += time.perf_counter() - start
            trainer.log_eval(outcome.state, 1.0, final_eval)
            self.save_final()
        return Summary(self.run_dir, outcome.finished, outcome.state.meter, final_eval, outcome.eval_seconds,
                       outcome.checkpoint_seconds, outcome.last_lr, count_parameters(self.model_cfg))

    def save_final(self) -> None:
        """``final/``: weights (safetensors), model config and tokenizer, written atomically."""
        final, tmp = self.run_dir / "final", self.run_dir / ".final.tmp"
        tmp.mkdir(exist_ok=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(self.model_cfg.to_dict(), indent=1))
        self.data.tokenizer.save(tmp / "tokenizer.json")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


def start_new(config: RunConfig, run_dir: Path, display: ProgressDisplay | None = None) -> Session:
    session = Session.new(config, run_dir, display)
    session.prepare()
    session.build()
    return session


def open_for_resume(run_dir: Path, budget: Budget | None,
                    display: ProgressDisplay | None = None) -> tuple[Session, LoopState]:
    """Reopen a run: continue an interrupted one, or extend a finished one to a larger budget."""
    config = load_run_config(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    finished = (run_dir / "final").is_dir()
    if finished and budget is None:
        raise FlopwiseError(f"run '{run_dir}' already spent its budget: to train longer, pass a larger "
                            f"--budget with --resume {run_dir}")
    checkpoint = require_checkpoint(run_dir, checkpoints)
    old_budget = config.budget.build()
    if budget is not None:
        checkpoint = _extension_point(run_dir, config, checkpoints, budget)
    session = Session(config, run_dir, display)
    session.prepare(Tokenizer.load(run_dir / "tokenizer.json"))
    session.build()
    state = session.resume_from(checkpoint)
    if budget is not None:
        _rescale_progress(state, old_budget, budget, config)
        (run_dir / CONFIG_FILE).write_text(config_to_toml(config))
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    return session, state


def _rescale_progress(state: LoopState, old: Budget, new: Budget, config: RunConfig) -> None:
    """Express the loop's progress marks in the new budget's terms."""
    p_new = state.meter.progress(new)
    state.p_lr *= p_new / state.meter.progress(old)
    state.next_eval = next_mark(p_new, config.train.eval_every)
    state.next_checkpoint = next_mark(p_new, config.train.checkpoint_every)


def _extension_point(run_dir: Path, config: RunConfig, checkpoints: list[CheckpointInfo],
                     budget: Budget) -> CheckpointInfo:
    """The pinned checkpoint, with the config's budget replaced and its warmup rescaled so that
    the steps already taken keep the learning rates they had."""
    pinned = [info for info in checkpoints if info.pinned]
    if not pinned:
        raise FlopwiseError(f"run '{run_dir}' has no checkpoint from before its decay phase, so it cannot be "
                            "extended: start a new run with the larger budget")
    checkpoint = pinned[-1]
    meter = Meter.from_dict(checkpoint.state["loop"]["meter"])
    old_p, new_p = meter.progress(config.budget.build()), meter.progress(budget)
    schedule = config.schedule.build()
    if new_p >= schedule.decay_start:
        raise FlopwiseError(f"--budget {budget.describe()} is not larger than what run '{run_dir}' had spent "
                            "before its decay: give a larger budget")
    config.schedule.warmup = schedule.warmup * new_p / old_p
    for name, value in budget.to_dict().items():
        setattr(config.budget, name, value)
    return checkpoint
