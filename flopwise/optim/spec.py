"""What the optimizer builder makes, as an object the methods change (flopwise/methods/base.py's
``shape_optimizer`` hook), so the builder knows no method by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from flopwise.optim.config import OptimSection


@dataclass
class OptimizerSpec:
    """What the optimizer builder makes from ``optim`` (the run's optimizer section), as the methods
    shape it: ``options`` for FlopwiseOptimizer (state precision, GaLore's rank...), ``matrix_update``
    the group settings of the blocks' 2-D weights (Muon's unless a method sets another rule),
    ``wrappers`` applied to the built optimizer (per-layer updates)."""

    optim: OptimSection
    options: dict[str, Any] = field(default_factory=dict)
    matrix_update: dict[str, Any] | None = None
    wrappers: list[Callable[[torch.optim.Optimizer], None]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """A method asked for more than plain AdamW can do (torch's AdamW serves the plain case)."""
        return bool(self.options or self.matrix_update or self.wrappers)
