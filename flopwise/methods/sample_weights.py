"""Loss-based sample reweighting and curriculum pacing: two ways of choosing which training windows
count most.

Part A: instance-level reweighting of Sow, Woisetschläger, Bulusu, Wang, Jacobsen & Liang (ICLR
2025), "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining"; its
reference code is ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``, ``src/trainer.py``
(``h_func``, ``f_func_*``, ``g_func`` and the sample-reweighting branch of ``training_step``).
Each step, with the per-sequence losses ``l`` of the whole (global) batch of ``N`` sequences:

1. normalize to ``[-delta, delta]`` with the batch's extremes (min and max over all ranks):
   ``x = delta * (2 l - l_max - l_min) / max(l_max - l_min, 1e-6)``  (all-equal losses give 0);
2. score with the strategy ``f``:

   - ``linupper``:  ``f(x) = min(x + delta, delta)``: rises with the loss over the lower half of the
     batch and is flat over the upper half, so the lowest-loss (redundant) sequences are
     down-weighted without over-weighting the highest-loss (possibly noisy) ones; the paper's
     recommended strategy;
   - ``quadratic``: ``f(x) = 1 - x**2 / delta**2``: favours medium losses, down-weights both ends
     (the reference code calls it ``mid``);
   - ``extremes``:  ``f(x) = |x|``: favours both the lowest and the highest losses over the middle;
   - ``uniform``:   every sequence weighs 1 (plain averaging; the baseline);

3. weigh with a softmax at temperature ``r``: ``w_i = N * exp(f_i / r) / sum_j exp(f_j / r)``, so the
   weights average 1 over the global batch (the reference code multiplies its softmax by
   ``world_size * per-device batch``, i.e. by ``N``); larger ``r`` is closer to uniform.

The weights are constants (no gradient flows through them) that multiply the per-sequence losses:
``loss = mean(w * l)``.  The reference code also scales each sequence by its share of the batch's
target tokens; flopwise's training windows all have the same length, where that share is 1/N.

Defaults are the reference code's: ``delta = 1`` (hard-coded there), ``r = 0.4`` (``kl_reg`` in its
configs for the GPT-2 runs, e.g. ``config/methods/ours_doge_large.json``; the dataclass default
there is 1.0) and uniform weights for the first 1000 steps (``burnout_steps``); flopwise's method
(flopwise/methods/reweight.py) keeps them uniform for the first ``burn_in`` share of the budget instead.

Across ranks, the min, the max, the largest score (subtracted before ``exp`` for stability), the
sum of exponentials and the sample count are all-reduced, so each rank's weights are exactly the
slice that one process would compute for the concatenated batch.

Part B: curriculum pacing (Hacohen & Weinshall 2019; Wu, Dyer & Neyshabur 2021, "When do curricula
work?", whose code is ``google-research/understanding-curricula``, ``utils/utils.py``
``get_pacing_function``).  ``g(p)`` is the fraction of the difficulty-sorted windows (easiest
first) that may be sampled at budget progress ``p``: ``g(0) = start`` (their ``b``) and ``g = 1``
from ``p = full_at`` (their ``a``) on.  ``linear`` and ``root`` are theirs,
``b + (1 - b) * (p / a)`` and ``b + (1 - b) * sqrt(p / a)``; their ``step`` is a single jump to the
full set at ``a``, whereas ``step`` here climbs in 3 equal stairs (heights ``(1 - b) / 3``, widths
``a / 3``) before reaching 1 at ``a``, in the spirit of Hacohen & Weinshall's staircase pacing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from flopwise.errors import FlopwiseError
from flopwise.runtime import Ranks

if TYPE_CHECKING:
    from flopwise.methods.reweight import ReweightConfig

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")
PACINGS = ("linear", "root", "step")

_MIN_RANGE = 1e-6  # the reference code's floor on l_max - l_min
_STEP_STAIRS = 3


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_strategy(strategy: object) -> None:
    if strategy not in STRATEGIES:
        raise FlopwiseError(f"methods.reweight.strategy={strategy!r} is not a reweighting strategy: use one of "
                            f"{', '.join(STRATEGIES)}")


def _check_delta(delta: object) -> None:
    if not _is_number(delta) or delta <= 0:
        raise FlopwiseError(f"methods.reweight.delta={delta!r} must be a positive number (the half-width of the "
                            f"range losses are normalized to): the paper uses 1.0")


def _local_losses(losses: torch.Tensor) -> torch.Tensor:
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of per-sequence losses, got shape {tuple(losses.shape)}")
    return losses.detach().to(torch.promote_types(losses.dtype, torch.float32))


def normalized_losses(losses: torch.Tensor, delta: float, ranks: Ranks = Ranks()) -> torch.Tensor:
    """Per-sequence losses ``[B]`` mapped linearly onto ``[-delta, delta]`` by the min and max over the
    global batch (all ranks); all-equal losses map to zeros.  Detached, float32 or wider."""
    _check_delta(delta)
    local = _local_losses(losses)
    high, neg_low = ranks.max(local.max().item(), -local.min().item())
    low = -neg_low
    spread = high - low
    if spread <= 0:
        return torch.zeros_like(local)
    return (delta * (2 * local - (high + low)) / max(spread, _MIN_RANGE)).clamp_(-delta, delta)


def strategy_scores(normalized: torch.Tensor, strategy: str, delta: float) -> torch.Tensor:
    """The strategy's score ``f(x)`` of each normalized loss ``x`` in ``[-delta, delta]`` (the logits
    of the softmax, before dividing by the temperature); ``uniform`` scores everything 0."""
    _check_strategy(strategy)
    _check_delta(delta)
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1 - normalized**2 / delta**2
    if strategy == "extremes":
        return normalized.abs()
    return torch.zeros_like(normalized)


def sample_weights(losses: torch.Tensor, settings: ReweightConfig, ranks: Ranks = Ranks()) -> torch.Tensor:
    """Weights ``[B]`` for this rank's per-sequence losses, by ``settings``' strategy, temperature and delta:
    detached, positive, averaging 1 over the global batch; ones for ``uniform``.  Every rank must call it at
    every step (it runs collectives)."""
    local = _local_losses(losses)
    if settings.strategy == "uniform":
        return torch.ones_like(local)
    with torch.no_grad():
        scores = strategy_scores(normalized_losses(local, settings.delta, ranks), settings.strategy, settings.delta)
        (top,) = ranks.max(scores.max().item())
        exps = torch.exp((scores - top) / settings.temperature)
        # N / sum(exp) over the global batch; ranks.mean of both is that ratio with world_size cancelled
        total = ranks.mean(exps.sum(dtype=torch.float64).item())
        count = ranks.mean(float(local.numel()))
        return exps * (count / total)


def _check_fraction(value: object, field: str, meaning: str, example: str) -> None:
    if not _is_number(value) or not 0 < value <= 1:
        raise FlopwiseError(f"{field}={value!r} must be in (0, 1]: {meaning}, e.g. {example}")


def pacing_fraction(p: float, pacing: str, start: float = 0.1, full_at: float = 0.5) -> float:
    """The fraction, in ``(0, 1]``, of the difficulty-sorted windows (easiest first) that may be
    sampled at budget progress ``p`` (0 at the start, 1 at the end): ``start`` at ``p = 0``, rising
    to 1 at ``p = full_at`` and staying there."""
    if pacing not in PACINGS:
        raise FlopwiseError(f"methods.curriculum.pacing={pacing!r} is not a pacing function: use one of {', '.join(PACINGS)}")
    _check_fraction(start, "methods.curriculum.start", "the fraction of the easiest windows sampled at the start", "0.1")
    _check_fraction(full_at, "methods.curriculum.full_at", "the fraction of the budget after which every window may "
                    "be sampled", "0.5")
    if not (isinstance(p, (int, float)) and p >= 0):
        raise ValueError(f"budget progress must be a number >= 0, got {p!r}")
    if p >= full_at:
        return 1.0
    t = p / full_at
    if pacing == "linear":
        shape = t
    elif pacing == "root":
        shape = math.sqrt(t)
    else:
        shape = math.floor(t * _STEP_STAIRS) / _STEP_STAIRS
    return min(1.0, start + (1 - start) * shape)
