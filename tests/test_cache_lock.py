"""Two builders of one cache entry at once: the second waits for the first's lock, then loads its entry, so the
corpus is tokenized once and neither reads half an entry; the same for a trained tokenizer."""

from __future__ import annotations

import threading

import numpy as np

from flopwise.data import pipeline, shards
from flopwise.data.sources import Document
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.filelock import held


def test_a_second_builder_waits_and_loads_the_first_builders_entry(tmp_path, monkeypatch):
    documents = [Document(f"document {i} " * 50, "prose", f"d{i}") for i in range(40)]
    started, release = threading.Event(), threading.Event()
    real_write = shards._write_corpus
    writes = []

    def slow_write(*args, **kwargs):
        writes.append(threading.current_thread().name)
        started.set()
        assert release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards, "_write_corpus", slow_write)
    results = {}

    def build(name: str) -> None:
        results[name] = shards.build_corpus(documents, byte_tokenizer(), tmp_path, key="k", val_fraction=0.1,
                                            min_units=10)

    first = threading.Thread(target=build, args=("first",), name="first")
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=build, args=("second",), name="second")
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first builder's lock
    release.set()
    first.join(30)
    second.join(30)
    assert writes == ["first"]  # tokenized once
    assert not results["first"].cache_hit and results["second"].cache_hit
    assert np.array_equal(np.asarray(results["first"].train_tokens), np.asarray(results["second"].train_tokens))


def test_a_tokenizer_being_trained_is_not_trained_again(tmp_path, monkeypatch):
    calls = []
    real_train = pipeline.train_bpe

    def counted(sample, vocab_size):
        calls.append(vocab_size)
        return real_train(sample, vocab_size)

    monkeypatch.setattr(pipeline, "train_bpe", counted)
    from flopwise.data.config import DataSection

    data = DataSection(tokenizer="bpe", vocab_size=300)
    documents = [Document(f"some words here and there number {i}" * 20, "prose", f"d{i}") for i in range(30)]
    threads = [threading.Thread(target=pipeline.get_tokenizer, args=(data, documents, 0, tmp_path)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(calls) == 1


def test_held_serializes_two_holders(tmp_path):
    order = []
    inside = threading.Event()

    def hold(name: str, wait: threading.Event | None) -> None:
        with held(tmp_path / "x.lock"):
            order.append(f"{name} in")
            if wait is not None:
                inside.set()
                wait.wait(5)
            order.append(f"{name} out")

    go = threading.Event()
    a = threading.Thread(target=hold, args=("a", go))
    a.start()
    assert inside.wait(5)
    b = threading.Thread(target=hold, args=("b", None))
    b.start()
    b.join(0.3)
    go.set()
    a.join(5)
    b.join(5)
    assert order == ["a in", "a out", "b in", "b out"]
