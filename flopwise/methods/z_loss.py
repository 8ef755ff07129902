"""Z-loss (Chowdhery et al. 2022, "PaLM", section 5; also used in OLMo 2 and Chameleon): an auxiliary
loss ``weight * log(Z)**2`` per token, where ``Z`` is the softmax's normalizer ``sum(exp(logits))``.
It pulls the log-normalizer toward 0, which keeps the logits from drifting and the softmax stable in
low precision.  PaLM's weight is 1e-4.  The logged training loss stays the plain cross-entropy.

This module is also the worked example of docs/methods.md: a method is its own module plus one line in
flopwise/methods/registry.py.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from flopwise.methods.base import PRETRAIN, Method, MethodConfig, StepOutputs
from flopwise.section import in_range


class ZLossConfig(MethodConfig):
    """``weight`` of the mean squared log-normalizer (PaLM: 1e-4)."""

    weight: float = 1e-4

    _weight = in_range("weight", low=0, above=True)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's positions of log(sum(exp(logits)))**2, in fp32: [B] from [B, T, V]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean(dim=1)


class ZLoss(Method):
    name: ClassVar[str] = "z_loss"
    stages = PRETRAIN
    Config = ZLossConfig

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        return total + self.config.weight * z_loss(outputs.logits)
