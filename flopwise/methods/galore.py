"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
Adam on the blocks' matrices' gradients projected to rank r, the projection refreshed every
``update_gap`` steps by an SVD and the update projected back and scaled by ``scale``
(flopwise/optim/galore.py, flopwise/optim/optimizer.py).  The paper's defaults: rank 128-512 for
60M-1B models (d_model // 4), update_gap 200, scale 0.25."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, World, default_rank
from flopwise.model.config import ModelConfig
from flopwise.section import in_range

if TYPE_CHECKING:
    from flopwise.config import RunConfig


class GaLoreConfig(MethodConfig):
    """``rank``: of the projection (unset: d_model // 4); ``update_gap``: steps between SVDs; ``scale``: of
    the projected-back update."""

    rank: int | None = None
    update_gap: int = 200
    scale: float = 0.25

    _counts = in_range("rank", "update_gap", low=1)  # rank None: d_model // 4
    _scale = in_range("scale", low=0, above=True)


class GaLore(Method):
    name: ClassVar[str] = "galore"
    Config = GaLoreConfig
    saves_memory = True

    @classmethod
    def check(cls, config: GaLoreConfig, run: RunConfig, world: World | None) -> None:
        if run.optim.name != "adamw":
            raise FlopwiseError(f"methods.use galore runs Adam on projected gradients and cannot be combined "
                                f"with optim.name={run.optim.name}: set optim.name=adamw")
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: GaLoreConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.low_rank_gradients = default_rank(config.rank, model.d_model)

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        c = self.config
        spec.matrix_update = {"update": "galore", "lr": spec.optim.lr, "weight_decay": spec.optim.weight_decay}
        spec.options.update(rank=default_rank(c.rank, model.config.d_model), update_gap=c.update_gap,
                            scale=c.scale)
