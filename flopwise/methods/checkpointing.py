"""Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"): backward keeps only each block's input and recomputes the block's forward, so the
activations held at the peak shrink from every block's intermediates to one residual stream per
block plus one block's intermediates, for about a third more compute.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig
from flopwise.model.config import ModelConfig


class ActivationCheckpointing(Method):
    """Turns on ``GPT.checkpoint_blocks``: every block runs under non-reentrant
    ``torch.utils.checkpoint`` while training (never in evaluation or cached generation)."""

    name: ClassVar[str] = "checkpointing"
    saves_memory = True

    @classmethod
    def memory(cls, config: MethodConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.recompute_blocks = True

    def configure(self, model: nn.Module) -> None:
        model.checkpoint_blocks = True
