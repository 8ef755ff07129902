"""The optimizer a config asks for, with parameter groups that each carry their own peak LR.

Every group holds ``peak_lr``; the training loop sets ``lr = peak_lr * schedule(p)`` on all of
them, so AdamW and Muon groups follow one schedule from different peaks.
"""

from __future__ import annotations

import torch
from torch import nn

from flopwise.config import OptimSection
from flopwise.optim.muon import Muon


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight of a transformer block (attention or MLP): not an embedding, head, gain or bias."""
    return param.ndim == 2 and name.startswith("layers.")


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay on matrices only, not embeddings, gains or biases, as in GPT-2/LLaMA
    practice), or Muon for the blocks' matrices with that AdamW for everything else."""
    params = list(model.named_parameters())
    if optim.name == "muon":
        hidden = [p for n, p in params if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in params if not is_hidden_matrix(n, p)]
        groups = [{"params": hidden, "use_muon": True, "lr": optim.muon_lr, "peak_lr": optim.muon_lr,
                   "weight_decay": 0.0}]
        groups += _adamw_groups(rest, optim)
        return Muon(groups, momentum=optim.muon_momentum, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    return torch.optim.AdamW(_adamw_groups(params, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, fused=device.type == "cuda" or None)


def _adamw_groups(params: list[tuple[str, torch.Tensor]], optim: OptimSection) -> list[dict]:
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": group, "lr": optim.lr, "peak_lr": optim.lr, "weight_decay": wd}
            for group, wd in ((decay, optim.weight_decay), (no_decay, 0.0)) if group]
