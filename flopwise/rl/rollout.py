"""Rollouts for GRPO: G completions of one prompt sampled as one batch through the KV cache, and their FLOPs.

The prompt is shared, so it is run once (batch 1) and its cache copied to G rows (``LayerCache.repeat``); then
each decode step runs one token for all G rows.  A row that has ended rides along until every row has ended or
``max_tokens`` is reached (a batch cannot shrink without copying the caches), and what it samples meanwhile is
dropped.  The count of those steps is what the budget pays for: ``generation_flops``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flopwise.model.config import ModelConfig
from flopwise.model.flops import forward_flops_per_token
from flopwise.model.gpt import GPT, LayerCache, sample_next


@dataclass(frozen=True)
class Group:
    """G completions of one prompt."""

    prompt: list[int]
    # Each row's sampled ids, up to and including the end token that ended it (the policy learns to stop), or
    # max_tokens ids when it never ended.
    completions: list[list[int]]
    finished: list[bool]  # whether each row ended with an end token
    # One-token forwards of the G-row batch.  The prompt's forward gives the first token's logits, so a batch
    # whose longest completion has L tokens takes L - 1 of them (the last token needs no forward).
    decode_steps: int


@torch.no_grad()
def sample_group(model: GPT, prompt: list[int], group: int, max_tokens: int, temperature: float,
                 top_p: float | None, generator: torch.Generator, end_ids: frozenset[int]) -> Group:
    """``group`` completions of ``prompt``, each at most ``max_tokens`` long and ended by the first of
    ``end_ids`` it samples; temperature 0 is greedy.  Runs in the model's current mode (the caller sets eval)
    and under whatever autocast the caller holds; the caller sizes prompt + max_tokens to the context."""
    if not prompt or group < 1 or max_tokens < 1 or temperature < 0:
        raise ValueError(f"sample_group needs a prompt, group >= 1, max_tokens >= 1 and temperature >= 0 "
                         f"(got {len(prompt)} prompt tokens, group={group}, max_tokens={max_tokens}, "
                         f"temperature={temperature})")
    context = model.config.context
    if len(prompt) + max_tokens > context:
        raise ValueError(f"a prompt of {len(prompt)} tokens + max_tokens={max_tokens} exceeds the model's "
                         f"context of {context}")
    device = model.embed_tokens.weight.device
    caches = model.new_cache(1)
    logits = model.logits(torch.tensor([prompt], device=device), caches)[:, -1].expand(group, -1)
    caches = [cache.repeat(group) for cache in caches]
    completions, finished, decode_steps = _decode(model, logits, caches, max_tokens, temperature, top_p, generator,
                                                  end_ids)
    return Group(prompt=list(prompt), completions=completions, finished=finished, decode_steps=decode_steps)


@torch.no_grad()
def sample_prompts(model: GPT, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float,
                   generator: torch.Generator | None, end_ids: frozenset[int]) -> list[list[int]]:
    """One completion of each of ``prompts`` (all of one length: one batch, no padding), as ``sample_group``'s rows
    are: through one KV cache, each up to and including its end token or ``max_tokens`` long (evaluation)."""
    device = model.embed_tokens.weight.device
    caches = model.new_cache(len(prompts))
    logits = model.logits(torch.tensor([list(p) for p in prompts], device=device), caches)[:, -1]
    return _decode(model, logits, caches, max_tokens, temperature, None, generator, end_ids)[0]


def _decode(model: GPT, logits: torch.Tensor, caches: list[LayerCache], max_tokens: int, temperature: float,
            top_p: float | None, generator: torch.Generator | None, end_ids: frozenset[int]
            ) -> tuple[list[list[int]], list[bool], int]:
    """Sample after ``logits`` [rows, vocab] until every row has ended or ``max_tokens``: the rows' ids (up to the
    end token, inclusive), whether each ended, and the decode steps taken (one forward of all rows each)."""
    rows, device = logits.shape[0], logits.device
    ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)
    sampled = torch.empty(rows, max_tokens, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_tokens, dtype=torch.long, device=device)  # up to the end token, inclusive
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    decode_steps = 0
    for position in range(max_tokens):
        token = sample_next(logits, temperature, None, top_p, generator)  # [rows, 1]
        sampled[:, position] = token[:, 0]
        ended_now = torch.isin(token[:, 0], ends) & ~finished
        lengths = torch.where(ended_now, position + 1, lengths)
        finished |= ended_now
        if position + 1 == max_tokens or bool(finished.all()):
            break
        logits = model.logits(token, caches)[:, -1]
        decode_steps += 1
    completions = [row[:n] for row, n in zip(sampled.tolist(), lengths.tolist())]
    return completions, finished.tolist(), decode_steps


def generation_flops(config: ModelConfig, prompt_tokens: int, group: int, decode_steps: int) -> float:
    """The forward FLOPs of ``sample_group``: the prompt's ``prompt_tokens`` forward once (batch 1), plus
    ``group`` rows times ``decode_steps`` one-token forwards, each token at ``forward_flops_per_token``.

    That count (flopwise/model/flops.py) holds every matmul weight (the blocks', the output head's, the
    options' gates) and attention over a full ``seq_len`` window for every token: attention over the cache is
    counted as if the cache were full, an upper bound for the short contexts of rollouts, in the same
    convention (no causal saving) as training's count.  The prompt's head matmul is counted at every prompt
    position, as the model runs it.  Left out, as in training's count: the embedding lookups, norms, softmax
    and sampling, and the copying of the prompt's cache to the G rows (memory traffic, no FLOPs)."""
    return forward_flops_per_token(config) * (prompt_tokens + group * decode_steps)
