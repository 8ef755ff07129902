"""GRPO's rollouts and loss (flopwise/rl/rollout.py, flopwise/rl/grpo.py): the loss and its gradient against a
computation written out with plain floats, the group advantages, batched sampling against an independent greedy
loop and against GPT.stream, and the rollouts' FLOPs against a count from the model's own weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flopwise.model.config import ModelConfig
from flopwise.model.flops import forward_flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.losses import token_log_probs
from flopwise.rl.grpo import group_advantages, grpo_loss
from flopwise.rl.rollout import generation_flops, sample_group

PROMPT = [1, 2, 3]


def tiny_model(seq_len: int = 32) -> GPT:
    """An untrained model whose large init (std 0.5) makes its greedy continuation vary instead of repeating one
    token, so that an end token can be met mid-completion."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=seq_len, init_std=0.5)
    return GPT(cfg).eval()


# ---- the loss, written out with floats -------------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.5, 0.0], [0.2, 0.9, 0.9, 0.4]]  # 2 prompts x 4 completions
# Per-token log-probabilities of the 8 completions (3 positions each), under the policy, the sampling policy and
# the reference; the mask cuts some completions short.  Ratios exp(logp - old) reach 1.35 and 0.74: with clip
# 0.2 several tokens fall outside [0.8, 1.2], on both sides, for positive and negative advantages.
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7], [-2.2, -0.1, -0.9], [-0.6, -0.6, -1.5],
        [-1.1, -0.4, -0.8], [-0.2, -1.9, -3.0], [-0.9, -0.7, -0.3], [-1.4, -0.2, -0.5]]
OLD = [[-1.3, -0.5, -1.9], [-0.1, -1.2, -0.4], [-2.0, -0.4, -0.9], [-0.8, -0.3, -1.5],
       [-1.0, -0.7, -0.8], [-0.5, -1.8, -2.9], [-0.6, -0.7, -0.6], [-1.2, -0.5, -0.5]]
REF = [[-0.9, -0.8, -2.1], [-0.4, -1.0, -0.6], [-2.5, -0.2, -1.0], [-0.5, -0.9, -1.4],
       [-1.3, -0.3, -0.7], [-0.1, -2.0, -3.1], [-1.0, -0.4, -0.2], [-1.5, -0.3, -0.9]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]


def advantages_by_hand(scale: bool) -> list[float]:
    """Each reward minus its group's mean, over the population std + 1e-4 when scaled; flattened to [8]."""
    flat = []
    for group in REWARDS:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        flat += [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]
    return flat


def loss_by_hand(adv: list[float], tokens: float, clip: float, beta: float) -> tuple[float, list[list[float]], float]:
    """(the loss, d loss / d logp per token, the clip fraction) with Python floats, token by token."""
    total, clipped, masked = 0.0, 0, 0
    grad = [[0.0] * 3 for _ in LOGP]
    for i, a in enumerate(adv):
        for t in range(3):
            if not MASK[i][t]:
                continue
            masked += 1
            ratio = math.exp(LOGP[i][t] - OLD[i][t])
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            surrogate = min(ratio * a, bounded * a)
            r = REF[i][t] - LOGP[i][t]
            total += -surrogate + beta * (math.exp(r) - r - 1)
            bound_active = (a > 0 and ratio > 1 + clip) or (a < 0 and ratio < 1 - clip)
            clipped += bound_active
            # d(-ratio * a)/d logp = -ratio * a, unless the flat clipped term is taken; d k3 / d logp = 1 - e^r
            grad[i][t] = ((0.0 if bound_active else -ratio * a) + beta * (1 - math.exp(r))) / tokens
    return total / tokens, grad, clipped / masked


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return as_tensor(LOGP).requires_grad_(), as_tensor(OLD), as_tensor(REF), torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_and_its_gradient_equal_a_token_by_token_computation(scale, beta):
    adv = advantages_by_hand(scale)
    tokens = 19.5  # the caller's count (a mean over ranks), not this batch's 20 masked tokens
    expected_loss, expected_grad, expected_clip = loss_by_hand(adv, tokens, clip=0.2, beta=beta)
    assert 0 < expected_clip < 1  # clipping is active on some tokens, not all
    logp, old, ref, mask = tensors()
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), scale).flatten()
    assert advantages.tolist() == pytest.approx(adv, rel=1e-12)

    loss, stats = grpo_loss(logp, old, advantages, mask, tokens, clip=0.2, ref_logp=ref, kl_beta=beta)
    loss.backward()

    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert logp.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected_grad]
    assert stats["clip_fraction"] == pytest.approx(expected_clip)
    masked = [(i, t) for i in range(8) for t in range(3) if MASK[i][t]]
    ks = [math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1 for i, t in masked]
    ratios = [math.exp(LOGP[i][t] - OLD[i][t]) for i, t in masked]
    assert stats["kl"] == pytest.approx(sum(ks) / len(ks), rel=1e-12)  # reported whether or not it is penalised
    assert stats["ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)


def test_on_policy_the_gradient_is_minus_the_advantage_over_tokens_on_each_completion_token():
    logp, _, _, mask = tensors()
    adv = advantages_by_hand(scale=True)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor(adv, dtype=torch.float64), mask, tokens=20.0)
    loss.backward()
    expected = [[-adv[i] / 20.0 if MASK[i][t] else 0.0 for t in range(3)] for i in range(8)]
    assert logp.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected]
    assert loss.item() == pytest.approx(-sum(adv[i] * sum(MASK[i]) for i in range(8)) / 20.0, rel=1e-12, abs=1e-15)
    assert stats == {"clip_fraction": 0.0, "kl": 0.0, "ratio": 1.0}


