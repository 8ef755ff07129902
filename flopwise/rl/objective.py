"""GRPO as the training loop's ``Objective``: each step samples ``rl.group`` completions of each of its prompts with
the policy as it is, scores them, and trains on them with advantages relative to each prompt's group.

The prompts' order is a seeded permutation per epoch (``EpochOrder``); each rank rolls out its contiguous share of
the global batch.  A group's sampling is seeded by the run's seed, the batch and the prompt's place in the global
batch, never by the rank, so a run under torchrun samples what one process samples.  Every row of a batch is the
prompt and one completion, padded to one width (the longest prompt plus ``rl.max_response``), so the update's
FLOPs are the same every step; the rollouts' FLOPs, which depend on how long the completions ran, are added to
the meter as they are spent (``take_extra_flops``), with the policy's scoring for ``rl.updates`` > 1 and the
reference's for ``rl.kl_beta`` > 0.

``rl.allocation = "refill"`` spends rollouts where they teach: a prompt whose group got the same reward for every
completion has zero advantages (no gradient), so it is replaced by the next prompt, up to ``rl.refill_rounds``
times; what is still uninformative after that trains as drawn.  (DAPO's dynamic sampling, Yu et al. 2025, which
over-samples and filters such groups.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from flopwise.config import RLSection
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.flops import forward_flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.losses import token_log_probs
from flopwise.posttrain.sampler import EpochOrder, check_share
from flopwise.posttrain.template import render
from flopwise.rl.grpo import group_advantages, grpo_loss
from flopwise.rl.rewards import Rewarder
from flopwise.rl.rollout import Group, generation_flops, sample_group
from flopwise.rl.tasks import Task
from flopwise.runtime import Ranks, autocast


@dataclass(frozen=True)
class Prompt:
    """A task rendered for the model: the chat template's ids with the generation prompt, and the text of its last
    user message (what a reward function is given as the prompt)."""

    task: Task
    ids: list[int]
    text: str
    source: int


def render_prompts(tokenizer: Tokenizer, tasks: Sequence[Task], sources: list[str], context: int,
                   max_response: int) -> tuple[list[Prompt], int]:
    """The tasks whose prompt leaves room for ``max_response`` tokens in the context, rendered; and how many did
    not."""
    kept: list[Prompt] = []
    for task in tasks:
        ids = render(tokenizer, task.messages, add_generation_prompt=True)[0]
        if len(ids) + max_response <= context:
            kept.append(Prompt(task, ids, task.messages[-1].content, sources.index(task.source)))
    return kept, len(tasks) - len(kept)


class RLBatch(NamedTuple):
    inputs: torch.Tensor  # [R, W] int64: prompt and completion, then padding
    targets: torch.Tensor  # [R, W] int64: the inputs shifted by one
    mask: torch.Tensor  # [R, W] bool: targets[r, t] is a completion token (its end token included)
    advantages: torch.Tensor  # [R] float32
    old_logp: torch.Tensor | None  # [R, W] the sampling policy's log-probabilities (rl.updates > 1), else None
    ref_logp: torch.Tensor | None  # [R, W] the reference's (rl.kl_beta > 0), else None


class PromptSampler:
    """The order of prompts and what resume needs: the order's position, the batches made, the mean rollout FLOPs
    of a step so far (the loop's prediction of a step's cost reads it) and, with ``rl.updates`` > 1, the batch
    still to be reused."""

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        check_share(batch_size, rank, world_size, "prompts")
        self.prompts = list(prompts)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.order = EpochOrder(len(self.prompts), seed)
        self.progress = 0.0  # set by the Trainer each step; the order does not pace by it
        self.batches = 0
        self.rollout_flops = 0.0  # all ranks, all batches so far
        self.rollout_seconds = 0.0  # spent sampling and scoring them, this rank
        self.pending: dict[str, Any] | None = None  # a batch to train on again, with its uses left

    def domain_epochs(self) -> dict[str, float]:
        return {"prompts": self.order.epochs}

    def take(self, count: int) -> list[int]:
        """The next ``count`` prompts of the global order."""
        return [self.order.take() for _ in range(count)]

    def seed_of(self, slot: int, round_: int) -> int:
        """The sampling seed of the group at global ``slot`` of this batch, in refill ``round_``."""
        return int(np.random.SeedSequence([self.seed, self.batches, round_, slot]).generate_state(1)[0])

    def mean_rollout_flops(self) -> float:
        return self.rollout_flops / self.batches if self.batches else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "prompts": len(self.prompts), "batches": self.batches,
                "rollout_flops": self.rollout_flops, "rollout_seconds": self.rollout_seconds, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["prompts"]) != len(self.prompts):
            raise FlopwiseError(f"the checkpoint's prompt order covers {state['prompts']} prompts but this run has "
                                f"{len(self.prompts)}: resume with the same tasks and model.seq_len")
        self.order.load_state_dict(state)
        self.batches, self.rollout_flops = int(state["batches"]), float(state["rollout_flops"])
        self.rollout_seconds = float(state["rollout_seconds"])
        self.pending = state["pending"]


class RLObjective:
    """Rollouts with ``policy`` (the plain model, whose weights the step trains), rewards, and the GRPO loss."""

    def __init__(self, policy: GPT, tokenizer: Tokenizer, sampler: PromptSampler, rewarder: Rewarder,
                 end_ids: frozenset[int], settings: RLSection, width: int, device: torch.device, dtype: torch.dtype,
                 reference: GPT | None = None, ranks: Ranks = Ranks()) -> None:
        self.policy, self.tokenizer, self.sampler, self.rewarder = policy, tokenizer, sampler, rewarder
        self.end_ids, self.pad_id = end_ids, tokenizer.eos_id  # padding is masked out of the loss
        self.settings, self.width = settings, width
        self.device, self.dtype, self.reference, self.ranks = device, dtype, reference, ranks
        self._flops = 0.0

    # -- the loop's Objective ------------------------------------------------------------------------------

    def next_batch(self) -> RLBatch:
        """The batch of this step: the pending one again (``rl.updates`` > 1), or fresh rollouts."""
        s = self.sampler
        if s.pending is not None:
            batch = _batch_from_state(s.pending["batch"])
            s.pending["uses_left"] -= 1
            if s.pending["uses_left"] == 0:
                s.pending = None
            return batch
        started = time.perf_counter()
        groups, rewards, flops = self._rollouts()
        batch, scoring = self._batch(groups, rewards)
        spent = self.ranks.sum([flops + scoring])[0]
        s.batches += 1
        s.rollout_flops += spent
        self._flops += spent
        if self.settings.updates > 1:
            s.pending = {"batch": _batch_state(batch), "uses_left": self.settings.updates - 1}
        s.rollout_seconds += time.perf_counter() - started
        return batch

    def loss(self, model: torch.nn.Module, batch: RLBatch, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, dtype):
            logits = model(batch.inputs.to(device))[0]
        logp = token_log_probs(logits, batch.targets.to(device))
        mask = batch.mask.to(device)
        old = batch.old_logp.to(device) if batch.old_logp is not None else logp.detach()
        ref = batch.ref_logp.to(device) if batch.ref_logp is not None else None
        tokens = self.ranks.sum([float(mask.sum())])[0] / self.ranks.world_size
        loss, _ = grpo_loss(logp, old, batch.advantages.to(device), mask, max(tokens, 1.0), self.settings.clip,
                            ref, self.settings.kl_beta)
        return loss, loss.detach()

    def take_extra_flops(self) -> float:
        """The FLOPs of this step's rollouts and scoring forwards (all ranks), once."""
        flops, self._flops = self._flops, 0.0
        return flops

    # -- rollouts --------------------------------------------------------------------------------------------

    def _rollouts(self) -> tuple[list[Group], list[list[float]], float]:
        """This rank's groups of the global batch, their rewards, and the generation FLOPs (this rank's)."""
        s, rl = self.sampler, self.settings
        share = s.batch_size // s.world_size
        mine = range(s.rank * share, (s.rank + 1) * share)
        chosen = s.take(s.batch_size)
        groups: dict[int, tuple[Group, list[float]]] = {}
        flops = 0.0
        self.policy.eval()
        try:
            with autocast(self.device, self.dtype):
                for slot in mine:
                    groups[slot], spent = self._group(chosen[slot], slot, 0)
                    flops += spent
                for round_ in range(1, (rl.refill_rounds if rl.allocation == "refill" else 0) + 1):
                    flat = [slot for slot in mine if _uninformative(groups[slot][1])]
                    if not flat:
                        break
                    for slot, index in zip(flat, s.take(len(flat))):
                        candidate, spent = self._group(index, slot, round_)
                        flops += spent
                        if not _uninformative(candidate[1]):
                            groups[slot] = candidate
        finally:
            self.policy.train()
        ordered = [groups[slot] for slot in mine]
        return [g for g, _ in ordered], [r for _, r in ordered], flops

    def _group(self, index: int, slot: int, round_: int) -> tuple[tuple[Group, list[float]], float]:
        rl, prompt = self.settings, self.sampler.prompts[index]
        generator = torch.Generator(device=self.device).manual_seed(self.sampler.seed_of(slot, round_))
        group = sample_group(self.policy, prompt.ids, rl.group, rl.max_response, rl.temperature, None, generator,
                             self.end_ids)
        rewards = [self.rewarder(prompt.task, prompt.text, completion_text(self.tokenizer, ids, self.end_ids))
                   for ids in group.completions]
        flops = generation_flops(self.policy.config, len(prompt.ids), rl.group, group.decode_steps)
        return (group, rewards), flops

    def _batch(self, groups: list[Group], rewards: list[list[float]]) -> tuple[RLBatch, float]:
        """Rows of prompt + completion at the run's one width, the advantages, and the log-probabilities the loss
        compares against (with the FLOPs of those forwards)."""
        rl = self.settings
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), rl.scale).flatten()
        rows = [(g.prompt, completion) for g in groups for completion in g.completions]
        inputs = np.full((len(rows), self.width), self.pad_id, dtype=np.int64)
        targets = np.full_like(inputs, self.pad_id)
        mask = np.zeros(inputs.shape, dtype=bool)
        for r, (prompt, completion) in enumerate(rows):
            ids = prompt + completion
            inputs[r, :len(ids) - 1] = ids[:-1]
            targets[r, :len(ids) - 1] = ids[1:]
            mask[r, len(prompt) - 1:len(ids) - 1] = True
        batch = RLBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask), advantages,
                        None, None)
        forward = forward_flops_per_token(self.policy.config) * inputs.size  # one scoring forward of the rows
        scoring = 0.0
        if rl.updates > 1:
            batch = batch._replace(old_logp=self._log_probs(self.policy, batch))
            scoring += forward
        if self.reference is not None:
            batch = batch._replace(ref_logp=self._log_probs(self.reference, batch))
            scoring += forward
        return batch, scoring

    @torch.no_grad()
    def _log_probs(self, model: GPT, batch: RLBatch) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            logits = model(batch.inputs.to(self.device))[0]
        return token_log_probs(logits, batch.targets.to(self.device)).cpu()


def completion_text(tokenizer: Tokenizer, ids: Sequence[int], end_ids: frozenset[int]) -> str:
    """A completion's text as it is scored: without the end token that closed it."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in end_ids else ids)


def _uninformative(rewards: Sequence[float]) -> bool:
    """One reward for every completion of the group: its advantages are all zero."""
    return max(rewards) == min(rewards)


def _batch_state(batch: RLBatch) -> dict[str, Any]:
    """The batch as JSON-safe lists (a checkpoint's state is JSON: nothing is unpickled)."""
    return {name: None if value is None else value.tolist() for name, value in batch._asdict().items()}


def _batch_from_state(state: dict[str, Any]) -> RLBatch:
    kinds = {"inputs": torch.int64, "targets": torch.int64, "mask": torch.bool, "advantages": torch.float32,
             "old_logp": torch.float32, "ref_logp": torch.float32}
    return RLBatch(**{name: None if state[name] is None else torch.tensor(state[name], dtype=kind)
                      for name, kind in kinds.items()})
