"""Per-sequence loss reweighting: instance-level reweighting of Sow, Woisetschläger, Bulusu, Wang, Jacobsen &
Liang (ICLR 2025), "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining"; its
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
keeps them uniform for the first ``burn_in`` share of the budget instead.

Across ranks, the min, the max, the largest score (subtracted before ``exp`` for stability), the
sum of exponentials and the sample count are all-reduced, so each rank's weights are exactly the
slice that one process would compute for the concatenated batch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunResources, StepOutputs
from flopwise.runtime import Ranks
from flopwise.section import in_range

_MIN_RANGE = 1e-6  # the reference code's floor on l_max - l_min


class ReweightConfig(MethodConfig):
    """``strategy``: linupper (the paper's choice), quadratic, extremes, or uniform (the baseline); softmax
    ``temperature`` r; losses normalized to [-delta, delta] in the global batch; uniform weights while
    p < ``burn_in``."""

    strategy: Literal["linupper", "quadratic", "extremes", "uniform"] = "linupper"
    temperature: float = 0.4
    delta: float = 1.0
    burn_in: float = 0.05

    _positives = in_range("temperature", "delta", low=0, above=True)
    _burn_in = in_range("burn_in", low=0, high=1, below=True)


def _local_losses(losses: torch.Tensor) -> torch.Tensor:
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of per-sequence losses, got shape {tuple(losses.shape)}")
    return losses.detach().to(torch.promote_types(losses.dtype, torch.float32))


def normalized_losses(losses: torch.Tensor, delta: float, ranks: Ranks = Ranks()) -> torch.Tensor:
    """Per-sequence losses ``[B]`` mapped linearly onto ``[-delta, delta]`` by the min and max over the
    global batch (all ranks); all-equal losses map to zeros.  Detached, float32 or wider."""
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
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1 - normalized**2 / delta**2
    if strategy == "extremes":
        return normalized.abs()
    if strategy == "uniform":
        return torch.zeros_like(normalized)
    raise ValueError(f"unknown reweighting strategy {strategy!r}")


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


class SampleReweighting(Method):
    """Each sequence's loss multiplied by its weight, after uniform weights for the first ``burn_in`` share of
    the budget (the paper's first 1000 steps)."""

    name: ClassVar[str] = "reweight"
    Config = ReweightConfig
    stages = PRETRAIN
    legacy_keys = {f"reweight.{key}": key for key in ("strategy", "temperature", "delta", "burn_in")}
    legacy_switch = ("reweight.strategy", "none")

    def setup(self, run: RunResources) -> None:
        self.ranks = run.ranks

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        c = self.config
        if p < c.burn_in:
            return total
        return total * sample_weights(outputs.sequence.detach(), c, self.ranks)