def test_positions_outside_the_mask_take_no_part_whatever_they_hold():
    logp, old, ref, mask = tensors()
    adv = torch.tensor(advantages_by_hand(scale=True), dtype=torch.float64)
    clean, _ = grpo_loss(logp, old, adv, mask, 20.0, ref_logp=ref, kl_beta=0.1)
    clean_grad = torch.autograd.grad(clean, logp)[0]
    junk_old, junk_ref = old.clone(), ref.clone()
    junk_old[~mask], junk_ref[~mask] = float("-inf"), 80.0  # padding: exp would overflow or give NaN
    dirty, stats = grpo_loss(logp, junk_old, adv, mask, 20.0, ref_logp=junk_ref, kl_beta=0.1)
    dirty_grad = torch.autograd.grad(dirty, logp)[0]
    assert dirty.item() == clean.item()
    assert torch.equal(dirty_grad, clean_grad)
    assert all(math.isfinite(value) for value in stats.values())


def test_grpo_loss_refuses_a_count_of_no_tokens():
    logp, old, _, mask = tensors()
    with pytest.raises(ValueError, match="tokens must be positive"):
        grpo_loss(logp, old, torch.zeros(8, dtype=torch.float64), mask, tokens=0.0)


# ---- group advantages ------------------------------------------------------------------------------------

def test_group_advantages_are_zero_mean_per_group_and_scaled_to_unit_mean_square():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, -1.0, 2.0, 0.5], [0.0, 1.0, 0.0, 1.0]])
    plain, scaled = group_advantages(rewards, scale=False), group_advantages(rewards, scale=True)
    expected = [[0.75, -0.25, -0.25, -0.25], [1.875, -2.125, 0.875, -0.625], [-0.5, 0.5, -0.5, 0.5]]
    assert plain.tolist() == [pytest.approx(row) for row in expected]
    assert plain.mean(dim=1).abs().max() < 1e-6 and scaled.mean(dim=1).abs().max() < 1e-6
    std = torch.tensor([[math.sqrt(0.1875)], [math.sqrt(2.296875)], [0.5]])  # population std of each group
    assert torch.allclose(scaled, plain / (std + 1e-4))
    assert torch.allclose(scaled.square().mean(dim=1), torch.ones(3), atol=1e-3)
    assert scaled[2].tolist() == pytest.approx([-0.5 / 0.5001, 0.5 / 0.5001] * 2)
    assert group_advantages(torch.tensor([[1, 0, 0, 0]]), scale=False).tolist() == [[0.75, -0.25, -0.25, -0.25]]


def test_a_group_of_equal_rewards_gets_exact_zeros():
    # 8 rewards of 0.1 in fp32: their mean rounds to a value 7e-9 off, which scaling by 1/1e-4 would blow up
    rewards = torch.tensor([[0.1] * 8, [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0] * 8])
    for scale in (False, True):
        advantages = group_advantages(rewards, scale)
        assert advantages[0].tolist() == [0.0] * 8 and advantages[2].tolist() == [0.0] * 8
        assert advantages[1].abs().min() > 0.4


def test_group_advantages_refuse_a_flat_tensor():
    with pytest.raises(ValueError, match=r"rewards must be \[prompts, group\], got shape \(4,\)"):
        group_advantages(torch.zeros(4), scale=True)


def test_token_log_probs_are_fp32_log_softmax_of_the_targets():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5))
    logp = token_log_probs(logits, targets)
    assert logp.dtype == torch.float32 and logp.shape == (2, 5)
    wide = logits.double()
    expected = wide.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - wide.logsumexp(dim=-1)
    assert torch.allclose(logp.double(), expected, atol=1e-6)


# ---- rollouts --------------------------------------------------------------------------------------------

