"""Post-training stages (``flopwise sft``, ``flopwise dpo``): a finished run or a Hugging Face model, given the chat
tokens, trained on conversations (assistant-token cross-entropy) or on preference pairs (DPO against the frozen
starting model), and evaluated on held-out records: the assistant-token loss per source, or the preference
accuracy and reward margin.  The starting model is scored once before the first step, so the summary says
what the budget bought over it (flopwise/posttrain/ holds the data, objectives and evaluators)."""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar

from flopwise.config import RunConfig
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.base import RunResources, World
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.data import Split, dpo_split, sft_split
from flopwise.posttrain.heldout import AssistantEvaluator
from flopwise.posttrain.objective import SFTObjective
from flopwise.posttrain.preference import DPOObjective, PairSampler, PreferenceEvaluator, dpo_flops_per_step
from flopwise.posttrain.sampler import ConversationSampler
from flopwise.posttrain.start import Start, load_start, start_shape
from flopwise.rl.tasks import builtin_sft_data
from flopwise.stages.base import Prepared, Shape, Stage, StageEvaluation, StageLoop
from flopwise.train.callbacks import EvalFields


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


class PostTrainStage(Stage):
    """What SFT and DPO share: the starting model (``model.init_from``), its chat tokens, a held-out split of
    the stage's records, and an evaluation of all held-out records each time (they are few)."""

    kind: ClassVar[str]  # what the records are, for the user

    @classmethod
    def check(cls, config: RunConfig, world: World | None, new: bool) -> None:
        if not config.model.init_from:
            raise FlopwiseError(f"{cls.name} needs a starting model: --init-from RUN (a finished run folder) or "
                                "a Hugging Face folder")
        if config.train.eval_tasks:
            raise FlopwiseError("train.eval_tasks score pretraining runs: score a post-trained run afterwards with "
                                "flopwise eval RUN --tasks ...")

    @classmethod
    def shape(cls, config: RunConfig) -> Shape:
        return Shape(start_shape(config.model.init_from, config.model.seq_len))

    def prepare(self, tokenizer: Tokenizer | None, planned: ModelConfig | None) -> Prepared:
        """The starting model with the chat tokens, the rendered split, and the per-step costs.  A resumed run
        passes its saved tokenizer and shape, which must still be what the starting model gives."""
        c, started = self.context.config, time.perf_counter()
        self.start: Start | None = load_start(c.model.init_from, c.model.seq_len, self.context.frozen_embedding)
        model = self.start.model.config
        if tokenizer is not None and (tokenizer.to_json() != self.start.tokenizer.to_json() or planned != model):
            raise FlopwiseError(f"--init-from '{c.model.init_from}' no longer gives the model this run started "
                                f"from (its tokenizer or shape changed): resume needs the same starting model")
        self.tokenizer = self.start.tokenizer
        self.split: Split = self.split_records(c, model.seq_len)
        rows = c.optim.batch_size * c.optim.grad_accum  # conversations, or pairs, per step (all ranks)
        tokens, flops = self.step_costs(model, rows)
        line = self.describe_split(model.seq_len) + f" ({time.perf_counter() - started:.1f}s)"
        record = {"posttrain": {"start": c.model.init_from, **self.split.to_dict()}}
        return Prepared(self.tokenizer, model, tokens, flops, line, record)

    def initial_weights(self, model: GPT, methods: MethodStack) -> None:
        """The starting model's weights (grown for the chat tokens)."""
        model.load_state_dict(self.start.model.state_dict(), strict=True)
        self.context.display.message(f"starting from {self.context.config.model.init_from}"
                                     + (" (embedding grown for the chat tokens)" if self.start.grown else ""))

    def split_records(self, config: RunConfig, seq_len: int) -> Split:
        raise NotImplementedError

    def step_costs(self, model: ModelConfig, rows: int) -> tuple[int, float]:
        """(tokens, FLOPs) of one optimizer step over ``rows`` records."""
        raise NotImplementedError

    def describe_split(self, seq_len: int) -> str:
        """One line for the run's start: what the records are and what the window did to them."""
        return self.split.describe(self.kind, seq_len)

    def setup_methods(self, methods: MethodStack, seq_len: int) -> None:
        """The methods' setup: post-training's stages take only methods that do not read the corpus."""
        ctx = self.context
        methods.setup(RunResources(None, [], seq_len, self.tokenizer.to_json(), ctx.model.vocab_size, ctx.device,
                                   ctx.dtype, ctx.ranks, ctx.display.message))

    @staticmethod
    def evaluation(evaluator: Callable[[GPT], dict[str, Any]], model: GPT, fields: EvalFields) -> StageEvaluation:
        """All the held-out records each time, during the run and at its end (they are few: the same figure as the
        final one), with the starting model scored first; no loss forecast (its law describes pretraining)."""
        return StageEvaluation(during=lambda tokens: evaluator(model), final=lambda: evaluator(model), fields=fields,
                               scores_start=True, forecasts=False)


