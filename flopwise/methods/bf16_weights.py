"""bf16 weights (Zamirai et al. 2020, "Revisiting BFloat16 Training"; Kalamkar et al. 2019, "A Study of
BFLOAT16 for Deep Learning Training"): the model's matrices (embeddings, head and the blocks' Linears)
are stored in bf16, halving their memory and that of their gradients, while the optimizer states stay
as configured (fp32, or 8-bit with ``8bit``).  Each update goes through an fp32 copy of one weight at
a time and is rounded back stochastically or with a Kahan compensation buffer
(flopwise/optim/rounding.py), which keeps the small late-run updates that round-to-nearest loses.

Norm gains and biases stay fp32: they are a few thousand numbers and the most sensitive ones.  The
residual stream and the loss stay fp32.  Under bf16 compute (train.precision=bf16) the matmuls read
the bf16 weights directly; under fp32 compute each Linear upcasts its weight for the matmul and again
in backward, keeping only the bf16 weight in between (flopwise/model/gpt.py ``linear``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, RunView, World
from flopwise.model.config import ModelConfig


class BF16WeightsConfig(MethodConfig):
    """``rounding`` of each update into the bf16 weights: ``stochastic`` (no extra memory), ``kahan`` (a
    bf16 compensation buffer per weight) or ``nearest`` (uncompensated, to compare against)."""

    rounding: Literal["stochastic", "kahan", "nearest"] = "stochastic"


class BF16Weights(Method):
    name: ClassVar[str] = "bf16_weights"
    Config = BF16WeightsConfig
    saves_memory = True
    conflicts: ClassVar[dict[str, str]] = {
        "sltrain": "SLTrain's factors compute in their own dtype, outside the Linear casts bf16 weights need",
        "lora": "LoRA's adapters read the frozen base weight in its own dtype",
    }

    @classmethod
    def check(cls, config: BF16WeightsConfig, run: RunView, world: World | None) -> None:
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: BF16WeightsConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.matrix_bytes = 2
        traits.rounding = config.rounding

    def configure(self, model: nn.Module) -> None:
        model.store_matrices_in(torch.bfloat16)

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        spec.options.update(rounding=self.config.rounding, seed=self.seed)
