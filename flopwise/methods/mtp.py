"""Multi-token prediction as an auxiliary loss, in the form of modded-nanogpt's 2025-12-22 MultiTokenPrediction
record (records/track_1_short/2025-12-22_MultiTokenPrediction, 80 fewer steps to the target loss): the logits at
position t are scored not only against token t+1 but also against tokens t+2 .. t+1+k, with smaller weights, and
with no parameter added: the same head, the same logits.  That is the cheapest faithful form (Gloeckle et al.
2024 and DeepSeek-V3 add a head or a block per extra token); its cost is a log-sum-exp and a gather per extra
target, no matmul, so the FLOP count does not change.

The run turns it on with ``model.mtp_tokens`` = k (and ``model.mtp_weight`` = w, 0.5 in the record): the
resolve stage adds this method to a pretraining run whose model asks for it.  The weight of extra target j is
w^j, and it fades over the budget as the record's does: the budget is cut into k + 1 equal phases; in each the
farthest target still in use fades linearly to 0 and is then dropped, and the last phase trains on the next
token alone.  For k = 2, w = 0.5 that is the record's [1, 0.5, 0.25 -> 0] -> [1, 0.5 -> 0] -> [1].  The weights
are a function of budget progress p alone, so a resumed run repeats the uninterrupted one exactly.

Each extra term is, like the record's, the cross-entropy summed over the positions that have such a target,
divided by the window length.  The logged training loss and the held-out loss stay the plain next-token loss.
Targets are not masked at document boundaries (the record does not either); the plain next-token target at a
document's last token crosses it too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from flopwise.data.config import DataSection
from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunView, StepOutputs, World


def mtp_weights(tokens: int, weight: float, p: float) -> list[float]:
    """The weights of extra targets 1, 2, ... at budget progress ``p`` (those dropped by then left out):
    ``weight`` ** j, the farthest one kept fading linearly to 0 over its phase, one of ``tokens`` + 1."""
    phases = tokens + 1
    phase = min(int(p * phases), tokens)
    kept = tokens - phase
    weights = [weight ** j for j in range(1, kept + 1)]
    if weights:
        weights[-1] *= 1 - (p * phases - phase)
    return weights


def mtp_loss(logits: torch.Tensor, targets: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Per sequence [B]: sum over extra targets j of weights[j-1] x the cross-entropy of logits [B, T, V] at
    positions t < T - j against targets[t + j] (the token j + 1 ahead of the input at t), summed over those
    positions and divided by T, in fp32."""
    logits = logits.float()
    length = logits.shape[1]
    log_normalizer = torch.logsumexp(logits, dim=-1)
    total = torch.zeros(logits.shape[0], device=logits.device)
    for ahead, weight in enumerate(weights, start=1):
        picked = logits[:, :-ahead].gather(-1, targets[:, ahead:, None]).squeeze(-1)
        total = total + weight * (log_normalizer[:, :-ahead] - picked).sum(dim=1) / length
    return total


class MultiTokenPrediction(Method):
    """Adds ``mtp_loss`` with the budget's ``mtp_weights`` to each sequence's loss; settings from the model."""

    name: ClassVar[str] = "mtp"
    stages = PRETRAIN
    survives_extension = False  # its weights fade over the original budget's share

    def __init__(self, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.tokens, self.weight = 0, 0.0

    @classmethod
    def implied(cls, config: MethodConfig, data: DataSection, run: RunView) -> bool:
        """A pretraining run whose model sets mtp_tokens."""
        return run.stage in PRETRAIN and run.model.mtp_tokens > 0

    @classmethod
    def check(cls, config: MethodConfig, run: RunView, world: World | None) -> None:
        if not run.model.mtp_tokens:
            raise FlopwiseError("methods.use 'mtp' needs model.mtp_tokens >= 1, the number of extra tokens to "
                                "predict: set it (the method then comes with it), or drop 'mtp'")

    def configure(self, model: nn.Module) -> None:
        self.tokens, self.weight = model.config.mtp_tokens, model.config.mtp_weight

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        weights = mtp_weights(self.tokens, self.weight, p)
        if not weights:
            return total
        targets = outputs.batch.targets.to(outputs.logits.device)
        return total + mtp_loss(outputs.logits, targets, weights)
