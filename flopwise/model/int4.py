"""Symmetric group-wise int4 weights: round-to-nearest for export and evaluation, and its straight-through
fake quantization for quantization-aware training.

A weight [out, in] is cut into groups of ``group`` consecutive input columns of a row (llama.cpp's Q4_0
uses groups of 32 too); each group has one scale, ``max |w| / 7.5``, and its values become
integers in [-8, 7], ``clamp(round(w / scale), -8, 7)``, read back as ``q * scale``.  That is torchao's
symmetric int4 (torchao/quantization/quant_primitives.py, ``choose_qparams_affine`` with
``MappingType.SYMMETRIC``, quant_min -8, quant_max 7, as ``get_group_qparams_symmetric`` in
torchao/quantization/utils.py calls it): the scale ``max(-min, max) / ((quant_max - quant_min) / 2)``,
clamped below by the smallest normal number of the weight's dtype (so an all-zero group gives zeros, not
0 / 0), zero point 0, ``round(w * (1 / scale))`` with round-half-to-even.  The positive end of a group
rounds 7.5 to 8 and is clamped to 7, so every element is off by at most half a step.  Computed in fp32:
for fp32 weights the result is torchao's bit for bit (torchao computes in the weight's own dtype).
"""

from __future__ import annotations

import math

import torch

from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig

QUANT_MIN, QUANT_MAX = -8, 7
DEFAULT_GROUP = 32  # input columns per scale, as llama.cpp's Q4_0


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``weight`` [out, in] rounded to int4 and read back (quantize, then dequantize), in its own dtype.
    No gradient flows through it: training uses ``straight_through``."""
    if weight.dim() != 2 or group < 1 or weight.shape[1] % group:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} cannot be cut into groups of {group} columns")
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group, group)
    scale = groups.abs().amax(dim=-1, keepdim=True) / ((QUANT_MAX - QUANT_MIN) / 2)
    scale = scale.clamp(min=torch.finfo(weight.dtype).smallest_normal)
    levels = torch.round(groups * (1.0 / scale)).clamp(QUANT_MIN, QUANT_MAX)
    return (levels * scale).reshape(rows, columns).to(weight.dtype)


def straight_through(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The fake-quantized weight in the forward, the identity in the backward (the straight-through
    estimator, Bengio et al. 2013): the gradient at the int4 weight updates the full-precision one."""
    return weight + (fake_quantize(weight, group) - weight).detach()


def check_group(model: ModelConfig, group: int, setting: str) -> None:
    """Refuse, in one line naming ``setting``, a group that does not divide every block Linear's input width."""
    widths = {"d_model": model.d_model, "MLP hidden": model.hidden, "attention": model.attn_dim}
    if all(width % group == 0 for width in widths.values()):
        return
    common = math.gcd(*widths.values())
    fits = max(k for k in range(1, min(group, common) + 1) if common % k == 0)
    shown = ", ".join(f"{name} {width}" for name, width in widths.items())
    raise FlopwiseError(f"{setting} does not divide the block Linears' input widths ({shown}): choose a group "
                        f"that divides {common}, e.g. {fits}")
