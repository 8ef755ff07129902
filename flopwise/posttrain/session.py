"""A post-training run (``flopwise sft``, ``flopwise dpo``): the pretraining session with the corpus replaced.

The same folder, budget meter, schedule, checkpoints, methods and resume as ``flopwise train``; what changes is
what a step trains on and for (``Objective``: conversations and assistant-token cross-entropy, or preference
pairs and DPO against the frozen starting model) and what evaluation measures (the held-out assistant-token
loss per source, or the held-out preference accuracy and reward margin).  The starting model is evaluated
once before the first step, so the summary says what the budget bought over it.
"""

from __future__ import annotations

import time
from typing import Any

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.base import Method, RunResources
from flopwise.methods.choose import resolve_memory_methods
from flopwise.methods.registry import BY_NAME
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.data import Split, dpo_split, sft_split
from flopwise.posttrain.heldout import AssistantEvaluator
from flopwise.posttrain.objective import SFTObjective
from flopwise.posttrain.preference import DPOObjective, PairSampler, PreferenceEvaluator, dpo_flops_per_step
from flopwise.posttrain.sampler import ConversationSampler
from flopwise.posttrain.start import Start, load_start
from flopwise.runtime import per_rank_batch
from flopwise.session import Session
from flopwise.train.forecast import LossForecaster
from flopwise.train.trainer import LoopState, Trainer, next_mark

# Config values a stage starts from where the user set none: post-training moves a trained model by small steps
# over a small dataset, so its learning rates are far below pretraining's (1e-2 and 0.05).  Measured on the
# built-in data (bench/RESULTS.md#post-training): after a 2-minute SFT (about 7 epochs) the held-out loss was
# 6.30 at pretraining's rates, 5.55 at 3e-3, 4.44 at 1e-3, 4.30 at 3e-4 and 4.58 at 1e-4 (base: 5.24); DPO's
# held-out loss rose at pretraining's rates, and its preference accuracy gained more at 1e-3 than at 3e-4.
STAGE_DEFAULTS: dict[str, dict[str, float]] = {"sft": {"optim.lr": 3e-4, "optim.muon_lr": 1.5e-3},
                                               "dpo": {"optim.lr": 1e-3, "optim.muon_lr": 5e-3}}
# a method acting through these hooks shapes pretraining's windows or loss, which post-training replaces
DATA_HOOKS = ("setup", "sampler_options", "attach", "next_batch", "loss", "step_shape")


def check_posttrain_methods(names: list[str], stage: str) -> None:
    """Refuse, in one line, a method that works on the pretraining corpus, its loss or its schedule of shapes
    (mixtures, curricula, reweighting, SALT, z-loss, progressive training); those acting on the model and optimizer (LoRA, LISA, GaLore, 8-bit states,
    checkpointing, bf16 weights, QAT) apply unchanged."""
    for name in names:
        method = BY_NAME[name]
        if any(getattr(method, hook) is not getattr(Method, hook) for hook in DATA_HOOKS):
            raise FlopwiseError(f"methods.use '{name}' acts on the pretraining data or loss, which {stage} "
                                "replaces: drop it (LoRA, LISA, GaLore, 8bit, checkpointing, bf16_weights and qat "
                                "apply to post-training)")


