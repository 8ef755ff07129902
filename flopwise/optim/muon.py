"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum, then the update
replaced by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations.

Muon is for the 2-D weights of the hidden layers only.  Embeddings, the output head, norm gains
and biases keep AdamW, as in the modded-nanoGPT speedrun; both update rules live in
flopwise/optim/optimizer.py.  This module holds the orthogonalization.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from flopwise.optim.routing import muon_stacks

# Coefficients of the quintic iteration from the speedrun: they push singular values into roughly
# [0.7, 1.2] in five steps, which works as well as exact orthogonalization for training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (its orthogonal polar factor); a [..., rows, cols] stack
    is orthogonalized matrix by matrix in one batched iteration."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(matrix.dtype)


def orthogonalize_all(updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """newton_schulz of each update (local fp32 tensors on one device), those of one shape up to transposition
    in one batched iteration (flopwise/optim/routing.py's ``muon_stacks``)."""
    result: list[torch.Tensor | None] = [None] * len(updates)
    for indices in muon_stacks([update.shape for update in updates]):
        wide = [updates[i] if updates[i].shape[0] <= updates[i].shape[1] else updates[i].T for i in indices]
        for index, done in zip(indices, newton_schulz(torch.stack(wide), steps)):
            result[index] = done if updates[index].shape[0] <= updates[index].shape[1] else done.T
    return result  # type: ignore[return-value]


def _orthogonalized(update: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz of the whole matrix, also when FSDP2 holds it as row shards (a DTensor): every
    rank orthogonalizes the gathered matrix and keeps its own shard of the result."""
    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        return distribute_tensor(full, update.device_mesh, update.placements)
    return newton_schulz(update, steps)
