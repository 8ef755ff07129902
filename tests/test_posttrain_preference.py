"""DPO pairs, their sampler and objective, checked against numbers computed independently of the module."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.model.gpt import GPT
from flopwise.posttrain.conversations import Message, PreferencePair
from flopwise.posttrain.preference import (
    DPOObjective,
    PairSampler,
    PreferenceEvaluator,
    RenderedPair,
    dpo_flops_per_step,
    prepare_pairs,
    render_pair,
)
from flopwise.posttrain.sampler import Rendered
from flopwise.posttrain.template import add_chat_tokens, render
from flopwise.runtime import Ranks
from flopwise.train.trainer import train_step
from tests.helpers import stack_of

CPU = torch.device("cpu")
SEQ_LEN = 32
CONFIG = ModelConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, seq_len=SEQ_LEN)


def side(prompt: list[int], reply: list[int], source: int = 0) -> Rendered:
    return Rendered.of(prompt + reply, [False] * len(prompt) + [True] * len(reply), source)


def pairs(count: int = 7, seed: int = 0) -> list[RenderedPair]:
    """Random prompts; the chosen reply [5, 6, 7, 8], the rejected one random; pair i's prompt starts with
    10 + i, so rows can be traced back to their pair."""
    rng = np.random.default_rng(seed)
    result = []
    for index in range(count):
        prompt = [10 + index, *rng.integers(20, 48, size=int(rng.integers(2, 9))).tolist()]
        rejected = rng.integers(1, 48, size=int(rng.integers(2, 7))).tolist()
        result.append(RenderedPair(side(prompt, [5, 6, 7, 8]), side(prompt, rejected)))
    return result


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def log_prob(net: torch.nn.Module, rendered: Rendered) -> float:
    """log P(reply | prompt) of one side scored alone, unpadded."""
    ids = torch.from_numpy(rendered.ids)
    with torch.no_grad():
        log_probs = F.log_softmax(net(ids[None, :-1])[0][0].float(), -1)
    picked = log_probs.gather(1, ids[1:, None]).squeeze(1)
    return float(picked[torch.from_numpy(rendered.mask[1:])].sum())


def test_render_pair_masks_exactly_each_reply_and_its_end_token():
    tokenizer = add_chat_tokens(byte_tokenizer())
    prompt = (Message("system", "be brief"), Message("user", "hi?"))
    rendered = render_pair(tokenizer, PreferencePair(prompt, "yes", "no way", "f.jsonl"), source=3)
    header, _ = render(tokenizer, prompt, add_generation_prompt=True)
    for result, reply in ((rendered.chosen, "yes"), (rendered.rejected, "no way")):
        n = len(reply.encode())  # one byte per token
        assert result.source == 3
        assert result.ids[:len(header)].tolist() == header
        assert result.mask.tolist() == [False] * len(header) + [True] * (n + 1) + [False]  # + <|im_end|>, "\n"
        assert tokenizer.decode(result.ids[result.mask].tolist()) == reply + "<|im_end|>"


def test_prepare_pairs_cuts_both_sides_and_drops_a_pair_left_without_a_target_on_either():
    fits = RenderedPair(side([1, 2], [3, 4]), side([1, 2], [5]))
    cut = RenderedPair(side([1, 2, 3], [4, 5, 6]), side([1, 2], [7]))  # chosen: 6 tokens, cut to 5
    no_rejected = RenderedPair(side([1, 2], [3]), side([1, 2, 3, 4, 5], [6]))  # rejected's reply past the cut
    kept, stats = prepare_pairs([fits, cut, no_rejected], seq_len=4)
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)
    lists = [(s.ids.tolist(), s.mask.tolist()) for pair in kept for s in (pair.chosen, pair.rejected)]
    assert lists == [([1, 2, 3, 4], [False, False, True, True]), ([1, 2, 5], [False, False, True]),
                     ([1, 2, 3, 4, 5], [False, False, False, True, True]), ([1, 2, 7], [False, False, True])]


def test_batch_holds_the_chosen_rows_then_the_rejected_rows_of_the_same_pairs():
    data = pairs()
    batch = PairSampler(data, SEQ_LEN, batch_size=3, seed=1, pad_id=0).next_batch()
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (6, SEQ_LEN)
    for row in range(3):
        pair = data[int(batch.inputs[row, 0]) - 10]
        assert pair is data[int(batch.inputs[row + 3, 0]) - 10]  # same pair, same position in each half
        for r, rendered in ((row, pair.chosen), (row + 3, pair.rejected)):
            n = len(rendered.ids) - 1
            assert batch.inputs[r, :n].tolist() == rendered.ids[:-1].tolist()
            assert batch.targets[r, :n].tolist() == rendered.ids[1:].tolist()
            assert batch.mask[r].tolist() == rendered.mask[1:].tolist() + [False] * (SEQ_LEN - n)
            assert batch.inputs[r, n:].eq(0).all() and batch.targets[r, n:].eq(0).all()


def first_column(batches: list) -> list[list[int]]:
    return [b.inputs[:, 0].tolist() for b in batches]


def test_resume_from_a_json_state_continues_the_same_order_across_epochs():
    data = pairs()
    straight = PairSampler(data, SEQ_LEN, batch_size=3, seed=4, pad_id=0)
    expected = [straight.next_batch() for _ in range(10)]  # 30 pairs: four epochs and a bit
    first = PairSampler(data, SEQ_LEN, batch_size=3, seed=4, pad_id=0)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PairSampler(data, SEQ_LEN, batch_size=3, seed=4, pad_id=0)
    resumed.load_state_dict(state)
    after = [resumed.next_batch() for _ in range(5)]
    assert first_column(after) == first_column(expected[5:])
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask) for a, b in zip(after, expected[5:]))
    assert resumed.domain_epochs() == {"pairs": pytest.approx(30 / 7)}
    order = sum((b[:3] for b in first_column(expected)), [])  # the pairs taken, by their prompts' first ids
    assert sorted(order[:7]) == sorted(order[7:14]) == [10 + i for i in range(7)]  # each epoch: all, once
    assert order[:7] != order[7:14]  # in a fresh order
    with pytest.raises(FlopwiseError, match="preference pairs"):
        PairSampler(data[:-1], SEQ_LEN, 3, 4, 0).load_state_dict(state)


def test_ranks_take_contiguous_shares_of_the_global_batch():
    data = pairs()
    whole = PairSampler(data, SEQ_LEN, batch_size=4, seed=2, pad_id=0)
    ranks = [PairSampler(data, SEQ_LEN, batch_size=4, seed=2, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        inputs = whole.next_batch().inputs
        shares = [sampler.next_batch().inputs for sampler in ranks]
        assert torch.equal(torch.cat([s[:2] for s in shares]), inputs[:4])  # chosen rows
        assert torch.equal(torch.cat([s[2:] for s in shares]), inputs[4:])  # rejected rows
    assert ranks[1].state_dict() == whole.state_dict()


def test_loss_is_log_two_while_the_policy_is_the_reference():
    policy = model()
    objective = DPOObjective(PairSampler(pairs(), SEQ_LEN, 4, 0, 0), copy.deepcopy(policy), beta=0.1)
    loss, detached = objective.loss(policy, objective.next_batch(), CPU, torch.float32)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert loss.requires_grad and not detached.requires_grad
    assert objective.last_outcome.accuracy.item() == 0.0
    assert objective.last_outcome.margin.abs().max().item() < 1e-6


def test_training_raises_preference_accuracy_and_margin_and_leaves_the_reference_alone():
    policy = model()
    reference = copy.deepcopy(policy)
    before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    data = pairs(8)
    objective = DPOObjective(PairSampler(data, SEQ_LEN, 4, 0, 0), reference, beta=0.5)
    evaluator = PreferenceEvaluator(data, reference, beta=0.5, batch_size=4, device=CPU, dtype=torch.float32,
                                    pad_id=0)
    start = evaluator(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(12):
        train_step(policy, optimizer, stack_of(), 1, 1.0, CPU, torch.float32, Ranks(), objective)
    end = evaluator(policy)
    assert start["reward_accuracy"] == 0.0 and start["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["reward_accuracy"] == 1.0 and end["reward_margin"] > 1.0 and end["loss"] < start["loss"] / 2
    assert end["preference_accuracy"] >= start["preference_accuracy"]
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(before[name], tensor) for name, tensor in reference.state_dict().items())


def test_a_step_counts_the_policy_on_both_rows_and_the_reference_forward():
    per_token = flops_per_token(CONFIG)  # forward and backward: 6 FLOPs per weight, of which forward is 2
    assert dpo_flops_per_step(CONFIG, 4, SEQ_LEN) == pytest.approx((2 * 4 * SEQ_LEN) * per_token * (1 + 1 / 3))


def test_evaluator_equals_dpo_computed_by_hand_on_each_pair_alone():
    policy, reference, beta = model(0), model(1), 0.3
    data = pairs(7, seed=5)
    result = PreferenceEvaluator(data, reference, beta, batch_size=3, device=CPU, dtype=torch.float32,
                                 pad_id=0)(policy)
    chosen = np.array([beta * (log_prob(policy, p.chosen) - log_prob(reference, p.chosen)) for p in data])
    rejected = np.array([beta * (log_prob(policy, p.rejected) - log_prob(reference, p.rejected)) for p in data])
    margins = chosen - rejected
    assert result["pairs"] == 7
    assert result["loss"] == pytest.approx(float(np.mean(np.log1p(np.exp(-margins)))), rel=1e-5)
    assert result["reward_accuracy"] == pytest.approx(float(np.mean(margins > 0)))
    assert result["reward_margin"] == pytest.approx(float(np.mean(margins)), rel=1e-4, abs=1e-6)
    likelier = [log_prob(policy, p.chosen) > log_prob(policy, p.rejected) for p in data]
    assert result["preference_accuracy"] == pytest.approx(float(np.mean(likelier)))
    assert policy.training  # put back as it was
