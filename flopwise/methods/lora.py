"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied as Hugging
Face PEFT does, for fine-tuning an imported model: each adapted Linear computes
x W^T + b + (alpha / r) x A^T B^T with W and b frozen, A Kaiming-uniform (a=sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in))) and B zero, so training starts from the imported model exactly; every
parameter that is not an adapter is frozen (PEFT's ``bias="none"``, no ``modules_to_save``); no
dropout (PEFT's default 0).  Here every block Linear is adapted (attention and MLP, as QLoRA does);
PEFT's default for Llama would adapt q_proj and v_proj only.  ``dense_state_dict`` in
flopwise/methods/dense.py merges the adapters into plain weights (W + (alpha / r) B A).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunView, World
from flopwise.methods.dense import replace_block_linears
from flopwise.model.config import ModelConfig
from flopwise.section import in_range


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update.

    Parameters: ``weight`` [out, in] and ``bias`` [out] (when present) are the Linear's own tensors,
    frozen, under the same names, so the base loads from a plain state dict; ``lora_A`` [rank, in]
    and ``lora_B`` [out, rank] train (names not ending in ".weight", so optimizers treat them as
    adapters, not as the model's matrices).  All in the Linear's dtype and device."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.requires_grad_(False)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        bound = 1 / math.sqrt(self.in_features)
        lora_a = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(lora_a.to(**like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The merged weight W + (alpha / r) B A, which gives the same outputs as the adapted layer."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}")


class LoRAConfig(MethodConfig):
    """``rank`` r of the adapters and their ``alpha`` (scaling alpha / r): PEFT's defaults 8 and 16."""

    rank: int = 8
    alpha: float = 16.0

    _rank = in_range("rank", low=1)
    _alpha = in_range("alpha", low=0, above=True)


class LoRA(Method):
    """Freeze the whole model, then adapt every block Linear with a ``LoRALinear``.  ``seed`` fixes
    the A matrices' draw."""

    name: ClassVar[str] = "lora"
    Config = LoRAConfig
    saves_memory = True
    trains_embedding = False  # everything but the adapters is frozen
    legacy_keys = {"memory.lora_rank": "rank", "memory.lora_alpha": "alpha"}
    conflicts = {"galore": "LoRA freezes the dense matrices whose gradients GaLore would project"}

    def __init__(self, config: LoRAConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.rank, self.alpha = config.rank, config.alpha

    @classmethod
    def check(cls, config: LoRAConfig, run: RunView, world: World | None) -> None:
        if world is not None and not run.imported:  # a run about to train (estimates may ask anyway)
            raise FlopwiseError("methods.use 'lora' fine-tunes an imported model through adapters on frozen "
                                "weights, and random frozen weights learn nothing: add --init-from MODEL, or "
                                "drop lora")
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: LoRAConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.adapter_rank = config.rank

    def configure(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.seed)
        replace_block_linears(model, lambda linear: LoRALinear(linear, self.rank, self.alpha, generator))
