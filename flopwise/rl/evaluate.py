"""The held-out measure of an RL run: pass@1 and the mean reward on held-out prompts, greedy (temperature 0) and
sampled (``SAMPLES`` completions each at ``rl.temperature``, averaged: pass@1 estimated from several samples,
as Chen et al. 2021 estimate pass@k, with a quarter of one sample's variance; seeded the same at every
evaluation, so two evaluations differ only by the weights).  Prompts of one length are generated together
through one KV cache, up to ``rl.max_response`` tokens, as the rollouts are."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.model.gpt import GPT
from flopwise.rl.objective import Prompt, completion_text
from flopwise.rl.rewards import Rewarder
from flopwise.rl.rollout import sample_prompts

EVAL_SEED = 1234  # the sampled completions' seed: the same draws at every evaluation
SAMPLES = 4  # sampled completions per held-out prompt
ROWS = 64  # prompts generated together at most


class RLEvaluator:
    """Scores a model on ``prompts``: pass@1 (a reward above 0) and mean reward, greedy and sampled, overall and
    per source, and each prompt's greedy reward (for a paired comparison of two models)."""

    def __init__(self, prompts: Sequence[Prompt], sources: list[str], tokenizer: Tokenizer, rewarder: Rewarder,
                 end_ids: frozenset[int], max_tokens: int, temperature: float, device: torch.device) -> None:
        self.prompts, self.sources, self.tokenizer, self.rewarder = list(prompts), sources, tokenizer, rewarder
        self.end_ids, self.max_tokens, self.temperature, self.device = end_ids, max_tokens, temperature, device
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(self.prompts):
            by_length[len(prompt.ids)].append(index)
        self.batches = [indices[i:i + ROWS] for indices in by_length.values() for i in range(0, len(indices), ROWS)]

    def __call__(self, model: GPT) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            greedy = self._rewards(model, 0.0, None)
            generator = torch.Generator(device=self.device).manual_seed(EVAL_SEED)
            draws = [self._rewards(model, self.temperature, generator) for _ in range(SAMPLES)]
            sampled = [sum(rewards) / SAMPLES for rewards in zip(*draws)]
            passed = [sum(r > 0 for r in rewards) / SAMPLES for rewards in zip(*draws)]
        finally:
            model.train(was_training)
        result: dict[str, Any] = {"prompts": len(self.prompts), **_summary(greedy, "greedy"),
                                  "pass_sampled": sum(passed) / len(passed),
                                  "reward_sampled": sum(sampled) / len(sampled), "greedy_rewards": greedy,
                                  "sampled_passes": passed}
        per_source: dict[str, list[float]] = defaultdict(list)
        for prompt, reward in zip(self.prompts, greedy):
            per_source[self.sources[prompt.source]].append(reward)
        result["sources"] = {name: _summary(rewards, "greedy")["pass_greedy"] for name, rewards in per_source.items()}
        return result

    def _rewards(self, model: GPT, temperature: float, generator: torch.Generator | None) -> list[float]:
        rewards = [0.0] * len(self.prompts)
        for indices in self.batches:
            completions = sample_prompts(model, [self.prompts[i].ids for i in indices], self.max_tokens, temperature,
                                         generator, self.end_ids)
            for index, ids in zip(indices, completions):
                prompt = self.prompts[index]
                rewards[index] = self.rewarder(prompt.task, prompt.text,
                                               completion_text(self.tokenizer, ids, self.end_ids))
        return rewards


def _summary(rewards: Sequence[float], kind: str) -> dict[str, float]:
    return {f"pass_{kind}": sum(r > 0 for r in rewards) / len(rewards), f"reward_{kind}": sum(rewards) / len(rewards)}
