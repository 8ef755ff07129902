"""The SFT conversation sampler: rows that never mix conversations' targets, every conversation once per epoch,
packing with segments or one conversation per row, truncation counted, ranks sharing one order, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.posttrain.losses import masked_cross_entropy
from flopwise.posttrain.sampler import ConversationSampler, PrepareStats, Rendered, fill, prepare

PAD = 999
LENGTHS = [5, 9, 3, 13, 7, 17, 4, 11, 6]  # up to seq_len + 1 = 17 tokens


def tagged(lengths: list[int]) -> list[Rendered]:
    """Conversation k has ids 1000 k + i, so any id names its conversation; the second half of each is a target,
    and its source is k % 3."""
    return [Rendered.of([1000 * k + i for i in range(n)], [i >= n // 2 for i in range(n)], k % 3)
            for k, n in enumerate(lengths)]


def sampler(pack: bool, conversations: list[Rendered] | None = None, **kwargs) -> ConversationSampler:
    options = {"seq_len": 16, "batch_size": 2, "seed": 7, "pad_id": PAD} | kwargs
    return ConversationSampler(conversations or tagged(LENGTHS), pack=pack, **options)


def spans(segments: list[int], sources: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each conversation in a row (padding, with source -1, left out)."""
    bounds = [0] + [t for t in range(1, len(segments)) if segments[t] != segments[t - 1]] + [len(segments)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if sources[a] >= 0]


def row_spans(batch, b: int) -> list[tuple[int, int]]:
    """A row's conversations; without segments a row holds one conversation, before its padding."""
    sources = batch.sources[b].tolist()
    if batch.segments is None:
        return [(0, sum(s >= 0 for s in sources))]
    return spans(batch.segments[b].tolist(), sources)


def order(batches) -> list[int]:
    """The conversations of ``batches`` in row order, named by their ids."""
    return [batch.inputs[b, start].item() // 1000 for batch in batches for b in range(len(batch.inputs))
            for start, _ in row_spans(batch, b)]


