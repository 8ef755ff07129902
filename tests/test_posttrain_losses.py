"""The post-training losses against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from flopwise.posttrain.losses import dpo_loss, masked_cross_entropy, reply_log_probs


def test_masked_cross_entropy_counts_only_assistant_tokens():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                row = logits[b, t]
                expected.append(-(row[targets[b, t]] - math.log(row.exp().sum())))
    assert masked_cross_entropy(logits, targets, mask).item() == pytest.approx(float(sum(expected)) / 6, rel=1e-5)
    changed = logits.clone()
    changed[0, 0] += 5.0  # a prompt position: no effect
    assert masked_cross_entropy(changed, targets, mask) == masked_cross_entropy(logits, targets, mask)


def test_reply_log_probs_sum_the_masked_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    targets = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[False, True, True]])
    assert reply_log_probs(logits, targets, mask).item() == pytest.approx(math.log(0.75) + math.log(0.1), rel=1e-5)


def test_dpo_loss_rewards_margin_and_accuracy():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    reference_chosen, reference_rejected = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    outcome = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)
    # pair 0: chosen reward 0.05, rejected -0.05; pair 1: -0.05 and +0.05
    assert outcome.chosen_reward.tolist() == pytest.approx([0.05, -0.05])
    assert outcome.rejected_reward.tolist() == pytest.approx([-0.05, 0.05])
    expected = (-math.log(1 / (1 + math.exp(-0.1))) - math.log(1 / (1 + math.exp(0.1)))) / 2
    assert outcome.loss.item() == pytest.approx(expected, rel=1e-6)
    assert outcome.accuracy.item() == 0.5 and outcome.margin.tolist() == pytest.approx([0.1, -0.1])
    # at the reference the loss is log 2
    same = dpo_loss(reference_chosen, reference_rejected, reference_chosen, reference_rejected, beta=0.5)
    assert same.loss.item() == pytest.approx(math.log(2))
