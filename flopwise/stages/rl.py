"""The RL stage (``flopwise rl``): GRPO with verifiable rewards from a finished run (usually a fine-tuned one), on
built-in tasks or the user's JSONL tasks, scored by a verifier or the user's reward function
(flopwise/rl/).  Every rollout's generation and scoring FLOPs go on the meter as they are spent, so a FLOP
budget counts the whole cost; the evaluation is pass@1 and mean reward on held-out prompts, the starting model's
first."""

from __future__ import annotations

import dataclasses
from typing import Any

from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.chat import reply_end_ids
from flopwise.posttrain.data import Split
from flopwise.posttrain.sampler import PrepareStats
from flopwise.rl.evaluate import RLEvaluator
from flopwise.rl.objective import PromptSampler, RLObjective, render_prompts
from flopwise.rl.rewards import Rewarder, load_reward_function
from flopwise.rl.rollout import generation_flops
from flopwise.rl.tasks import task_split
from flopwise.stages.base import StageLoop
from flopwise.stages.posttrain import PostTrainStage


def rl_fields(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The eval event of RL: held-out pass@1 and mean reward, greedy and sampled, greedy pass@1 per source."""
    keys = ("pass_greedy", "pass_sampled", "reward_greedy", "reward_sampled", "prompts", "rollout_seconds")
    fields = {key: result[key] for key in keys if key in result}
    fields["pass_by_source"] = result["sources"]
    return fields, (f"pass@1 {result['pass_greedy']:.3f} greedy, {result['pass_sampled']:.3f} sampled  "
                    f"reward {result['reward_greedy']:.3f} / {result['reward_sampled']:.3f}  "
                    f"({result['prompts']} prompts)")


class RLStage(PostTrainStage):
    """GRPO (Shao et al. 2024) on tasks with checkable answers."""

    name = "rl"
    kind = "tasks"
    # optim.batch_size counts prompts here: 8 prompts x rl.group 8 completions = 64 rows per step
    defaults = {"optim.batch_size": 8, "optim.lr": 3e-4, "optim.muon_lr": 1.5e-3}
    memory_note = "the estimate leaves out the rollouts' KV caches, and the reference model kept for rl.kl_beta > 0"

    @classmethod
    def check(cls, config: RunConfig, world: World | None, new: bool) -> None:
        super().check(config, world, new)
        rl, size = config.rl, world.size if world is not None else 1
        if config.optim.grad_accum != 1:
            raise FlopwiseError(f"optim.grad_accum={config.optim.grad_accum}: rl takes optim.batch_size prompts per "
                                "step in one batch; set optim.grad_accum=1 and raise optim.batch_size instead")
        if world is not None and world.parallel == "fsdp":
            raise FlopwiseError("rl samples its rollouts with the whole model on each process: run it under "
                                "torchrun with --parallel ddp (the default), not fsdp")
        if size > 1 and rl.allocation == "refill":
            raise FlopwiseError("rl.allocation=refill replaces prompts one process at a time: under torchrun set "
                                "rl.allocation=uniform")
        if size > 1 and rl.updates > 1:
            raise FlopwiseError(f"rl.updates={rl.updates} keeps each process's rollouts for reuse, which one "
                                "checkpoint cannot hold: under torchrun set rl.updates=1")
        if rl.reward:
            load_reward_function(rl.reward)  # a missing module or function is refused before anything is read

    def split_records(self, config: RunConfig, seq_len: int) -> Split:
        """The tasks (files, or the built-in ones), rendered as prompts; those whose prompt leaves no room for
        ``rl.max_response`` tokens in the context are dropped, and counted."""
        train, heldout, sources = task_split(config.posttrain, config.train.seed)
        rl = config.rl
        (kept, dropped), (held, held_dropped) = (
            render_prompts(self.tokenizer, part, sources, seq_len, rl.max_response) for part in (train, heldout))
        for part, prompts in (("training", kept), ("held-out", held)):
            if not prompts:
                raise FlopwiseError(f"no {part} task's prompt leaves room for rl.max_response={rl.max_response} "
                                    f"tokens within model.seq_len={seq_len}: lower rl.max_response, or give "
                                    "shorter prompts")
        return Split(kept, held, sources, PrepareStats(len(kept), 0, dropped), PrepareStats(len(held), 0, held_dropped))

    def describe_split(self, seq_len: int) -> str:
        split, rl = self.split, self.context.config.rl
        dropped = split.train_stats.dropped + split.heldout_stats.dropped
        return (f"data: {len(split.train):,} training and {len(split.heldout):,} held-out tasks from "
                f"{len(split.sources)} source(s); {dropped} left out (no room for rl.max_response={rl.max_response} "
                f"tokens after the prompt in the {seq_len}-token window)")

    def width(self) -> int:
        """The one width of every training row: the longest training prompt and a whole response."""
        return max(len(prompt.ids) for prompt in self.split.train) + self.context.config.rl.max_response - 1

    def step_costs(self, model: ModelConfig, rows: int) -> tuple[int, float]:
        """The update's tokens and FLOPs over ``rows`` prompts' groups at the one width (the rollouts' FLOPs are
        metered as they are spent)."""
        width = self.width()
        tokens = rows * self.context.config.rl.group * width
        return tokens, flops_per_token(dataclasses.replace(model, seq_len=width)) * tokens

    def build(self, model: GPT, methods: MethodStack) -> StageLoop:
        ctx, c = self.context, self.context.config
        self.setup_methods(methods, model.config.seq_len)
        rewarder = Rewarder(load_reward_function(c.rl.reward), c.rl.reward) if c.rl.reward else Rewarder()
        end_ids = reply_end_ids(self.tokenizer)
        reference = self.start.model.to(ctx.device).eval() if c.rl.kl_beta > 0 else None
        self.start = None  # the reference, where kept, is its own copy
        sampler = PromptSampler(self.split.train, c.optim.batch_size, c.train.seed, ctx.ranks.rank,
                                ctx.ranks.world_size)
        objective = RLObjective(model, self.tokenizer, sampler, rewarder, end_ids, c.rl, self.width(), ctx.device,
                                ctx.dtype, reference, ctx.ranks)
        evaluator = RLEvaluator(self.split.heldout, self.split.sources, self.tokenizer, rewarder, end_ids,
                                c.rl.max_response, c.rl.temperature, ctx.device)

        def scored(model: GPT) -> dict[str, Any]:
            return {**evaluator(model), "rollout_seconds": sampler.rollout_seconds}

        first_guess = self.rollout_flops_at_the_cap(model.config)

        def expected_rollout_flops() -> float:
            """The rollouts' mean FLOPs per step so far (at the cap before any)."""
            return sampler.mean_rollout_flops() or first_guess

        return StageLoop(sampler, objective, self.evaluation(scored, model, rl_fields),
                         expected_extra_flops=expected_rollout_flops)

    def rollout_flops_at_the_cap(self, model: ModelConfig) -> float:
        """The rollouts' FLOPs of a step whose completions all run to ``rl.max_response``, with their scoring
        forwards: the prediction of a step's cost before one has run."""
        c = self.context.config
        prompt = round(sum(len(p.ids) for p in self.split.train) / len(self.split.train))
        scorings = (c.rl.updates > 1) + (c.rl.kl_beta > 0)
        width = self.width()
        scoring = flops_per_token(dataclasses.replace(model, seq_len=width)) / 3 * width * c.rl.group * scorings
        return c.optim.batch_size * (generation_flops(model, prompt, c.rl.group, c.rl.max_response) + scoring)
