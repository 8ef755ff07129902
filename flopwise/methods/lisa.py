"""LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
Model Fine-Tuning"; its reference code is LMFlow's ``DynamicLayerActivationCallback``).

The embeddings, the final norm and the head always train; of the blocks, only ``layers`` chosen
uniformly at random do, and the choice is redrawn every ``interval`` steps, so gradients and
optimizer states exist for those few blocks only.  LMFlow's defaults are 2 layers every 20 steps
(its README examples use 1 every 20).

The blocks active for steps [k*K, (k+1)*K) come from a generator seeded by (seed, k): the choice is
a function of the step alone, so ``before_step`` may run any number of times and a resumed run
re-applies the same set without touching the optimizer states it loaded.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunView, World
from flopwise.model.config import ModelConfig
from flopwise.section import in_range


class LISAConfig(MethodConfig):
    """``layers``: blocks that train at a time; ``interval``: steps between redraws (LMFlow's 2 and 20)."""

    layers: int = 2
    interval: int = 20

    _counts = in_range("layers", "interval", low=1)  # more layers than the model has: all of them


class LISA(Method):
    """Before each step, train the blocks drawn for its interval, freeze the others and drop their
    optimizer states.  The optimizer is built over all parameters (nothing is frozen before the
    first ``before_step``); an optimizer skips frozen parameters, whose gradients stay None."""

    name: ClassVar[str] = "lisa"
    Config = LISAConfig
    saves_memory = True
    legacy_keys = {"memory.lisa_layers": "layers", "memory.lisa_interval": "interval"}
    conflicts = {"lora": "LoRA freezes the blocks whose weights LISA would train"}

    def __init__(self, config: LISAConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.layers, self.interval = config.layers, config.interval

    @classmethod
    def check(cls, config: LISAConfig, run: RunView, world: World | None) -> None:
        cls.refuse_in_parallel(world, "changes which layers train, while DDP fixes that set when it "
                                     "wraps the model")

    @classmethod
    def memory(cls, config: LISAConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.trained_blocks = config.layers

    def active_blocks(self, step: int, n_blocks: int) -> frozenset[int]:
        """Indices of the blocks that train at ``step`` (steps already taken)."""
        period = step // self.interval
        rng = np.random.default_rng([self.seed % 2**63, period])
        return frozenset(rng.choice(n_blocks, size=min(self.layers, n_blocks), replace=False).tolist())

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        active = self.active_blocks(step, len(model.layers))
        for index, block in enumerate(model.layers):
            trains = index in active
            for param in block.parameters():
                param.requires_grad_(trains)
                if not trains:
                    optimizer.state.pop(param, None)