@pytest.mark.parametrize("pack", [True, False])
def test_each_row_holds_whole_conversations_shifted_within_themselves(pack):
    conversations = tagged(LENGTHS)
    stream = sampler(pack)
    for _ in range(8):
        batch = stream.next_batch()
        for b in range(2):
            covered = 0
            for start, end in row_spans(batch, b):
                source = conversations[batch.inputs[b, start].item() // 1000]
                assert batch.inputs[b, start:end].tolist() == source.ids[:-1].tolist()
                assert batch.targets[b, start:end].tolist() == source.ids[1:].tolist()
                assert batch.mask[b, start:end].tolist() == source.mask[1:].tolist()
                assert set(batch.sources[b, start:end].tolist()) == {source.source}
                covered += end - start
            assert batch.sources[b, covered:].eq(-1).all() and not batch.mask[b, covered:].any()
            assert batch.inputs[b, covered:].eq(PAD).all()
        real = batch.sources >= 0  # every input predicts a token of its own conversation
        assert torch.equal(batch.inputs[real] // 1000, batch.targets[real] // 1000)


def test_segments_number_each_rows_conversations_in_turn_and_padding_last():
    stream = sampler(True)
    for _ in range(8):
        batch = stream.next_batch()
        for b in range(2):
            segments, sources = batch.segments[b].tolist(), batch.sources[b].tolist()
            runs = [segments[start] for start, _ in spans(segments, [0] * len(segments))]
            assert runs == list(range(len(runs)))  # contiguous: each id in one run, in order
            padded = [t for t, s in enumerate(sources) if s < 0]
            assert all(segments[t] == len(runs) - 1 for t in padded)
            assert len(spans(segments, sources)) == len(runs) - bool(padded)


def test_greedy_fill_moves_a_conversation_to_the_next_row_only_when_it_does_not_fit():
    stream = sampler(True)
    rows = [(batch, b) for batch in (stream.next_batch() for _ in range(8)) for b in range(2)]
    for (batch, b), (after, a) in zip(rows, rows[1:]):
        padding = int((batch.sources[b] < 0).sum())
        start, end = row_spans(after, a)[0]
        assert padding < end - start
        assert len(row_spans(batch, b)) >= 1


@pytest.mark.parametrize("pack", [True, False])
def test_every_conversation_once_per_epoch_and_packing_keeps_the_order(pack):
    stream = sampler(pack)
    seen = order(stream.next_batch() for _ in range(12))
    n = len(LENGTHS)
    assert len(seen) >= 2 * n
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # a fresh permutation per epoch
    other = sampler(not pack)
    assert seen[:2 * n] == order(other.next_batch() for _ in range(12))[:2 * n]


def test_epochs_counts_conversations_consumed():
    stream = sampler(False, batch_size=3)
    stream.next_batch()
    assert stream.domain_epochs() == {"conversations": pytest.approx(3 / 9)}
    for _ in range(3):
        stream.next_batch()
    assert stream.domain_epochs() == {"conversations": pytest.approx(12 / 9)}


def test_fill_counts_targets_and_padding():
    # 6 tokens each: 5 input positions, 3 of them targets (mask[1:] = F F T T T); rows of 12 positions
    conversations = [Rendered.of(list(range(6)), [False] * 3 + [True] * 3, 0) for _ in range(4)]
    packed, single = (sampler(pack, conversations, seq_len=12, batch_size=2) for pack in (True, False))
    packed_fill = fill(packed.next_batch() for _ in range(3))
    single_fill = fill(single.next_batch() for _ in range(3))
    assert (packed_fill.targets, packed_fill.padding) == pytest.approx((6 / 12, 2 / 12))
    assert (single_fill.targets, single_fill.padding) == pytest.approx((3 / 12, 7 / 12))


def test_prepare_cuts_to_the_window_and_counts_truncated_and_dropped():
    long_reply = Rendered.of(list(range(30)), [i >= 20 for i in range(30)], 1)  # all targets past the cut
    long_early = Rendered.of(list(range(25)), [5 <= i < 15 for i in range(25)], 2)
    short = Rendered.of([1, 2, 3], [False, True, True], 0)
    first_only = Rendered.of([1, 2], [True, False], 0)  # the first token is never predicted
    kept, stats = prepare([short, long_reply, long_early, first_only], seq_len=10)
    assert stats == PrepareStats(kept=2, truncated=1, dropped=2)
    assert [c.ids.tolist() for c in kept] == [[1, 2, 3], list(range(11))]
    assert kept[1].mask.tolist() == [5 <= i < 15 for i in range(11)] and kept[1].source == 2


@pytest.mark.parametrize("pack", [True, False])
def test_ranks_shares_make_the_single_process_batch(pack):
    single = sampler(pack, batch_size=4)
    ranks = [sampler(pack, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        for field, joined in zip(whole._fields, zip(*parts)):
            if getattr(whole, field) is not None:
                assert torch.equal(getattr(whole, field), torch.cat(joined))
        assert all(rank.state_dict() == single.state_dict() for rank in ranks)


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_same_batches_across_an_epoch_boundary(pack):
    stream = sampler(pack)
    for _ in range(5):
        stream.next_batch()
    saved = json.loads(json.dumps(stream.state_dict()))
    assert all(isinstance(value, int) for value in saved.values())
    epoch = stream.order.epoch
    expected = [stream.next_batch() for _ in range(5)]
    assert stream.order.epoch > epoch
    resumed = sampler(pack, seed=123)  # the saved seed wins, as in PackedSampler
    resumed.load_state_dict(saved)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(5))):
        assert all(torch.equal(a, b) if a is not None else b is None for a, b in zip(want, got))


def test_same_seed_same_batches_other_seed_other_order():
    first, again, other = ([order([stream.next_batch()]) for _ in range(4)]
                           for stream in (sampler(True, seed=s) for s in (7, 7, 8)))
    assert first == again and first != other


def test_resume_refuses_other_conversations():
    state = sampler(True).state_dict()
    with pytest.raises(FlopwiseError, match="9 conversations"):
        sampler(True, tagged(LENGTHS[:-1])).load_state_dict(state)


def test_rejects_uncut_conversations_and_uneven_ranks():
    with pytest.raises(ValueError, match="prepare"):
        sampler(True, tagged([18]))
    with pytest.raises(ValueError, match="world_size"):
        sampler(True, batch_size=3, world_size=2)
    with pytest.raises(FlopwiseError, match="no conversation"):
        ConversationSampler([], seq_len=16, batch_size=2, seed=0, pack=True, pad_id=PAD)


def test_model_reads_a_packed_batch_as_separate_conversations():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    conversations = [Rendered.of(rng.integers(0, 64, n).tolist(), [i >= n // 2 for i in range(n)], 0)
                     for n in (9, 14, 20, 6, 30, 11, 8)]
    model = GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, seq_len=32)).eval()
    batch = sampler(True, conversations, seq_len=32, batch_size=3, pad_id=0).next_batch()
    with torch.no_grad():
        logits = model.logits(batch.inputs, segments=batch.segments)
        for b in range(3):
            for start, end in row_spans(batch, b):
                alone = model.logits(batch.inputs[b:b + 1, start:end])[0]
                assert torch.allclose(logits[b, start:end], alone, atol=1e-5)
    loss = masked_cross_entropy(logits, batch.targets, batch.mask)
    assert torch.isfinite(loss) and loss > 0
