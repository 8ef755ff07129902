"""Per-layer updates during backward (Zhao et al. 2024, "GaLore", section 4.2; LOMO, Lv et al. 2023):
each weight is updated the moment its gradient is complete and the gradient freed, so the full set of
gradients is never alive at once (flopwise/optim/layerwise.py).  No gradient is left to clip, none can
be accumulated over micro-batches, and under DDP none would be reduced yet when its hook fires."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, World
from flopwise.model.config import ModelConfig
from flopwise.optim.layerwise import LayerwiseUpdates

if TYPE_CHECKING:
    from flopwise.config import RunConfig


class PerLayerUpdates(Method):
    name: ClassVar[str] = "layerwise"
    saves_memory = True
    keeps_gradients = False

    @classmethod
    def check(cls, config: MethodConfig, run: RunConfig, world: World | None) -> None:
        if run.optim.grad_accum > 1:
            raise FlopwiseError("methods.use 'layerwise' updates each weight during backward, so it cannot "
                                "accumulate gradients: set optim.grad_accum=1 (raise optim.batch_size instead)")
        cls.refuse_in_parallel(world, "updates weights inside backward, before DDP has reduced "
                                     "their gradients")

    @classmethod
    def memory(cls, config: MethodConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.updates_in_backward = True

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        spec.wrappers.append(LayerwiseUpdates)
