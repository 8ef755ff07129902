"""8-bit optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): every
moment buffer of flopwise's optimizer is stored as one byte per element plus an fp32 absmax per block
of ``block`` elements (flopwise/optim/quantize.py), for AdamW, Muon and GaLore alike."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, RunView, World
from flopwise.model.config import ModelConfig
from flopwise.section import in_range


class EightBitConfig(MethodConfig):
    """``block``: elements per quantization block (the paper's 2048 on GPUs; 256 keeps small tensors exact
    enough on CPU)."""

    block: int = 256

    _block = in_range("block", low=1)


class EightBitStates(Method):
    name: ClassVar[str] = "8bit"
    Config = EightBitConfig
    saves_memory = True
    legacy_keys = {"memory.state_block": "block"}

    @classmethod
    def check(cls, config: EightBitConfig, run: RunView, world: World | None) -> None:
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: EightBitConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.state_bits, traits.state_block = 8, config.block

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        spec.options.update(state_bits=8, state_block=self.config.block)