class SFTStage(PostTrainStage):
    """Supervised fine-tuning on conversations: the loss on the assistant's tokens only."""

    name = "sft"
    kind = "conversations"
    # post-training moves a trained model by small steps over a small dataset, so its learning rates are far
    # below pretraining's (1e-2 and 0.05).  Measured on the built-in data (bench/RESULTS.md#post-training): after a
    # 2-minute SFT (about 7 epochs) the held-out loss was 6.30 at pretraining's rates, 5.55 at 3e-3, 4.44 at 1e-3,
    # 4.30 at 3e-4 and 4.58 at 1e-4 (base: 5.24).
    defaults = {"optim.lr": 3e-4, "optim.muon_lr": 1.5e-3}

    def split_records(self, config: RunConfig, seq_len: int) -> Split:
        return sft_split(config.posttrain, self.tokenizer, seq_len, config.train.seed, builtin_sft_data)

    def step_costs(self, model: ModelConfig, rows: int) -> tuple[int, float]:
        tokens = rows * model.seq_len
        return tokens, flops_per_token(model) * tokens

    def build(self, model: GPT, methods: MethodStack) -> StageLoop:
        ctx, c, seq_len = self.context, self.context.config, model.config.seq_len
        self.setup_methods(methods, seq_len)
        pad, batch = self.tokenizer.eos_id, c.optim.batch_size  # padding is masked out of every loss
        sampler = ConversationSampler(self.split.train, seq_len, batch, c.train.seed, c.posttrain.pack, pad,
                                      ctx.ranks.rank, ctx.ranks.world_size)
        evaluator = AssistantEvaluator(self.split.heldout, self.split.sources, batch, ctx.device, ctx.dtype, pad)
        self.start = None  # its weights are the model's now
        return StageLoop(sampler, SFTObjective(sampler, ctx.ranks, methods),
                         self.evaluation(evaluator, model, sft_fields))


class DPOStage(PostTrainStage):
    """Direct preference optimization (Rafailov et al. 2023) against the frozen starting model, whose forward
    passes the budget counts."""

    name = "dpo"
    kind = "preference pairs"
    # DPO's held-out loss rose at pretraining's rates, and its preference accuracy gained more at 1e-3 than at
    # 3e-4 (bench/RESULTS.md#post-training)
    defaults = {"optim.lr": 1e-3, "optim.muon_lr": 5e-3}
    memory_note = "the estimate leaves out the frozen reference model DPO keeps beside the policy"

    def split_records(self, config: RunConfig, seq_len: int) -> Split:
        return dpo_split(config.posttrain, self.tokenizer, seq_len, config.train.seed)

    def step_costs(self, model: ModelConfig, rows: int) -> tuple[int, float]:
        return 2 * rows * model.seq_len, dpo_flops_per_step(model, rows, model.seq_len)

    def build(self, model: GPT, methods: MethodStack) -> StageLoop:
        ctx, c, seq_len = self.context, self.context.config, model.config.seq_len
        self.setup_methods(methods, seq_len)
        pad, batch = self.tokenizer.eos_id, c.optim.batch_size
        reference = self.start.model.to(ctx.device)
        sampler = PairSampler(self.split.train, seq_len, batch, c.train.seed, pad, ctx.ranks.rank,
                              ctx.ranks.world_size)
        evaluator = PreferenceEvaluator(self.split.heldout, reference, c.posttrain.beta, batch, ctx.device,
                                        ctx.dtype, pad)
        return StageLoop(sampler, DPOObjective(sampler, reference, c.posttrain.beta),
                         self.evaluation(evaluator, model, dpo_fields))
