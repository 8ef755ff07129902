"""Domain mixtures in the sampler, the source syntax that sets them, online reweighting and curricula:
proportions, exact resume, distribution across ranks, and the one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flopwise.data.sampler import PackedSampler, natural_weights
from flopwise.data.shards import build_corpus
from flopwise.data.sources import Document, SourceSpec, parse_source
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.mixture import mixture_weights
from flopwise.methods.online_mixture import DomainReweighter

# three domains of 1000, 4000 and 95 tokens; windows of 10 (+1) tokens
RANGES = [(0, 1000), (1000, 5000), (5000, 5095)]
TOKENS = np.arange(5095, dtype=np.int64) % 50_000


def mixed(weights, seed=0, batch=4, rank=0, world_size=1, **kwargs) -> PackedSampler:
    return PackedSampler(TOKENS, 10, batch, seed, rank=rank, world_size=world_size, domain_ranges=RANGES,
                         weights=weights, domain_names=["a", "b", "c"], **kwargs)


def domains_drawn(sampler: PackedSampler, batches: int) -> list[int]:
    return [d for _ in range(batches) for d in sampler.next_batch().domains.tolist()]


def test_every_prefix_matches_the_weights_within_one_window():
    weights = [0.5, 0.3, 0.2]
    drawn = domains_drawn(mixed(weights), 50)
    for end in range(1, len(drawn) + 1):
        counts = np.bincount(drawn[:end], minlength=3)
        assert np.all(np.abs(counts - end * np.array(weights)) <= 1.0)


def test_windows_come_from_their_domain_and_do_not_repeat_within_an_epoch():
    sampler = mixed([0.2, 0.8, 0.0])
    seen: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(20):
        batch = sampler.next_batch()
        for row, domain in zip(batch.inputs, batch.domains.tolist()):
            start, end = RANGES[domain]
            assert start <= int(row[0]) and int(row[-1]) < end  # TOKENS[i] == i here
            seen[domain].append(int(row[0]))
    # 80 windows: 16 of domain a (99 windows), 64 of b (399): none repeats
    assert len(seen[0]) == 16 and len(set(seen[0])) == 16 and len(set(seen[1])) == 64


def test_small_domain_repeats_and_epochs_are_counted():
    sampler = mixed([0.0, 0.5, 0.5])  # domain c has 9 windows
    for _ in range(10):
        sampler.next_batch()
    epochs = sampler.domain_epochs()
    assert epochs["a"] == 0.0
    assert epochs["c"] == pytest.approx(20 * 10 / 95)  # 20 windows of 10 tokens over 95 tokens: seen twice
    assert epochs["b"] == pytest.approx(20 * 10 / 4000)


def test_natural_order_counts_epochs_per_domain_too():
    sampler = PackedSampler(TOKENS, 10, 8, seed=0, domain_ranges=RANGES, domain_names=["a", "b", "c"])
    for _ in range(10):
        sampler.next_batch()
    assert sum(sampler.taken) == 80
    assert sampler.domain_epochs()["b"] == pytest.approx(sampler.taken[1] * 10 / 4000)


def test_resume_mid_run_with_changing_weights_repeats_exactly():
    def run(sampler: PackedSampler, steps: range) -> list[torch.Tensor]:
        out = []
        for step in steps:
            sampler.set_weights([1 + step % 3, 2, 0.5])
            out.append(sampler.next_batch().inputs)
        return out

    straight = run(mixed([1, 1, 1], seed=3), range(30))
    first = mixed([1, 1, 1], seed=3)
    run(first, range(12))
    resumed = mixed([1, 1, 1], seed=0)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(straight[12:], run(resumed, range(12, 30))))


def test_ranks_split_the_single_process_order():
    single = [mixed([0.3, 0.6, 0.1], seed=5, batch=8).next_batch() for _ in range(1)]
    samplers = [mixed([0.3, 0.6, 0.1], seed=5, batch=4, rank=r, world_size=2) for r in (0, 1)]
    parts = [s.next_batch() for s in samplers]
    assert torch.equal(torch.cat([p.inputs for p in parts]), single[0].inputs)
    assert torch.equal(torch.cat([p.domains for p in parts]), single[0].domains)


def test_bad_weights_are_refused_in_one_line():
    with pytest.raises(FlopwiseError, match="non-negative numbers with a positive sum, one per domain"):
        mixed([1, 1])
    tiny = PackedSampler(TOKENS, 10, 4, 0, domain_ranges=[(0, 5090), (5090, 5095)], domain_names=["big", "tiny"],
                         weights=[1, 0])
    with pytest.raises(FlopwiseError, match="domain 'tiny' has fewer than model.seq_len \\+ 1 = 11 training tokens"):
        tiny.set_weights([1, 1])


def test_old_checkpoint_state_is_refused_clearly():
    with pytest.raises(FlopwiseError, match="older flopwise"):
        mixed([1, 1, 1]).load_state_dict({"seed": 0, "epoch": 0, "position": 3, "windows": 10})


def test_curriculum_draws_from_the_easiest_share_and_resumes_exactly():
    def difficulty(offsets: np.ndarray) -> np.ndarray:
        return -offsets.astype(float)  # later windows are easier

    def pacing(p: float) -> float:
        return 0.1 if p < 0.5 else 1.0

    sampler = PackedSampler(TOKENS, 10, 8, seed=1, difficulty=difficulty, pacing=pacing)
    easiest = {10 * i for i in range(509 - 51, 509)}  # the last ceil(0.1 * 509) = 51 of 509 windows
    for _ in range(5):
        assert all(int(row[0]) in easiest for row in sampler.next_batch().inputs)
    sampler.progress = 0.6
    starts = {int(row[0]) for _ in range(30) for row in sampler.next_batch().inputs}
    assert len(starts - easiest) > 100
    copy = PackedSampler(TOKENS, 10, 8, seed=1, difficulty=difficulty, pacing=pacing)
    copy.load_state_dict(sampler.state_dict())
    copy.progress = sampler.progress = 0.2
    assert torch.equal(copy.next_batch().inputs, sampler.next_batch().inputs)


def test_corpus_keeps_each_domain_contiguous(tmp_path):
    documents = [Document(f"{kind} document {i} " * 20, kind, f"{kind}{i}") for i in range(30)
                 for kind in ("prose", "code", "notes")]
    corpus = build_corpus(documents, byte_tokenizer(), tmp_path, key="k", val_fraction=0.1)
    ranges = corpus.train_domain_ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(corpus.train_tokens)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    text = "".join(chr(t) if t < 256 else "|" for t in np.asarray(corpus.train_tokens).tolist())
    for name, (start, end) in zip(corpus.domains, ranges):
        assert text[start:end].count(name) > 0 and all(other not in text[start:end] for other in corpus.domains
                                                       if other != name)
    assert natural_weights(ranges, 10) == pytest.approx([(e - s) / len(corpus.train_tokens) for s, e in ranges])


@pytest.mark.parametrize("spec, expected", [
    ("stdlib", SourceSpec("stdlib")),
    ("./docs", SourceSpec("./docs")),
    ("code=./src:0.3", SourceSpec("./src", "code", 0.3)),
    ("prose=stdlib", SourceSpec("stdlib", "prose")),
    ("w=/a/b:1e-2", SourceSpec("/a/b", "w", 0.01)),
])
def test_source_syntax(spec, expected):
    assert parse_source(spec) == expected


def test_source_that_exists_is_a_path_even_with_the_syntax(tmp_path):
    odd = tmp_path / "a=b:0.5"
    odd.write_text("x")
    assert parse_source(str(odd)) == SourceSpec(str(odd))


def test_weight_without_name_is_refused():
    with pytest.raises(FlopwiseError, match="has a weight but no domain name: write NAME=PATH:WEIGHT"):
        parse_source("./nowhere:0.5")


def test_mixture_weights_from_flags_and_config():
    domains = ["code", "prose"]
    assert mixture_weights({}, ["stdlib"], domains) is None
    assert mixture_weights({}, ["code=./a:0.3", "prose=./b:0.7"], domains) == [0.3, 0.7]
    assert mixture_weights({"prose": 2.0}, ["code=./a:1"], domains) == [1.0, 2.0]
    with pytest.raises(FlopwiseError, match="domain 'prose' has no mixture weight"):
        mixture_weights({"code": 1.0}, ["stdlib"], domains)
    with pytest.raises(FlopwiseError, match="mixture weight for 'docs', which is not a domain"):
        mixture_weights({"docs": 1.0, "code": 1, "prose": 1}, [], domains)
    with pytest.raises(FlopwiseError, match="weight 1 in methods.mixture.weights and 2 in --data"):
        mixture_weights({"code": 1.0, "prose": 1.0}, ["code=./a:2"], domains)


def reference_weights(base, scores, eta, smoothing):
    logits = np.log(base) + eta * np.array(scores)
    soft = np.exp(logits - logits.max())
    return (1 - smoothing) * soft / soft.sum() + smoothing / len(base)


def test_loss_rule_moves_weight_to_the_harder_domain():
    rule = DomainReweighter(base=[0.6, 0.4], rule="loss", eta=1.0, smoothing=1e-3, decay=0.5)
    # nothing seen yet: the base mixture, smoothed toward uniform
    assert rule.weights() == pytest.approx([0.999 * 0.6 + 0.0005, 0.999 * 0.4 + 0.0005])
    rule.observe([2.0 * 100, 4.0 * 50], [100, 50])  # mean losses 2 and 4
    expected = reference_weights(np.array([0.6, 0.4]), [-1.0, 1.0], 1.0, 1e-3)
    assert rule.weights() == pytest.approx(expected.tolist())
    assert rule.weights()[1] > 0.8


def test_excess_rule_clips_at_the_reference_and_averages_bias_corrected():
    rule = DomainReweighter(base=[0.5, 0.5], rule="excess", eta=2.0, smoothing=0.0, decay=0.9,
                            reference=[3.0, 3.0])
    rule.observe([5.0, 2.0], [1, 1])
    rule.observe([4.0, 0.0], [1, 0])  # domain 1 absent from this step: its average is untouched
    first = (0.9 * 0.1 * 5.0 + 0.1 * 4.0) / (0.9 * 0.1 + 0.1)
    assert rule.domain_losses() == pytest.approx([first, 2.0])
    expected = reference_weights(np.array([0.5, 0.5]), [first - 3.0, 0.0], 2.0, 0.0)
    assert rule.weights() == pytest.approx(expected.tolist())


def test_reweighter_state_round_trip_and_zero_weight_domains_stay_out():
    rule = DomainReweighter(base=[1.0, 0.0, 1.0], rule="loss")
    rule.observe([3.0, 0.0, 1.0], [1, 0, 1])
    copy = DomainReweighter(base=[1.0, 0.0, 1.0], rule="loss")
    copy.load_state_dict(rule.state_dict())
    assert copy.weights() == rule.weights()
    assert rule.weights()[1] == 0.0 and math.isclose(sum(rule.weights()), 1.0)


def test_excess_without_reference_is_refused():
    with pytest.raises(FlopwiseError, match="methods.online_mixture.rule='excess' needs methods.online_mixture.reference"):
        DomainReweighter(base=[0.5, 0.5], rule="excess")
