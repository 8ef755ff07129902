"""Document-aware pretraining windows (``data.windows = "doc_start"``) and attention within documents
(``data.doc_mask``), flopwise/data/sampler.py: where windows begin (long documents, the last partial window,
short documents that a window holds whole), the segments against the end-of-text tokens, exact resume, ranks,
mixtures, the sequence-length schedule's cut, the model's loss against each document run alone, and real runs
(their exact resume with every new option on: tests/test_weight_average.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flopwise.data.sampler import Batch, PackedSampler, document_segments, document_windows
from flopwise.errors import FlopwiseError
from flopwise.methods.stack import split_windows
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT, Packing
from tests.helpers import TINY, losses, stack_of, train

EOS = 99


def corpus(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of documents of ``lengths`` (each ending in EOS, as the shards store them) and their starts."""
    rng = np.random.default_rng(seed)
    parts = [np.append(rng.integers(1, EOS, size=length - 1), EOS) for length in lengths]
    starts = np.cumsum([0, *lengths[:-1]])
    return np.concatenate(parts).astype(np.int64), starts


def same(a: Batch, b: Batch) -> bool:
    """The same inputs, targets, domains and segments (or none in both)."""
    return all(x is y if x is None or y is None else torch.equal(x, y) for x, y in zip(a, b))


def test_windows_begin_at_documents_continue_long_ones_and_skip_those_a_window_holds():
    # documents [0,3) [3,15) [15,17) [17,19) [19,24) [24,44); each is read from the EOS before it: 0, 2, 14, 16,
    # 18, 23.  Windows of 4 (+1): 0 holds doc 0 and cuts doc 1, which starts again at 2 and goes on at 6 and 10
    # (predicted to its EOS at 14); 14 holds doc 2 and doc 3 whole, cutting doc 4 (18, 22); doc 5: 23 ... 39.
    _, starts = corpus([3, 12, 2, 2, 5, 20])
    assert document_windows(starts, 0, 44, 4).tolist() == [0, 2, 6, 10, 14, 18, 22, 23, 27, 31, 35, 39]
    # the last window must fit: with the stream ending at 43, doc 5's last piece (39..43] does not
    assert document_windows(starts, 0, 43, 4).tolist() == [0, 2, 6, 10, 14, 18, 22, 23, 27, 31, 35]


@pytest.mark.parametrize("seq_len", [3, 8, 32])
def test_every_token_is_predicted_and_windows_begin_at_a_document_or_continue_one(seq_len):
    lengths = np.random.default_rng(seq_len).integers(1, 3 * seq_len, size=60).tolist()
    tokens, starts = corpus(lengths)
    offsets = document_windows(starts, 0, len(tokens), seq_len)
    heads = set(np.maximum(starts - 1, 0).tolist())
    for offset in offsets.tolist():  # a head, or a whole number of windows after the head of its document
        document = int(np.searchsorted(starts, offset + 1, side="right")) - 1
        head = max(int(starts[document]) - 1, 0)
        assert offset in heads or (offset - head) % seq_len == 0, offset
    predicted = np.zeros(len(tokens), dtype=bool)
    for offset in offsets.tolist():
        predicted[offset + 1:offset + seq_len + 1] = True
    last = int(offsets[-1]) + seq_len  # after the last window that fits, nothing
    assert predicted[1:last + 1].all() and not predicted[last + 1:].any()
    assert np.all(np.diff(offsets) > 0)


def test_the_sampler_gives_each_window_with_the_eos_before_its_document_and_resumes_exactly():
    tokens, starts = corpus(np.random.default_rng(3).integers(2, 30, size=80).tolist())

    def sampler(seed: int = 4) -> PackedSampler:
        return PackedSampler(tokens, 8, 3, seed=seed, doc_starts=starts, segment_token=EOS)
    straight = sampler()
    expected = [straight.next_batch() for _ in range(30)]
    offsets = document_windows(starts, 0, len(tokens), 8)
    firsts = {int(tokens[o]) for o in offsets if o > 0 and o + 1 in set(starts.tolist())}
    assert firsts == {EOS}  # a window that begins a document begins at the EOS before it
    first = sampler()
    for _ in range(11):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = sampler(seed=0)
    resumed.load_state_dict(state)
    assert all(same(resumed.next_batch(), want) for want in expected[11:])
    assert any(batch.segments is not None for batch in expected[11:])
    stream = PackedSampler(tokens, 8, 3, seed=4)
    with pytest.raises(FlopwiseError, match="data.windows='doc_start' windows but this run has 'stream'"):
        stream.load_state_dict(state)


def test_segments_begin_at_each_eos_and_the_mask_keeps_attention_within_a_document():
    tokens, starts = corpus([3, 12, 2, 2, 5, 20, 7])
    batch = PackedSampler(tokens, 16, 4, seed=0, doc_starts=starts, segment_token=EOS).next_batch()
    for inputs, segments in zip(batch.inputs.tolist(), batch.segments.tolist()):
        assert segments[0] == int(inputs[0] == EOS)
        for i in range(1, len(inputs)):
            assert segments[i] - segments[i - 1] == int(inputs[i] == EOS)
    mask = Packing.of(batch.segments).mask[:, 0]
    for row, inputs in enumerate(batch.inputs.tolist()):
        for i in range(16):
            for j in range(16):  # j is visible from i iff it is not later and no EOS lies in (j, i]
                assert bool(mask[row, i, j]) == (j <= i and EOS not in inputs[j + 1:i + 1]), (row, i, j)


