"""Blockwise 8-bit optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"; Li et al. 2023, "Memory Efficient Optimizers with 4-bit States").

A state tensor is cut into blocks of ``block`` consecutive elements (in row-major order); each
block stores one fp32 scale, its largest magnitude (absmax), and one byte per element.  Blocks
keep an outlier from costing precision anywhere but in its own block.

The code map is logarithmic rather than linear or Dettmers' dynamic-tree map: byte ``k`` in
1..K stands for ``absmax * 2 ** (-octaves * (K - k) / (K - 1))`` and 0 for exactly zero.  Adam
divides each element by its own sqrt(second moment), so what matters is every element's
*relative* error, and a geometric ladder makes that the same at every magnitude: rounding to the
nearest rung (in log space) errs by at most 2 ** (octaves / (2 * (K - 1))) - 1 = 3.4% for both
maps below, where a linear map errs by 40% at a hundredth of the absmax.  The first moment is
signed (int8: sign and K = 127 rungs over 12 octaves, down to 2.4e-4 of the absmax, below which
it rounds to the nearer of 0 and the lowest rung); the second moment is non-negative (uint8: K =
255 rungs over 24 octaves, so its square root spans the same 12 octaves).  A positive second
moment never decodes to 0, even below the lowest rung: it is clamped up to it.  This is Li et
al.'s zero-point problem, where a zero denominator turns a tiny first moment into a huge update;
rounding up only shrinks that element's step.  The block's largest element decodes exactly.
The range is a trade against precision: on a tiny GPT, 8-bit AdamW ended closest to 32-bit with
12 octaves (tried 8 to 24).

Large tensors are encoded and decoded a chunk of blocks at a time (``CHUNK`` elements), so the
working memory of the conversion stays a few dozen MB however large the tensor (an embedding
matrix of a 7B model has 131M elements); chunks hold whole blocks, so the codes are the same.

Rounding is deterministic (to the nearest rung), as in Dettmers et al.; since every code is
relative to its block's absmax, which is exact, a block whose elements all decay together (an
EMA with no new gradient) decays with its absmax rather than sticking at a rung.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch
import torch.nn.functional as F

SIGNED_RUNGS, SIGNED_OCTAVES = 127, 12.0
UNSIGNED_RUNGS, UNSIGNED_OCTAVES = 255, 24.0
CODE_DTYPES = {True: torch.int8, False: torch.uint8}
CHUNK = 1 << 20  # elements encoded or decoded at once


def _ladder(signed: bool) -> tuple[int, float]:
    return (SIGNED_RUNGS, SIGNED_OCTAVES) if signed else (UNSIGNED_RUNGS, UNSIGNED_OCTAVES)


@functools.lru_cache(maxsize=None)
def code_table(signed: bool, device: torch.device) -> torch.Tensor:
    """Value of every byte as a fraction of the absmax, indexed by ``code + 128`` (signed) or
    ``code`` (unsigned).  The unused int8 code -128 is given -1 so the table stays monotone."""
    rungs, octaves = _ladder(signed)
    codes = torch.arange(-128, 128) if signed else torch.arange(256)
    magnitude = codes.abs().clamp(max=rungs).double()
    values = torch.exp2(-octaves * (rungs - magnitude) / (rungs - 1)) * codes.sign()
    return values.float().to(device)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1)
    return F.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)


def _chunks(numel: int, block: int) -> Iterator[tuple[slice, slice]]:
    """Chunks of whole blocks, about ``CHUNK`` elements each: (slice of the flat tensor, slice of its absmax)."""
    blocks = max(1, CHUNK // block)
    for first in range(0, -(-numel // block), blocks):
        yield slice(first * block, (first + blocks) * block), slice(first, first + blocks)


def quantize(x: torch.Tensor, block: int = 256, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes shaped like ``x`` (int8 when signed, uint8 otherwise) and one fp32 absmax per block
    (ceil(numel / block) of them)."""
    flat = x.detach().reshape(-1)
    codes = torch.empty(flat.numel(), dtype=CODE_DTYPES[signed], device=x.device)
    absmax = torch.empty(-(-flat.numel() // block), dtype=torch.float32, device=x.device)
    for elements, blocks in _chunks(flat.numel(), block):
        codes[elements], absmax[blocks] = _quantize_part(flat[elements], block, signed)
    return codes.view(x.shape), absmax


def _quantize_part(x: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(x.float(), block)
    absmax = blocks.abs().amax(dim=1)
    ratio = blocks.abs() / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    rungs, octaves = _ladder(signed)
    rung = torch.round(rungs + (rungs - 1) / octaves * torch.log2(ratio))  # -inf where ratio is 0
    lowest = 2.0 ** -octaves
    floor = ratio >= lowest / 2 if signed else ratio > 0  # second moments > 0 never round to 0
    rung = torch.where(rung >= 1, rung, floor.float())
    codes = rung * blocks.sign() if signed else rung
    return codes.view(-1)[: x.numel()].to(CODE_DTYPES[signed]), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int = 256, signed: bool = True) -> torch.Tensor:
    """The fp32 tensor (shaped like ``codes``) that ``quantize`` encoded."""
    flat, table = codes.reshape(-1), code_table(signed, codes.device)
    out = torch.empty(flat.numel(), dtype=torch.float32, device=codes.device)
    for elements, blocks in _chunks(flat.numel(), block):
        part = flat[elements]
        values = _blocks(table[part.long() + (128 if signed else 0)], block) * absmax[blocks].float().unsqueeze(1)
        out[elements] = values.view(-1)[: part.numel()]
    return out.view(codes.shape)


def read_moment(state: dict[str, Any], key: str, like: torch.Tensor, bits: int, block: int,
                signed: bool) -> torch.Tensor:
    """Moment ``key`` as a tensor to update in place: the stored one itself with 32-bit states
    (zeros like ``like`` on first use), a decoded copy with 8-bit ones (``key_q``, ``key_absmax``)."""
    if bits == 32:
        if key not in state:
            state[key] = torch.zeros_like(like)
        return state[key]
    if f"{key}_q" not in state:
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return dequantize(state[f"{key}_q"], state[f"{key}_absmax"], block, signed).to(like.dtype)


def write_moment(state: dict[str, Any], key: str, value: torch.Tensor, bits: int, block: int, signed: bool) -> None:
    """Store the updated moment (a no-op with 32-bit states, which ``read_moment`` gave out in place)."""
    if bits == 32:
        state[key] = value
    else:
        state[f"{key}_q"], state[f"{key}_absmax"] = quantize(value, block, signed)
