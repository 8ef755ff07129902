"""FP8 matmuls in the blocks' Linears (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"), through
torchao's float8 training (``torchao.float8.convert_to_float8_training``), not a kernel of flopwise's own.

Each block Linear becomes torchao's ``Float8Linear``, whose forward and both backward matmuls cast their
operands to FP8 with dynamic scales (``tensorwise``: one scale per tensor, E4M3 for inputs and weights and
E5M2 for output gradients, cuBLAS's kernel; ``rowwise``: one scale per row, E4M3 throughout, power-of-two
scales, CUTLASS's kernel) and give bf16 results.  Everything else runs as in a plain bf16 run: attention,
norms, the loss, and the embeddings and head, which stay in higher precision as FP8 training reports advise
(DeepSeek-V3's technical report, 2024, section 3.3.1, keeps its embedding module and output head in BF16/FP32).
A Linear whose in or out features are not a multiple of 16 stays too: FP8 matmuls (``torch._scaled_mm``) need
both dimensions divisible by 16.

The weights stay as stored (fp32 master weights, or bf16 with bf16_weights) under the same parameter names, so
the optimizer, checkpoints, resumes, ``final/`` and the Hugging Face export are those of a plain run.

Needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper and later); a ROCm
GPU is refused too, since its capability numbers do not say whether it has FP8.  torchao is an optional
extra, imported only when a run uses this method.  FSDP is refused: torchao supports float8 under FSDP2,
but that combination has not been run in flopwise (no GPU has been lent to test it); DDP replicates plain
modules and needs nothing more.  torchao fuses its scaling casts only under ``torch.compile``
(``train.compile=true``); in eager mode they run as separate kernels and eat into the speedup.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar, Literal

import torch
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunView, World
from flopwise.methods.dense import block_linears
from flopwise.model.config import ModelConfig

MIN_CAPABILITY = (8, 9)  # Ada (L4, RTX 4090) and Hopper (H100) have FP8 tensor cores; Ampere (A100) has none
FP8_MULTIPLE = 16  # torch._scaled_mm needs both dimensions of each operand divisible by 16


class FP8Config(MethodConfig):
    """``recipe``: torchao's scaling (``Float8LinearConfig.from_recipe_name``): ``tensorwise`` (fastest) or
    ``rowwise`` (finer scales, more accurate)."""

    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"


def torchao_float8() -> ModuleType:
    """``torchao.float8``, imported only when a run uses fp8 (torchao is an optional extra)."""
    try:
        import torchao.float8
    except ImportError:
        raise FlopwiseError("methods.use 'fp8' needs the 'torchao' package: pip install 'flopwise[fp8]' "
                            "(or pip install torchao)") from None
    return torchao.float8


def fits_fp8(linear: nn.Linear) -> bool:
    """Whether ``linear``'s matmuls can run in FP8: both of its dimensions divisible by 16."""
    return linear.in_features % FP8_MULTIPLE == 0 and linear.out_features % FP8_MULTIPLE == 0


def refuse_without_fp8(device: torch.device) -> None:
    """One-line refusal of a device without FP8 matmuls, naming it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.version.hip is not None:
            where = f"{device} ({name}, a ROCm GPU)"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) >= MIN_CAPABILITY:
                return
            where = f"{device} ({name}, compute capability {major}.{minor})"
    else:
        where = str(device)
    raise FlopwiseError(f"methods.use 'fp8' needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9 or newer: "
                        f"L4, RTX 4090, H100 or later) but this run computes on {where}: drop fp8 from methods.use, "
                        "or train on such a GPU")


class Float8Matmuls(Method):
    """Converts the block Linears that fit FP8 to torchao's ``Float8Linear`` with the configured recipe."""

    name: ClassVar[str] = "fp8"
    Config = FP8Config
    matmul_dtype = "fp8"
    conflicts: ClassVar[dict[str, str]] = {
        "lora": "LoRA replaces the block Linears that fp8 would convert with adapted ones",
        "sltrain": "SLTrain replaces the block Linears that fp8 would convert with sparse plus low-rank factors",
    }

    @classmethod
    def check(cls, config: FP8Config, run: RunView, world: World | None) -> None:
        if run.precision == "fp32":
            raise FlopwiseError("methods.use 'fp8' computes everything but its FP8 matmuls in bf16 and cannot run "
                                "with train.precision=fp32: set train.precision=bf16 (or auto), or drop fp8")
        if world is None:  # only the config is checked: estimates and plans may name fp8 anywhere
            return
        if world.size > 1 and world.parallel == "fsdp":
            raise FlopwiseError("methods.use 'fp8' is not supported with --parallel fsdp (torchao's float8 under "
                                "FSDP2 has not been tested in flopwise): use --parallel ddp, or drop fp8")
        if world.device is not None:
            refuse_without_fp8(world.device)
        torchao_float8()  # a missing torchao is refused before any data is read

    @classmethod
    def memory(cls, config: FP8Config, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.fp8_block_matmuls = True

    def configure(self, model: nn.Module) -> None:
        float8 = torchao_float8()
        names = {name for name, _, _, linear in block_linears(model) if fits_fp8(linear)}
        float8.convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn in names,
                                          config=float8.Float8LinearConfig.from_recipe_name(self.config.recipe))