def test_the_loss_with_segments_is_each_document_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16))
    tokens, _ = corpus([5, 4, 9])  # one window of 16 (+1): three documents
    inputs, targets = torch.from_numpy(tokens[None, :16]), torch.from_numpy(tokens[None, 1:17])
    batch = Batch(inputs, targets, torch.zeros(1, dtype=torch.int64), document_segments(inputs, EOS))
    loss, _ = stack_of().loss(model, batch, torch.device("cpu"), torch.float32)
    # independently: each document (from the EOS before it) through the model on its own, positions from 0
    pieces = [(0, 4), (4, 8), (8, 16)]  # inputs[4] and inputs[8] are the EOS tokens that end documents 0 and 1
    alone = torch.cat([model(inputs[:, a:b], targets[:, a:b], reduction="none")[1][0] for a, b in pieces])
    torch.testing.assert_close(loss, alone.mean())
    plain, _ = stack_of().loss(model, batch._replace(segments=None), torch.device("cpu"), torch.float32)
    assert abs(plain.item() - loss.item()) > 1e-4  # without segments the documents see each other


def test_the_sequence_schedule_cuts_segments_with_their_windows():
    tokens, starts = corpus([3, 12, 2, 2, 5, 20, 7, 30])
    sampler = PackedSampler(tokens, 16, 2, seed=0, doc_starts=starts, segment_token=EOS)
    batch = next(batch for batch in iter(sampler.next_batch, None) if batch.segments is not None)
    cut = split_windows(batch, 4)
    assert torch.equal(cut.segments.reshape(2, 16), batch.segments)
    assert torch.equal(Packing.of(cut.segments).positions, Packing.of(document_segments(cut.inputs, EOS)).positions)


def test_two_ranks_split_what_one_rank_with_double_batch_sees():
    tokens, starts = corpus(np.random.default_rng(5).integers(2, 40, size=100).tolist())
    single = PackedSampler(tokens, 8, 6, seed=1, doc_starts=starts, segment_token=EOS)
    ranks = [PackedSampler(tokens, 8, 3, seed=1, rank=r, world_size=2, doc_starts=starts, segment_token=EOS)
             for r in (0, 1)]
    for _ in range(10):
        whole, a, b = single.next_batch(), ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(torch.cat([a.inputs, b.inputs]), whole.inputs)
        for part in (a, b):  # each rank's segments are its windows' (None where they hold no boundary)
            assert part.segments is None or torch.equal(part.segments, document_segments(part.inputs, EOS))


def test_a_batch_without_a_document_boundary_carries_no_mask_and_loses_nothing_by_it():
    tokens, starts = corpus([40, 3, 50])  # windows of 8: only those around the EOS at 39 and 42 hold a boundary
    sampler = PackedSampler(tokens, 8, 1, seed=0, doc_starts=starts, segment_token=EOS)
    batches = [sampler.next_batch() for _ in range(sampler.windows)]
    for batch in batches:
        boundary = bool((batch.inputs[0, 1:] == EOS).any())
        assert (batch.segments is not None) == boundary
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, seq_len=8))
    plain = next(batch for batch in batches if batch.segments is None)
    masked = plain._replace(segments=document_segments(plain.inputs, EOS))  # one segment per row: the causal mask
    stack, cpu = stack_of(), torch.device("cpu")
    torch.testing.assert_close(stack.loss(model, plain, cpu, torch.float32)[0],
                               stack.loss(model, masked, cpu, torch.float32)[0])


def test_a_mixture_draws_document_windows_from_each_domain_and_counts_them_there():
    tokens, starts = corpus(np.random.default_rng(6).integers(2, 40, size=120).tolist())
    boundary = int(starts[70])  # documents 0-69: domain a, 70-119: domain b
    ranges = [(0, boundary), (boundary, len(tokens))]
    sampler = PackedSampler(tokens, 8, 4, seed=2, domain_ranges=ranges, weights=[0.5, 0.5],
                            domain_names=["a", "b"], doc_starts=starts)
    for stream, (start, end) in zip(sampler.streams, ranges):
        assert stream.starts.tolist() == document_windows(starts, start, end, 8).tolist()
    drawn = []
    for _ in range(10):
        batch = sampler.next_batch()
        for inputs, domain in zip(batch.inputs, batch.domains.tolist()):
            offset = next(o for o in sampler.streams[domain].starts.tolist()
                          if np.array_equal(tokens[o:o + 8], inputs.numpy()))
            assert ranges[domain][0] - 1 <= offset and offset + 9 <= ranges[domain][1]
            drawn.append(domain)
    assert drawn.count(0) == drawn.count(1) == 20
    assert sampler.taken == [20, 20]


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--set", "data.windows=doc_start"], ["--set", "data.doc_mask=true"]])
def test_a_real_run_with_each_option_learns(tmp_path, text_folder, options):
    run = tmp_path / "run"
    assert train(*TINY, "--data", str(text_folder), "--budget", "20steps", *options, "--out", str(run)) == 0
    curve = [loss for _, loss in losses(run)]
    assert sum(curve[-4:]) / 4 < curve[0] - 0.3
    assert (run / "final").is_dir()
