"""The post-training losses: cross-entropy on assistant tokens only (SFT), and direct preference optimization
(Rafailov et al. 2023) against a frozen reference model.

DPO's loss for a pair is -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))),
the log-probabilities summed over the reply's tokens; beta * (log pi - log ref) is a reply's implicit reward,
so the reward margin and the preference accuracy (the chosen reply's reward above the rejected one's) are
read from the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each position [B, T], from fp32 logits."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each position [B, T], from fp32 logits."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean of per-position ``losses`` [B, T] over the positions where ``mask`` is true (the assistant's tokens).
    ``tokens``: divide by this count instead of the mask's (all ranks' assistant tokens, so that every token
    weighs the same whichever rank holds it)."""
    weights = mask.float()
    return (losses * weights).sum() / (weights.sum().clamp_min(1.0) if tokens is None else max(tokens, 1.0))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         tokens: float | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions where ``mask`` is true (the assistant's tokens), so a batch's
    prompts, system messages and padding teach nothing (``tokens`` as in ``masked_mean``)."""
    return masked_mean(token_cross_entropy(logits, targets), mask, tokens)


def reply_log_probs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log P(reply) of each row [B]: the masked positions' log-probabilities summed."""
    return (token_log_probs(logits, targets) * mask.float()).sum(dim=-1)


@dataclass(frozen=True)
class PreferenceOutcome:
    """DPO's loss (mean over pairs) and, per pair, the implicit rewards of the two replies."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of pairs whose chosen reply has the higher reward."""
        return (self.margin > 0).float().mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> PreferenceOutcome:
    """DPO from the summed reply log-probabilities [B] under the policy and the frozen reference."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return PreferenceOutcome(loss, chosen.detach(), rejected.detach())
