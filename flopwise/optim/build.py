"""The optimizer a config asks for, with parameter groups that each carry their own peak LR.

Every group holds ``peak_lr``; the training loop sets ``lr = peak_lr * schedule(p)`` on all of
them, so AdamW, Muon and GaLore groups follow one schedule from different peaks.  Plain AdamW
with 32-bit states stays torch.optim.AdamW (fused on CUDA); everything else is one
FlopwiseOptimizer (flopwise/optim/optimizer.py), with per-layer updates during backward when
``memory.methods`` has ``layerwise``.
"""

from __future__ import annotations

import torch
from torch import nn

from flopwise.config import MemorySection, OptimSection, default_rank
from flopwise.errors import FlopwiseError
from flopwise.optim.layerwise import LayerwiseUpdates
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.optim.routing import OPTIMIZER_METHODS, is_hidden_matrix


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device,
                    memory: MemorySection | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay on matrices only, not embeddings, gains or biases, as in GPT-2/LLaMA
    practice), or Muon or GaLore for the blocks' matrices with that AdamW for everything else."""
    memory = memory if memory is not None else MemorySection()
    methods = set(memory.methods) & set(OPTIMIZER_METHODS)
    params = list(model.named_parameters())
    if "galore" in methods and optim.name != "adamw":
        raise FlopwiseError(f"memory.methods galore runs Adam on projected gradients and cannot be combined with "
                            f"optim.name={optim.name}: set optim.name=adamw")
    if optim.name == "adamw" and not methods:
        return torch.optim.AdamW(_adamw_groups(params, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                 eps=optim.eps, fused=device.type == "cuda" or None)
    groups = []
    if optim.name == "muon" or "galore" in methods:
        hidden = [p for n, p in params if is_hidden_matrix(n, p.ndim)]
        params = [(n, p) for n, p in params if not is_hidden_matrix(n, p.ndim)]
        if optim.name == "muon":
            groups.append({"params": hidden, "update": "muon", "lr": optim.muon_lr, "peak_lr": optim.muon_lr,
                           "weight_decay": 0.0})
        else:
            groups.append({"params": hidden, "update": "galore", "lr": optim.lr, "peak_lr": optim.lr,
                           "weight_decay": optim.weight_decay})
    groups = [group for group in groups if group["params"]] + _adamw_groups(params, optim)
    rank = default_rank(memory.galore_rank, model.config.d_model) if "galore" in methods else None
    optimizer = FlopwiseOptimizer(
        groups, momentum=optim.muon_momentum, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        state_bits=8 if "8bit" in methods else 32, state_block=memory.state_block, rank=rank,
        update_gap=memory.galore_update_gap, scale=memory.galore_scale)
    if "layerwise" in methods:  # one process and no gradient accumulation: flopwise/train/memory_setup.py
        LayerwiseUpdates(optimizer)
    return optimizer


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on weight matrices; not on embeddings, gains, biases, nor on SLTrain's and LoRA's
    factors (both papers train those without it)."""
    return param.ndim >= 2 and name.endswith(".weight") and "embed" not in name


def _adamw_groups(params: list[tuple[str, torch.Tensor]], optim: OptimSection) -> list[dict]:
    decay = [p for n, p in params if _decays(n, p)]
    no_decay = [p for n, p in params if not _decays(n, p)]
    return [{"params": group, "lr": optim.lr, "peak_lr": optim.lr, "weight_decay": wd}
            for group, wd in ((decay, optim.weight_decay), (no_decay, 0.0)) if group]