def sft_fields(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The eval event of SFT: the held-out assistant-token loss, per source under ``domains``."""
    fields = {"val_loss": result["loss"], "heldout_tokens": result["tokens"],
              "domains": {name: source["loss"] for name, source in result["sources"].items()}}
    return fields, f"assistant loss {result['loss']:.4f} on {result['tokens']:,} held-out tokens"


def dpo_fields(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The eval event of DPO: its held-out loss, and the preference accuracies and margin."""
    fields = {"val_loss": result["loss"], "reward_accuracy": result["reward_accuracy"],
              "reward_margin": result["reward_margin"], "preference_accuracy": result["preference_accuracy"],
              "pairs": result["pairs"]}
    return fields, (f"dpo loss {result['loss']:.4f}  preference accuracy {result['preference_accuracy']:.3f}  "
                    f"reward accuracy {result['reward_accuracy']:.3f}  margin {result['reward_margin']:+.3f}  "
                    f"({result['pairs']} pairs)")


class PostTrainSession(Session):
    """SFT or DPO from ``model.init_from`` (a finished run, or a Hugging Face model) under the run's budget."""

    adds_progressive = False  # progressive training shapes pretraining's steps
    def prepare(self, tokenizer: Tokenizer | None = None, model_cfg: ModelConfig | None = None) -> None:
        """The starting model with the chat tokens, the rendered data split, and the per-step costs.  A resumed
        run passes its saved tokenizer and shape, which must still be what the starting model gives."""
        started = time.perf_counter()
        c = self.config
        if not c.model.init_from:
            raise FlopwiseError(f"{self.stage} needs a starting model: --init-from RUN (a finished run folder) or "
                                "a Hugging Face folder")
        if c.train.eval_tasks:
            raise FlopwiseError("train.eval_tasks score pretraining runs: score a post-trained run afterwards with "
                                "flopwise eval RUN --tasks ...")
        check_posttrain_methods(c.methods.use, self.stage)
        lora = "lora" in c.methods.use
        self.start: Start | None = load_start(c.model.init_from, c.model.seq_len,
                                              "LoRA freezes it" if lora else None)
        self.tokenizer = self.start.tokenizer
        self.model_cfg = self.start.model.config
        if tokenizer is not None and (tokenizer.to_json() != self.tokenizer.to_json() or model_cfg != self.model_cfg):
            raise FlopwiseError(f"--init-from '{c.model.init_from}' no longer gives the model this run started "
                                f"from (its tokenizer or shape changed): resume needs the same starting model")
        o = c.optim
        self.rank_batch = per_rank_batch(o.batch_size, self.ranks)
        self.config, note = resolve_memory_methods(c, self.model_cfg, self.rank_batch, self.compute_dtype)
        if note:
            self.display.message(note)
        check_posttrain_methods(self.config.methods.use, self.stage)  # a memory method chosen for --memory
        self.tasks = []
        seq_len = self.model_cfg.seq_len
        split = sft_split if self.stage == "sft" else dpo_split
        self.split: Split = split(self.config.posttrain, self.tokenizer, seq_len, self.config.train.seed)
        rows = o.batch_size * o.grad_accum  # conversations, or pairs, per step (all ranks)
        if self.stage == "sft":
            self.tokens_per_step = rows * seq_len
            self.flops_per_step = flops_per_token(self.model_cfg) * self.tokens_per_step
        else:
            self.tokens_per_step = 2 * rows * seq_len
            self.flops_per_step = dpo_flops_per_step(self.model_cfg, rows, seq_len)
        self.check_budget_allows_a_step()
        self.eval_fields = sft_fields if self.stage == "sft" else dpo_fields
        kind = "conversations" if self.stage == "sft" else "preference pairs"
        self.display.message(self.split.describe(kind, seq_len) + f" ({time.perf_counter() - started:.1f}s)")

    @property
    def stage(self) -> str:
        return self.config.posttrain.stage

    def load_initial_weights(self, model: GPT) -> None:
        """The starting model's weights (grown for the chat tokens)."""
        model.load_state_dict(self.start.model.state_dict(), strict=True)
        self.display.message(f"starting from {self.config.model.init_from}"
                             + (" (embedding grown for the chat tokens)" if self.start.grown else ""))

    def build_data(self) -> None:
        """The sampler, the objective and the held-out evaluator; DPO's reference is the starting model."""
        c, ranks, seq_len = self.config, self.ranks, self.model_cfg.seq_len
        self.methods.setup(RunResources(None, [], seq_len, self.device, self.dtype, ranks, self.display.message,
                                        self._teacher_loader()))
        pad = self.tokenizer.eos_id  # padding is masked out of every loss
        batch = c.optim.batch_size
        if self.stage == "sft":
            self.sampler = ConversationSampler(self.split.train, seq_len, batch, c.train.seed, c.posttrain.pack, pad,
                                               ranks.rank, ranks.world_size)
            self.objective = SFTObjective(self.sampler, ranks)
            self.evaluator = AssistantEvaluator(self.split.heldout, self.split.sources, batch, self.device,
                                                self.dtype, pad)
            self.start = None  # its weights are the model's now; DPO keeps them as the reference
        else:
            reference = self.start.model.to(self.device)
            self.sampler = PairSampler(self.split.train, seq_len, batch, c.train.seed, pad, ranks.rank,
                                       ranks.world_size)
            self.objective = DPOObjective(self.sampler, reference, c.posttrain.beta)
            self.evaluator = PreferenceEvaluator(self.split.heldout, reference, c.posttrain.beta, batch, self.device,
                                                 self.dtype, pad)

    def data_record(self) -> dict[str, Any]:
        return {"posttrain": {"start": self.config.model.init_from, **self.split.to_dict()}}

    def before_training(self, trainer: Trainer, state: LoopState) -> None:
        """A new run scores its starting model first (step 0), the baseline of what the budget buys."""
        if self.resume_step is None and state.meter.steps == 0:
            started = time.perf_counter()
            trainer.log_eval(state, 0.0, self.final_evaluation())
            state.next_eval = next_mark(0.0, self.config.train.eval_every)  # not again at step 1
            self.display.message(f"(starting model scored in {time.perf_counter() - started:.1f}s)")

    def evaluate_during_run(self) -> dict[str, Any]:
        """The held-out records, all of them each time (they are few): the same figure as the final one."""
        return self.evaluator(self.model)

    final_evaluation = evaluate_during_run

    def forecaster(self) -> LossForecaster | None:
        """None: the loss forecast's law describes pretraining."""
        return None

    def memory_plan(self) -> dict[str, Any]:
        plan = super().memory_plan()
        if self.stage == "dpo":
            plan["note"] = "the estimate leaves out the frozen reference model DPO keeps beside the policy"
        return plan


def describe_start_and_end(start: dict[str, Any], end: dict[str, Any]) -> str:
    """One line comparing the starting model's eval event (step 0) with the final one, on the same records."""
    if "preference_accuracy" not in end:
        return (f"held-out assistant-token loss: {start['val_loss']:.4f} (start) -> {end['val_loss']:.4f} "
                f"({end['heldout_tokens']:,} tokens)")
    return (f"held-out preference accuracy: {start['preference_accuracy']:.3f} (start) -> "
            f"{end['preference_accuracy']:.3f}; reward accuracy {end['reward_accuracy']:.3f}, margin "
            f"{end['reward_margin']:+.3f} ({end['pairs']} pairs)")
