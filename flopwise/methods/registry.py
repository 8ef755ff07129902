"""Every method a run can use, in the order their hooks run.  Adding a method is one line here: its
module (under flopwise/methods/) and class.

The order matters where hooks compose: a static mixture sets the weights an online mixture starts
from, multi-token prediction's extra targets join the cross-entropy before SALT's distillation term is
mixed in (or distill's) and before sample reweighting multiplies the loss, and the z-loss is added last, unweighted.
"""

from __future__ import annotations

import importlib

from flopwise.methods.base import Method

REGISTERED = (
    "eight_bit.EightBitStates",
    "bf16_weights.BF16Weights",
    "checkpointing.ActivationCheckpointing",
    "layerwise.PerLayerUpdates",
    "galore.GaLore",
    "sltrain.SLTrain",
    "lisa.LISA",
    "lora.LoRA",
    "width.WidthPruning",
    "mixture.StaticMixture",
    "online_mixture.OnlineMixture",
    "curriculum.Curriculum",
    "mtp.MultiTokenPrediction",
    "salt.Salt",
    "distill.Distill",
    "reweight.SampleReweighting",
    "z_loss.ZLoss",
    "grow_depth.GrowDepth",
    "seq_schedule.SeqSchedule",
    "batch_schedule.BatchSchedule",
    "fp8.Float8Matmuls",
    "prune.Prune",
    "qat.QuantizationAwareTraining",
    "weight_average.WeightAverage",
)


def _load(path: str) -> type[Method]:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"flopwise.methods.{module}"), name)


METHODS: tuple[type[Method], ...] = tuple(_load(path) for path in REGISTERED)
BY_NAME: dict[str, type[Method]] = {method.name: method for method in METHODS}
MEMORY_METHODS: tuple[str, ...] = tuple(method.name for method in METHODS if method.saves_memory)
