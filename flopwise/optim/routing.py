"""Which parameters the optimizer-side methods touch, decided from names and shapes alone (no torch
import), so the optimizer builder and the memory estimator route every parameter the same way."""

from __future__ import annotations

from typing import Sequence


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """A 2-D weight of a transformer block (attention or MLP), which Muon or GaLore updates: not an
    embedding, head, gain or bias, nor a factor of a low-rank or sparse module (``q_proj.B``,
    ``q_proj.lora_A``), nor a speedrun option's table, gate or scalar (``self_attn.value_embed``,
    ``self_attn.value_gate``, ``lambdas``: named without ".weight" for this), which AdamW trains (modded-nanogpt
    gives its embeddings, gates and scalars to Adam too)."""
    return ndim == 2 and name.startswith("layers.") and name.endswith(".weight")


# Muon orthogonalizes matrices of one shape together up to this many elements per stack (4 MiB in fp32): enough
# to batch every small matrix, where the per-call overhead of many little matmuls is what Muon's step costs
# (bench/overhead.py), while a stack's working memory stays a few MiB at any model size.
MAX_STACK_ELEMENTS = 1 << 20


def muon_stacks(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices of matrices of ``shapes`` that Muon orthogonalizes together: those of one shape up to
    transposition (q/k/v/o of every layer; the MLP's up and down projections), as nanochat groups them, cut
    into stacks of at most MAX_STACK_ELEMENTS elements."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (rows, cols) in enumerate(shapes):
        groups.setdefault((min(rows, cols), max(rows, cols)), []).append(index)
    stacks = []
    for (short, long), indices in groups.items():
        size = max(1, MAX_STACK_ELEMENTS // (short * long))
        stacks += [indices[start:start + size] for start in range(0, len(indices), size)]
    return stacks
