"""GaLore's gradient projector (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection").

A rows x cols gradient G is projected onto the span of its top-r singular vectors on the smaller
side, as in the paper's reference code: with rows >= cols, the r leading right singular vectors
P (cols x r) give G @ P (rows x r); otherwise the r leading left singular vectors P (rows x r)
give P^T @ G (r x cols).  Adam then keeps its moments for the small projected matrix only, which
is where the memory goes; its update is mapped back with P (the optimizer scales it).  P is a
state tensor refreshed from the current gradient every ``update_gap`` steps.
"""

from __future__ import annotations

import torch


def projects_right(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a matrix of this shape is projected on its column side (it is at least as tall as wide)."""
    return shape[0] >= shape[1]


def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (fp32) of the top-``rank`` singular subspace on the gradient's smaller side;
    ``rank`` is clamped to min(rows, cols)."""
    u, _, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    rank = min(rank, *grad.shape)
    return vh[:rank].T.contiguous() if projects_right(grad.shape) else u[:, :rank].contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The low-rank gradient: G @ P (tall) or P^T @ G (wide)."""
    basis = basis.to(grad.dtype)
    return grad @ basis if projects_right(grad.shape) else basis.T @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A low-rank update mapped back to the full ``shape``: U @ P^T (tall) or P @ U (wide)."""
    basis = basis.to(low.dtype)
    return low @ basis.T if projects_right(shape) else basis @ low
