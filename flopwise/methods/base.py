"""The hooks a training method may implement, so methods enter the loop without ``if`` branches in it.

Every hook is optional and is called with the number of optimizer steps already taken; methods
derive everything they do from that count and the run's seed, so a resumed run repeats the
uninterrupted one exactly without extra saved state.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainingMethod:
    """Base class: each hook does nothing."""

    name = "method"

    def configure(self, model: nn.Module) -> None:
        """Change the model before the optimizer is built (factorize, wrap or freeze modules)."""

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Act before optimizer step ``step + 1`` (e.g. choose which layers train)."""

    def lr_factor(self, step: int) -> float:
        """A multiplier on the schedule's learning rate for the coming step (e.g. a re-warmup)."""
        return 1.0

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Act after ``step`` optimizer steps have been taken (e.g. refactorize, reset momenta)."""
