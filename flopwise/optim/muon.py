"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum, then the update
replaced by its nearest semi-orthogonal matrix, computed with a few quintic polynomial iterations;
and NorMuon's per-neuron normalization of that orthogonalized update (Li et al. 2025).

Muon is for the 2-D weights of the hidden layers only.  Embeddings, the output head, norm gains
and biases keep AdamW, as in the modded-nanoGPT speedrun; both update rules live in
flopwise/optim/optimizer.py.  This module holds the orthogonalization and the normalization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from flopwise.optim.routing import muon_stacks


@dataclass(frozen=True)
class Iteration:
    """The quintic iteration X <- a X + (b G + c G^2) X, G = X X^T, with one (a, b, c) per step; it maps each
    singular value s of X to a s + b s^3 + c s^5 and keeps the singular vectors.  X starts at the input divided
    by ``safety`` times its Frobenius norm (>= its spectral norm), so every singular value starts in (0, 1]."""

    steps: tuple[tuple[float, float, float], ...]
    safety: float = 1.0

    def coefficients(self, count: int) -> tuple[tuple[float, float, float], ...]:
        """Those of the first ``count`` steps (a single triple repeats)."""
        if len(self.steps) == 1:
            return self.steps * count
        if count > len(self.steps):
            raise ValueError(f"this iteration has coefficients for {len(self.steps)} steps, not {count}")
        return self.steps[:count]


ITERATIONS = {
    # The speedrun's quintic (Jordan et al. 2024): one triple, the steepest slope at 0 that still maps [0, 1]
    # into about [0.7, 1.2] in five steps, which trains as well as the exact polar factor.
    "newton_schulz": Iteration(((3.4445, -4.7750, 2.0315),)),
    # Polar Express (Amsel, Persson, Musco & Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and
    # Their Application to the Muon Algorithm", arXiv:2505.16932): a different minimax-optimal triple for each
    # step, for 5 steps with safety factor 2e-2 (the paper's numbers as modded-nanoGPT and nanochat use them),
    # so singular values land closer to 1 at the same cost.
    "polar_express": Iteration((
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ), safety=1.02),
}


# The dtypes the iteration may run in.  bf16 is what the speedrun, nanochat and torch.optim.Muon iterate in: its
# matmuls are about twice fp32's speed on GPUs and on CPUs with AVX512-BF16 or AMX (bench/optimizer.py), and
# far slower on CPUs without them; the iteration needs no more than bf16's precision (Jordan et al. 2024).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: str = "newton_schulz", precision: str = "fp32") -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (its orthogonal polar factor), by ``steps`` steps of the
    iteration ``coefficients`` names (ITERATIONS), computed in ``precision`` (PRECISIONS); a [..., rows, cols]
    stack is orthogonalized matrix by matrix in one batched iteration."""
    iteration = ITERATIONS[coefficients]
    x = matrix.to(PRECISIONS[precision])
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * iteration.safety + eps)  # spectral norm <= Frobenius norm
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    for a, b, c in iteration.coefficients(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(matrix.dtype)


def orthogonalize_all(updates: list[torch.Tensor], steps: int, coefficients: str = "newton_schulz",
                      precision: str = "fp32") -> list[torch.Tensor]:
    """newton_schulz of each update (local fp32 tensors on one device), those of one shape up to transposition
    in one batched iteration (flopwise/optim/routing.py's ``muon_stacks``)."""
    result: list[torch.Tensor | None] = [None] * len(updates)
    for indices in muon_stacks([update.shape for update in updates]):
        wide = [updates[i] if updates[i].shape[0] <= updates[i].shape[1] else updates[i].T for i in indices]
        done_stack = newton_schulz(torch.stack(wide), steps, coefficients=coefficients, precision=precision)
        for index, done in zip(indices, done_stack):
            result[index] = done if updates[index].shape[0] <= updates[index].shape[1] else done.T
    return result  # type: ignore[return-value]


def neuron_second_moment_shape(rows: int, cols: int) -> tuple[int, int]:
    """NorMuon's statistic: one per row of a tall or square matrix, one per column of a wide one.  An
    orthogonalized tall matrix has columns of norm 1 already (and a wide one rows), so only the longer side's
    norms vary; modded-nanoGPT and nanochat normalize along it the same way."""
    return (rows, 1) if rows >= cols else (1, cols)


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv:2510.05491): the
    orthogonalized ``update`` divided by the root of an EMA (``second_moment``, updated in place, shaped as
    ``neuron_second_moment_shape``) of its neurons' mean squares, so that no neuron dominates the step; then
    scaled back to the update's own Frobenius norm, so Muon's learning rate carries over (modded-nanoGPT's
    and nanochat's form; the paper matches AdamW's RMS instead)."""
    reduce = -1 if update.shape[-2] >= update.shape[-1] else -2  # as neuron_second_moment_shape
    second_moment.lerp_(update.square().mean(dim=reduce, keepdim=True), 1 - beta2)
    normalized = update * second_moment.clamp_min(1e-10).rsqrt()
    norm, new_norm = update.norm(), normalized.norm()
    return normalized * (norm / new_norm.clamp_min(1e-10))


def on_full_matrix(update: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``transform`` (orthogonalization, NorMuon) of the whole matrix, also when FSDP2 holds it as row shards
    (a DTensor): every rank transforms the gathered matrix alike and keeps its own shard of the result."""
    if isinstance(update, DTensor):
        return distribute_tensor(transform(update.full_tensor()), update.device_mesh, update.placements)
    return transform(update)
