"""Per-sequence loss reweighting (Sow et al. 2025, flopwise/methods/sample_weights.py): each sequence's
loss is multiplied by a weight from its loss's place in the global batch, after uniform weights for the
first ``burn_in`` share of the budget (the paper's first 1000 steps)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from flopwise.methods.base import Method, MethodConfig, RunResources, StepOutputs
from flopwise.methods.sample_weights import sample_weights
from flopwise.section import in_range


class ReweightConfig(MethodConfig):
    """``strategy``: linupper (the paper's choice), quadratic, extremes, or uniform (the baseline); softmax
    ``temperature`` r; losses normalized to [-delta, delta] in the global batch; uniform weights while
    p < ``burn_in``."""

    strategy: Literal["linupper", "quadratic", "extremes", "uniform"] = "linupper"
    temperature: float = 0.4
    delta: float = 1.0
    burn_in: float = 0.05

    _positives = in_range("temperature", "delta", low=0, above=True)
    _burn_in = in_range("burn_in", low=0, high=1, below=True)


class SampleReweighting(Method):
    name: ClassVar[str] = "reweight"
    Config = ReweightConfig

    def setup(self, run: RunResources) -> None:
        self.ranks = run.ranks

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        c = self.config
        if p < c.burn_in:
            return total
        return total * sample_weights(outputs.sequence.detach(), c, self.ranks)
