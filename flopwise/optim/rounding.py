"""Updating weights stored in bf16 without losing small updates (Zamirai et al. 2020, "Revisiting
BFloat16 Training"; Gupta et al. 2015, "Deep Learning with Limited Numerical Precision").

bf16 keeps 8 bits of mantissa: adding an update smaller than half a unit in the last place (about
0.4% of the weight) rounds back to the same weight, so late in a run, at a small learning rate,
round-to-nearest stops learning.  Two remedies, both applied to an fp32 working copy of the weight
that the update rule changes:

- ``stochastic``: round up or down at random, with the probability that makes the rounding
  unbiased, so small updates land on average.  Costs nothing to store.
- ``kahan``: keep what rounding lost in a bf16 compensation buffer and add it back before the next
  update (Kahan summation); weight plus compensation hold about 16 bits of mantissa.  Costs 2 bytes
  per weight.
- ``nearest``: plain round-to-nearest, the uncompensated baseline.

The random draws of stochastic rounding are seeded by the run's seed, the parameter's index and its
update count, so a resumed run rounds as the uninterrupted one did.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

ROUNDINGS = ("stochastic", "kahan", "nearest")
_LOW_HALF = 1 << 16
_HIGH_HALF_MASK = -_LOW_HALF  # 0xFFFF0000 as an int32: the bits a bf16 keeps of an fp32


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 up or down at random, up with the probability of how far ``x`` is
    from the lower neighbour: adding a uniform 16-bit number to the bits that bf16 drops, then
    dropping them, carries into the kept bits exactly that often (for either sign: floats are sign and
    magnitude)."""
    noise = torch.randint(0, _LOW_HALF, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    bits = (x.contiguous().view(torch.int32) + noise) & _HIGH_HALF_MASK
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


def update_rounded(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                   rule: Callable[[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]], None],
                   seed: int) -> None:
    """Apply the update ``rule`` to a bf16 ``param`` through an fp32 working copy (with fp32 gradients, so
    the optimizer states stay fp32 or 8-bit as configured), then store it back rounded as ``group['rounding']``
    says.  ``seed``: this parameter's own (the run's seed and its index), for stochastic rounding."""
    rounding = group["rounding"]
    work = param.float()
    if rounding == "kahan" and "compensation" in state:
        work += state["compensation"]
    rule(work, grad.float(), state, group)
    if rounding == "stochastic":
        updates = state.get("rounding_updates", 0)  # a plain int: no device sync to read it
        draw = hash((seed, updates)) & (2**63 - 1)  # ints hash the same in every process
        generator = torch.Generator(device=param.device).manual_seed(draw)
        state["rounding_updates"] = updates + 1
        param.copy_(stochastic_round_bf16(work, generator))
        return
    param.copy_(work)
    if rounding == "kahan":
        state["compensation"] = (work - param.float()).to(torch.bfloat16)
