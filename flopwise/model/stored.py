"""Integer-stored weights of an exported model: int8 (one scale per row) and int4 (one scale per group of input
columns, two values packed in a byte), dequantized when the model runs.

Symmetric round-to-nearest as torchao's ``choose_qparams_affine`` with ``MappingType.SYMMETRIC`` computes it
(torchao/quantization/quant_primitives.py): the scale ``max |w| / ((quant_max - quant_min) / 2)``, levels
``clamp(round(w / scale), quant_min, quant_max)``; int4 is flopwise/model/int4.py's ``fake_quantize`` bit for
bit.  A size-capped run's export (flopwise/size.py) writes these tensors to safetensors and flopwise's remote code
(modeling_flopwise.py) swaps each block Linear for a ``StoredLinear`` holding them, so the folder loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and computes with the stored weights.

Imports only torch: the export copies this file into the model folder, where flopwise is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

RANGES = {"int8": (-128, 127), "int4": (-8, 7)}


def scale_group(precision: str, in_features: int, group: int) -> int:
    """Input columns per scale: the whole row for int8 (per-row), ``group`` for int4."""
    return in_features if precision == "int8" else group


@torch.no_grad()
def quantize(weight: torch.Tensor, precision: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] as (stored levels, fp32 scales [out, in / columns]): int8 levels as int8 [out, in];
    int4 levels offset to 0..15 and packed low nibble first into uint8 [out, in / 2]."""
    low, high = RANGES[precision]
    rows, columns = weight.shape
    per_scale = scale_group(precision, columns, group)
    groups = weight.float().reshape(rows, columns // per_scale, per_scale)
    scale = (groups.abs().amax(dim=-1, keepdim=True) / ((high - low) / 2)).clamp(
        min=torch.finfo(torch.float32).smallest_normal)
    levels = torch.round(groups * (1.0 / scale)).clamp(low, high).reshape(rows, columns).to(torch.int8)
    if precision == "int4":
        nibbles = (levels + 8).to(torch.uint8)
        levels = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return levels.contiguous(), scale.squeeze(-1).contiguous()


def dequantize(levels: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """The fp32 weight [out, in] that ``quantize``'s (levels, scale) stand for."""
    if precision == "int4":
        values = torch.stack([levels & 0xF, levels >> 4], dim=-1).reshape(levels.shape[0], -1)
        levels = values.to(torch.int8) - 8
    rows, columns = levels.shape
    groups = levels.float().reshape(rows, scale.shape[1], columns // scale.shape[1])
    return (groups * scale.unsqueeze(-1)).reshape(rows, columns)


class StoredLinear(nn.Module):
    """A bias-free Linear whose weight is held as integer levels and scales (buffers named ``weight`` and
    ``weight_scale``, as the exported file names them) and dequantized at each call."""

    def __init__(self, in_features: int, out_features: int, precision: str, group: int) -> None:
        super().__init__()
        self.precision = precision
        packed = in_features // 2 if precision == "int4" else in_features
        dtype = torch.uint8 if precision == "int4" else torch.int8
        self.register_buffer("weight", torch.zeros(out_features, packed, dtype=dtype))
        scales = in_features // scale_group(precision, in_features, group)
        self.register_buffer("weight_scale", torch.ones(out_features, scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight, self.weight_scale.float(), self.precision)
        return nn.functional.linear(x, weight.to(x.dtype))


def stored_linears(decoder: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, Linear) for every bias-free ``nn.Linear`` inside ``decoder.layers`` (the
    attention and MLP projections): the weights an int artifact stores as integers; all else is kept in bf16."""
    for name, parent in list(decoder.layers.named_modules(prefix="layers")):
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                yield f"{name}.{attr}", parent, attr, child


def store_block_linears(decoder: nn.Module, precision: str, group: int) -> None:
    """Swap each of ``stored_linears`` for an empty ``StoredLinear`` that the stored weights then fill."""
    for _, parent, attr, linear in stored_linears(decoder):
        setattr(parent, attr, StoredLinear(linear.in_features, linear.out_features, precision, group))


def dequantize_stored(tensors: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """An int artifact's tensors with each stored weight (``X.weight`` beside ``X.weight_scale``) read back in
    fp32 under its own name: the state dict of the plain model the folder computes."""
    plain = dict(tensors)
    for name in [key for key in tensors if key.endswith(".weight_scale")]:
        weight = name.removesuffix("_scale")
        plain[weight] = dequantize(plain[weight], plain.pop(name).float(), precision)
    return plain