def greedy_by_full_forwards(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """The greedy continuation, re-running the whole sequence without a cache at each step."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_rows_are_the_greedy_continuation_cut_after_the_first_end_token():
    model = tiny_model()
    with torch.no_grad():
        continuation = greedy_by_full_forwards(model, PROMPT, 12)
        assert continuation == model.generate(torch.tensor([PROMPT]), 12, temperature=0)[0, 3:].tolist()
    first_new = next(i for i in range(3, 12) if continuation[i] not in continuation[:i])  # an end met mid-way
    end = continuation[first_new]
    group = sample_group(model, PROMPT, group=3, max_tokens=12, temperature=0.0, top_p=None,
                         generator=torch.Generator().manual_seed(0), end_ids=frozenset({end, 99}))
    assert group.prompt == PROMPT
    assert group.completions == [continuation[:first_new + 1]] * 3
    assert group.finished == [True] * 3
    assert group.decode_steps == first_new  # the prompt's forward gave the first token

    unended = sample_group(model, PROMPT, group=2, max_tokens=7, temperature=0.0, top_p=None,
                           generator=torch.Generator().manual_seed(0), end_ids=frozenset())
    assert unended.completions == [continuation[:7]] * 2
    assert unended.finished == [False, False] and unended.decode_steps == 6


def test_sampled_rows_are_gpt_streams_rows_cut_at_their_own_end_tokens():
    model = tiny_model()
    ends = frozenset({4, 9})
    group = sample_group(model, PROMPT, group=6, max_tokens=12, temperature=1.0, top_p=0.9,
                         generator=torch.Generator().manual_seed(3), end_ids=ends)
    # The same draws from the same seed, batch 6 from the start and never stopping early
    streamed = torch.cat(list(model.stream(torch.tensor([PROMPT] * 6), 12, temperature=1.0, top_p=0.9,
                                           generator=torch.Generator().manual_seed(3))), dim=1).tolist()
    for row, completion, finished in zip(streamed, group.completions, group.finished):
        cut = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
        assert completion == row[:cut]
        assert finished == (row[cut - 1] in ends)
    assert 0 < sum(group.finished) < 6  # some rows ended, some ran to max_tokens
    assert any(sum(token in ends for token in row) > 1 for row in streamed)  # a row's later end token is ignored
    assert group.decode_steps == max(len(c) for c in group.completions) - 1


def test_the_same_seed_gives_the_same_group_and_another_seed_another():
    model = tiny_model()

    def draw(seed: int):
        return sample_group(model, PROMPT, group=4, max_tokens=8, temperature=1.0, top_p=None,
                            generator=torch.Generator().manual_seed(seed), end_ids=frozenset({5}))

    assert draw(11) == draw(11)
    assert draw(11).completions != draw(12).completions


def test_a_prompt_and_max_tokens_beyond_the_context_are_refused():
    model = tiny_model(seq_len=16)
    prompt = list(range(10))
    fits = sample_group(model, prompt, group=2, max_tokens=6, temperature=0.0, top_p=None,
                        generator=torch.Generator(), end_ids=frozenset())
    assert [len(c) for c in fits.completions] == [6, 6]
    with pytest.raises(ValueError, match="a prompt of 10 tokens \\+ max_tokens=7 exceeds the model's context of 16"):
        sample_group(model, prompt, group=2, max_tokens=7, temperature=0.0, top_p=None,
                     generator=torch.Generator(), end_ids=frozenset())
    with pytest.raises(ValueError, match="group >= 1"):
        sample_group(model, prompt, group=0, max_tokens=6, temperature=0.0, top_p=None,
                     generator=torch.Generator(), end_ids=frozenset())


def test_generation_flops_count_the_prompt_once_and_each_rows_decode_steps():
    model = tiny_model()
    cfg = model.config
    # From the model's own weights: 2 FLOPs per matmul weight per token (blocks and head), plus QK^T and AV over
    # a full seq_len window, 2 * 2 * seq_len * n_heads * head_dim per layer.
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul_weights += model.head_weight.numel()  # tied: the embedding matrix is the head
    per_token = 2 * matmul_weights + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len
    assert forward_flops_per_token(cfg) == per_token
    group = sample_group(model, PROMPT, group=5, max_tokens=9, temperature=1.0, top_p=None,
                         generator=torch.Generator().manual_seed(0), end_ids=frozenset({7}))
    forwards = [len(PROMPT)] + [5] * group.decode_steps  # tokens run by the prefill, then by each decode step
    assert generation_flops(cfg, len(PROMPT), 5, group.decode_steps) == sum(forwards) * per_token
    assert generation_flops(cfg, 40, 8, 0) == 40 * per_token
