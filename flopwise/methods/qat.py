"""Quantization-aware training for a 4-bit export (fake quantization, Jacob et al. 2018; the straight-through
estimator, Bengio et al. 2013).  Only int4 for now: symmetric, group-wise, round-to-nearest, as
flopwise/model/int4.py defines it and ``flopwise eval --quantize int4`` applies it to the trained model.

From budget progress p = ``start`` on, every block Linear computes its training forward with its weight
rounded to int4 and read back, and its gradient updates the full-precision weight as if the rounding were
the identity, so the last part of the run learns weights whose rounding costs little.  The weights stay full
precision: the state dict, checkpoints, ``final/`` and its export are those of a plain run, and the run's
evaluations (in eval mode) measure the full-precision model, as ``flopwise eval`` does.  Whether the layers
quantize is a function of p alone, so a resumed run needs no saved state to repeat the uninterrupted one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunView, World
from flopwise.methods.dense import replace_block_linears
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import Linear, linear
from flopwise.model.int4 import DEFAULT_GROUP, check_group, straight_through
from flopwise.section import in_range


class FakeQuantLinear(Linear):
    """A block Linear that, while ``active`` and training, computes with its weight fake-quantized to int4
    (straight-through).  It holds the replaced Linear's own ``weight`` and ``bias`` Parameters under the
    same names, so the state dict, the optimizer's view of the model and every saved file are unchanged."""

    def __init__(self, linear: nn.Linear, group: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialize a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.group = group
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = straight_through(self.weight, self.group) if self.active and self.training else self.weight
        return linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, active={self.active}"


class QATConfig(MethodConfig):
    """``start``: budget progress p from which the block weights are fake-quantized (0.8, measured by
    bench/low_precision.py: earlier starts cost full-precision loss, 0.8 and 0.9 tie); ``group``: input
    columns per int4 scale (32, as llama.cpp's Q4_0)."""

    start: float = 0.8
    group: int = DEFAULT_GROUP

    _start = in_range("start", low=0, high=1, below=True)
    _group = in_range("group", low=1)


class QuantizationAwareTraining(Method):
    name: ClassVar[str] = "qat"
    Config = QATConfig
    conflicts = {"lora": "LoRA replaces the block Linears that QAT fake-quantizes with adapted ones",
                 "sltrain": "SLTrain replaces the block Linears' dense weights, which QAT fake-quantizes",
                 "fp8": "fp8 converts the block Linears to torchao's Float8Linear, and QAT replaces them too"}

    def __init__(self, config: QATConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.layers: list[FakeQuantLinear] = []
        self.active = False

    @classmethod
    def check(cls, config: QATConfig, run: RunView, world: World | None) -> None:
        check_group(run.model, config.group, f"methods.qat.group={config.group}")

    @classmethod
    def int4_group(cls, config: QATConfig) -> int | None:
        return config.group

    @classmethod
    def memory(cls, config: QATConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.fake_quantized_blocks = True

    def configure(self, model: nn.Module) -> None:
        group = self.config.group

        def swap(linear: nn.Linear) -> FakeQuantLinear:
            layer = FakeQuantLinear(linear, group)
            self.layers.append(layer)
            return layer

        replace_block_linears(model, swap)

    def on_progress(self, step: int, p: float) -> None:
        self.active = p >= self.config.start
        for layer in self.layers:
            layer.active = self.active

    def log_fields(self) -> dict[str, Any]:
        return {"qat": 1} if self.active else {}
