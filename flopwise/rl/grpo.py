"""The GRPO objective: group-relative advantages and the clipped surrogate loss over completion tokens.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, section 4.1) drops PPO's value model: each
prompt's G completions are scored by a verifiable reward, and a completion's advantage is its reward relative to
its group's.  Every token of a completion carries that advantage in PPO's clipped surrogate (Schulman et al.
2017).  The loss is normalised per token over the whole batch, so a long completion weighs by its length rather
than being averaged down to one completion's share (Yu et al. 2025, DAPO, "token-level policy gradient loss").
The optional KL penalty towards a frozen reference uses the k3 estimator exp(r) - r - 1 with r = log ref - log pi
(Schulman 2020, "Approximating KL divergence"), unbiased and never negative, as DeepSeekMath does.
"""

from __future__ import annotations

import torch

# Added to a group's std before dividing (Hugging Face TRL's, trl/trainer/grpo_trainer.py): a group whose rewards
# barely differ gets large but finite advantages.
STD_EPSILON = 1e-4


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """Advantages [P, G] of rewards [P, G] (P prompts, G completions each): each reward minus its group's mean,
    and with ``scale`` divided by the group's std + 1e-4.

    The std is the population one (divide by G; TRL takes the sample one): the scaled advantages of a group then
    have unit mean square whatever G is, and a group of one has std 0 rather than an undefined sample std.  A
    group whose rewards are all equal teaches nothing, so it gets exact zeros (its mean's rounding would
    otherwise leave ~1e-8 residues, which the scaling blows up to ~1e-4)."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + STD_EPSILON)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return centered.masked_fill(all_equal, 0.0)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              tokens: float, clip: float = 0.2, ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """(the loss, its stats) of completions' token log-probabilities ``logp`` [N, T] under the policy being
    trained, ``old_logp`` [N, T] under the policy that sampled them and ``ref_logp`` [N, T] under the frozen
    reference (both detached), one advantage per completion [N], and ``mask`` [N, T] true on completion tokens.

    Per token: -min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A) with ratio = exp(logp - old_logp), plus
    kl_beta * k3 when ``ref_logp`` is given and kl_beta > 0.  The loss sums the masked tokens' and divides by
    ``tokens``, the caller's count (the mean over data-parallel ranks of their completion tokens, as
    SFTObjective does, so every token of the global batch weighs the same).  On-policy (old_logp =
    logp.detach(), one update per batch of rollouts) the ratio is 1 and each token's gradient is -A / tokens.

    Stats, over masked tokens: ``clip_fraction`` (the share where the clipped term is the one taken and is
    flat, so the token gives no policy gradient), ``kl`` (mean k3; 0 without a reference) and ``ratio``
    (mean).  Unmasked positions (prompt, padding) take no part, whatever their log-probabilities hold."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive (the batch's completion tokens), got {tokens}")
    advantage = advantages.to(logp.dtype).unsqueeze(1)
    # Unmasked positions get a log-ratio of 0, so padding's arbitrary values can neither overflow exp nor
    # leak NaN into the gradient.
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = log_ratio.exp()
    bounded = ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = -torch.minimum(ratio * advantage, bounded * advantage)
    count = max(int(mask.sum()), 1)  # no masked token: every stat is 0
    mean_kl = 0.0
    if ref_logp is not None:
        log_ref_ratio = torch.where(mask, ref_logp - logp, 0.0)
        kl = log_ref_ratio.exp() - log_ref_ratio - 1.0
        mean_kl = float(kl.detach()[mask].sum()) / count  # reported also when not penalised (kl_beta 0)
        if kl_beta > 0:
            per_token = per_token + kl_beta * kl
    loss = torch.where(mask, per_token, 0.0).sum() / tokens
    clipped = ((advantage > 0) & (ratio > 1.0 + clip)) | ((advantage < 0) & (ratio < 1.0 - clip))
    stats = {"clip_fraction": float((clipped & mask).sum()) / count, "kl": mean_kl,
             "ratio": float(ratio.detach()[mask].sum()) / count}
    return loss, stats
