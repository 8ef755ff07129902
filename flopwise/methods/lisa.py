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

import numpy as np
import torch
from torch import nn

from flopwise.methods.base import TrainingMethod


class LISA(TrainingMethod):
    """Before each step, train the blocks drawn for its interval, freeze the others and drop their
    optimizer states.  The optimizer is built over all parameters (nothing is frozen before the
    first ``before_step``); an optimizer skips frozen parameters, whose gradients stay None."""

    name = "lisa"

    def __init__(self, layers: int = 2, interval: int = 20, seed: int = 0) -> None:
        self.layers, self.interval, self.seed = layers, interval, seed

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
