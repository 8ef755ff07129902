"""The optimizer a config asks for, with parameter groups that each carry their own peak LR.

Every group holds ``peak_lr``; the training loop sets ``lr = peak_lr * schedule(p)`` on all of
them, so AdamW, Muon (NorMuon) and GaLore groups follow one schedule from different peaks.  Methods change
what is built through an ``OptimizerSpec`` (flopwise/methods/base.py: state precision, the blocks'
matrices' update rule, per-layer updates); plain AdamW that no method changes stays
torch.optim.AdamW (fused on CUDA), everything else is one FlopwiseOptimizer (flopwise/optim/optimizer.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flopwise.optim.config import OptimSection
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.optim.routing import is_hidden_matrix
from flopwise.optim.spec import OptimizerSpec


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device,
                    shape: Callable[[OptimizerSpec, nn.Module], None] | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay on matrices only, not embeddings, gains or biases, as in GPT-2/LLaMA
    practice), or Muon or NorMuon (or the rule a method sets) for the blocks' matrices with that AdamW for
    everything else.  ``shape``: the methods' ``shape_optimizer`` hook."""
    spec = OptimizerSpec(optim)
    if shape is not None:
        shape(spec, model)
    params = list(model.named_parameters())
    if optim.name == "adamw" and not spec.changed and not optim.cautious_weight_decay:
        return torch.optim.AdamW(_adamw_groups(params, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                 eps=optim.eps, fused=device.type == "cuda" or None)
    groups = []
    matrix_update = spec.matrix_update or (_muon_group(optim) if optim.name != "adamw" else None)
    if matrix_update is not None:
        hidden = [p for n, p in params if is_hidden_matrix(n, p.ndim)]
        params = [(n, p) for n, p in params if not is_hidden_matrix(n, p.ndim)]
        if hidden:
            groups.append({"params": hidden, **matrix_update, "peak_lr": matrix_update["lr"]})
    groups += _adamw_groups(params, optim)
    optimizer = FlopwiseOptimizer(groups, momentum=optim.muon_momentum, betas=(optim.beta1, optim.beta2),
                                  eps=optim.eps, cautious_weight_decay=optim.cautious_weight_decay, **spec.options)
    for wrap in spec.wrappers:
        wrap(optimizer)
    return optimizer


def _muon_group(optim: OptimSection) -> dict:
    """The settings of the blocks' matrices' group under Muon or NorMuon."""
    group = {"update": optim.name, "lr": optim.muon_lr, "weight_decay": optim.muon_weight_decay,
             "ns_coefficients": optim.ns_coefficients, "ns_precision": optim.ns_precision}
    return {**group, "normuon_beta2": optim.normuon_beta2} if optim.name == "normuon" else group


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on weight matrices; not on embeddings, gains, biases, nor on SLTrain's and LoRA's
    factors (both papers train those without it)."""
    return param.ndim >= 2 and name.endswith(".weight") and "embed" not in name


def _adamw_groups(params: list[tuple[str, torch.Tensor]], optim: OptimSection) -> list[dict]:
    decay = [p for n, p in params if _decays(n, p)]
    no_decay = [p for n, p in params if not _decays(n, p)]
    return [{"params": group, "lr": optim.lr, "peak_lr": optim.lr, "weight_decay": wd}
            for group, wd in ((decay, optim.weight_decay), (no_decay, 0.0)) if group]
