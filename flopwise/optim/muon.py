"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum, then the update
replaced by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations.

Muon is for the 2-D weights of the hidden layers only.  Embeddings, the output head, norm gains
and biases keep AdamW, as in the modded-nanoGPT speedrun.  Both live in this one optimizer
(groups marked ``use_muon``), so the LR schedule, checkpoints and PyTorch's state-dict tools see
a single object.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# Coefficients of the quintic iteration from the speedrun: they push singular values into roughly
# [0.7, 1.2] in five steps, which works as well as exact orthogonalization for training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (its orthogonal polar factor)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float() / (matrix.float().norm() + eps)  # spectral norm <= Frobenius norm <= 1
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(matrix.dtype)


def _orthogonalized(update: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz of the whole matrix, also when FSDP2 holds it as row shards (a DTensor): every
    rank orthogonalizes the gathered matrix and keeps its own shard of the result."""
    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        return distribute_tensor(full, update.device_mesh, update.placements)
    return newton_schulz(update, steps)


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True``; AdamW (decoupled weight decay) on the others.

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay.  The orthogonalized update of
    a rows x cols matrix is scaled by sqrt(max(1, rows / cols)), as in the speedrun, so tall
    matrices get updates of the same per-entry size.  AdamW group keys: lr, betas, eps,
    weight_decay, as torch.optim.AdamW.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> None:
        defaults = {"lr": 0.02, "weight_decay": 0.0, "use_muon": False, "momentum": momentum, "nesterov": nesterov,
                    "ns_steps": ns_steps, "betas": betas, "eps": eps}
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only; give the others to AdamW groups")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(param, group)
                else:
                    self._adamw(param, group)

    def _muon(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - group["momentum"])
        update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
        update = _orthogonalized(update, group["ns_steps"])
        rows, cols = param.shape
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))

    def _adamw(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** step))
