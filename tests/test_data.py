"""Sources, tokenizers, the cached token corpus and the resumable sampler, on small local data."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from flopwise.data.sampler import PackedSampler
from flopwise.data.shards import TokenCorpus, build_corpus, content_key
from flopwise.data.sources import Document, ReadStats, read_documents, stdlib_documents
from flopwise.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from flopwise.errors import FlopwiseError

UNICODE = "naïve café — 日本語のテキスト 🎉🐍\n\ttabs, CRLF\r\n and a NUL \x00 and trailing space "
PROSE = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n") * 40


def read(spec, **kwargs) -> tuple[list[Document], ReadStats]:
    stats = ReadStats()
    return list(read_documents(str(spec), stats=stats, **kwargs)), stats


# ---------------------------------------------------------------- sources


def test_folder_is_read_recursively_in_sorted_order_with_include_globs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed")
    (tmp_path / "b" / "a.md").write_text("markdown")
    (tmp_path / "c.txt").write_text("sea")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "skip.py").write_text("print()")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x00data")

    docs, stats = read(tmp_path, include=["*.txt", "*.md"])
    assert [d.text for d in docs] == ["ay", "sea", "markdown", "zed"]
    assert {d.domain for d in docs} == {"text"}
    assert docs[2].source == str(tmp_path / "b" / "a.md")
    assert (stats.files, stats.documents, stats.bytes) == (4, 4, len("ayseamarkdownzed"))

    everything, stats = read(tmp_path, domain="notes")
    assert [d.text for d in everything] == ["ay", "sea", "print()", "markdown", "zed"]
    assert {d.domain for d in everything} == {"notes"}
    assert stats.skipped_binary == 1
    assert read(tmp_path, domain="notes")[0] == everything  # same order every time


def test_jsonl_field_selection_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"body": "first", "text": "x"}, {"body": "second\u2028line"}, {"body": ""}]
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n")
    docs, _ = read(path, jsonl_field="body")
    assert [d.text for d in docs] == ["first", "second\u2028line"]

    with pytest.raises(FlopwiseError, match=rf"{path}:2: no string field 'text'.*data.jsonl_field"):
        read(path)
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(FlopwiseError, match=rf"{path}:2: invalid JSON"):
        read(path)


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["one", None, "two"], "id": [1, 2, 3]}), path)
    docs, stats = read(path, jsonl_field="content", domain="web")
    assert [(d.text, d.domain) for d in docs] == [("one", "web"), ("two", "web")]
    assert stats.files == 1
    with pytest.raises(FlopwiseError, match="no column 'text'.*content, id"):
        read(path)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    raw = b"ab\xff\xfecd \xef\xbf\xbd already replaced \xe2\x82"
    (tmp_path / "bad.txt").write_bytes(raw)
    expected = raw.decode("utf-8", errors="replace")
    docs, stats = read(tmp_path / "bad.txt")
    assert docs[0].text == expected
    assert stats.replaced_bytes == expected.count("\ufffd") - 1 == 3


def test_empty_and_missing_sources_raise(tmp_path):
    with pytest.raises(FlopwiseError, match="holds no non-empty text documents"):
        read(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FlopwiseError, match=f"'{tmp_path / 'empty.txt'}' holds no non-empty"):
        read(tmp_path / "empty.txt")
    with pytest.raises(FlopwiseError, match="'nowhere' does not exist: pass a text file, a folder"):
        read("nowhere")


def test_stdlib_documents_cover_prose_and_code():
    stats = ReadStats()
    first = list(itertools.islice(stdlib_documents(stats), 120))
    domains = {d.domain for d in first}
    assert domains == {"prose", "code"}
    assert all(d.text for d in first)
    assert any(d.source.endswith(".py") and d.domain == "code" for d in first)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode(tmp_path):
    tokenizer = byte_tokenizer()
    assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256
    ids = tokenizer.encode_batch([UNICODE])[0]
    assert ids == list(UNICODE.encode("utf-8"))
    assert tokenizer.decode(ids) == UNICODE
    tokenizer.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path).encode_batch([UNICODE])[0] == ids


def test_bpe_train_save_load_gives_identical_ids(tmp_path):
    tokenizer = train_bpe([PROSE, UNICODE], vocab_size=300)
    assert tokenizer.vocab_size == 300
    ids = tokenizer.encode_batch([PROSE, UNICODE])
    assert len(ids[0]) < len(PROSE) / 3  # merges happened
    assert tokenizer.decode(ids[1]) == UNICODE
    tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.encode_batch([PROSE, UNICODE]) == ids
    assert loaded.eos_id == tokenizer.eos_id
    with pytest.raises(FlopwiseError, match="data.vocab_size=257"):
        train_bpe([PROSE], vocab_size=257)
    with pytest.raises(FlopwiseError, match="neither a tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


@pytest.mark.parametrize("make", [byte_tokenizer, lambda: train_bpe([PROSE, UNICODE], 400)])
def test_token_bytes_sum_to_utf8_length(make):
    tokenizer = make()
    lengths = tokenizer.token_bytes()
    assert lengths.shape == (tokenizer.vocab_size,) and lengths[tokenizer.eos_id] == 0
    for text in (PROSE, UNICODE):
        ids = tokenizer.encode_batch([text])[0]
        assert lengths[ids].sum() == len(text.encode("utf-8"))


# ---------------------------------------------------------------- corpus


def as_text(byte_tokens: np.ndarray) -> str:
    """Decode byte-tokenizer ids (no end-of-text among them)."""
    return np.asarray(byte_tokens, dtype=np.uint8).tobytes().decode("utf-8")


class CountingTokenizer(Tokenizer):
    """Counts encode calls; ``fail_after`` makes a call raise, as a crash mid-build would."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(byte_tokenizer()._tokenizer)
        self.calls = 0
        self.fail_after = fail_after

    def encode_batch(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        return super().encode_batch(texts)


def many_documents(count: int = 60) -> list[Document]:
    return [Document(f"document {i} " + "words " * (i % 7 + 1), "prose" if i % 3 else "code", f"doc{i}")
            for i in range(count)]


def test_second_build_is_a_cache_hit_with_equal_arrays(tmp_path):
    docs = many_documents()
    first_tok, second_tok = CountingTokenizer(), CountingTokenizer()
    first = build_corpus(docs, first_tok, tmp_path, key="k", val_fraction=0.1, min_units=10)
    second = build_corpus(docs, second_tok, tmp_path, key="k", val_fraction=0.1, min_units=10)
    assert first_tok.calls > 0 and second_tok.calls == 0
    assert not first.cache_hit and second.cache_hit
    for name in ("train_tokens", "val_tokens", "train_docs", "val_docs"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.meta == first.meta and second.domains == ["code", "prose"]
    assert first.dtype == np.uint16 and not first.train_tokens.flags.writeable
    assert first.meta["tokens"]["train"] == len(first.train_tokens)
    assert sum(first.meta["domain_tokens"]["val"].values()) == len(first.val_tokens) > 0
    assert first.meta["documents"] == {"train": 54, "val": 6}  # 2 of 20 code, 4 of 40 prose


def test_content_key_depends_on_every_part():
    assert content_key(["ab", "c"]) != content_key(["a", "bc"])
    assert content_key(["ab", b"c"]) == content_key([b"ab", "c"])


def test_one_big_document_becomes_about_min_units_units(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(3000))
    corpus = build_corpus([Document(text, "text", "input.txt")], byte_tokenizer(), tmp_path, key="big",
                          val_fraction=0.05, min_units=100)
    units = len(corpus.train_docs) + len(corpus.val_docs)
    assert 95 <= units <= 110
    # a small corpus holds out min(100k chars, 10%) rather than 5%: about 10 of the ~100 pieces
    assert 9 <= len(corpus.val_docs) <= 11
    assert len(corpus.train_tokens) + len(corpus.val_tokens) == len(text.encode()) + units
    pieces = [as_text(corpus.train_tokens[s:s + n - 1]) for s, n, _ in corpus.train_docs]
    assert all(piece.endswith("\n") for piece in pieces[:-1])  # cut at line ends


def test_held_out_split_is_by_document(tmp_path):
    docs = [Document(f"unique text number {i:03d}. " * 3, "text", f"d{i}") for i in range(40)]
    corpus = build_corpus(docs, byte_tokenizer(), tmp_path, key="split", val_fraction=0.1, seed=3, min_units=10)
    decode = lambda tokens, rows: [as_text(tokens[s:s + n - 1]) for s, n, _ in rows]  # noqa: E731
    train, val = decode(corpus.train_tokens, corpus.train_docs), decode(corpus.val_tokens, corpus.val_docs)
    assert len(val) == 4 and sorted(train + val) == sorted(d.text for d in docs)
    train_text = "".join(train)
    assert not any(text in train_text for text in val)
    assert np.array_equal(corpus.val_tokens_by_domain("text"), corpus.val_tokens)
    other = build_corpus(docs, byte_tokenizer(), tmp_path, key="split-seed4", val_fraction=0.1, seed=4, min_units=10)
    assert decode(other.val_tokens, other.val_docs) != val


def test_val_documents_override_the_split(tmp_path):
    docs = many_documents(20)
    held = [Document("held out A", "a", "va"), Document("held out B", "b", "vb")]
    corpus = build_corpus(docs, byte_tokenizer(), tmp_path, key="override", val_documents=held)
    assert corpus.meta["documents"] == {"train": 20, "val": 2}
    assert list(corpus.val_tokens_by_domain("b")) == [*b"held out B", 256]
    assert corpus.domains == ["a", "b", "code", "prose"]


def test_interrupted_build_leaves_no_loadable_entry(tmp_path):
    docs = many_documents(2500)  # three encode batches
    with pytest.raises(RuntimeError, match="killed"):
        build_corpus(docs, CountingTokenizer(fail_after=1), tmp_path, key="crash")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FlopwiseError, match="not a complete token cache"):
        TokenCorpus.load(tmp_path / "crash")
    stale, recent = tmp_path / ".tmp-crash-old", tmp_path / ".tmp-crash-new"  # left by killed builds
    for folder in (stale, recent):
        folder.mkdir()
        (folder / "meta.json").write_text("{}")
    os.utime(stale, (0, 0))
    tokenizer = CountingTokenizer()
    corpus = build_corpus(docs, tokenizer, tmp_path, key="crash")
    assert tokenizer.calls >= 3 and not corpus.cache_hit
    assert not stale.exists() and recent.exists()  # a recent one may belong to a running build


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _zero_fill(path):  # same size, a later write
    stat = path.stat()
    path.write_bytes(bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock may not have ticked


@pytest.mark.parametrize("damage, problem", [
    (lambda entry: _truncate(entry / "train.bin", 1000), "train.bin is truncated (1,000 of "),
    (lambda entry: _truncate(entry / "train.bin", 0), "train.bin is truncated (0 of "),
    (lambda entry: _zero_fill(entry / "train.bin"), "train.bin does not match its checksum"),
    (lambda entry: _truncate(entry / "val.bin", 10), "val.bin is truncated (10 of "),
    (lambda entry: _zero_fill(entry / "meta.json"), "meta.json does not match its checksum"),
    (lambda entry: (entry / "train_docs.npy").unlink(), "train_docs.npy is missing"),
    (lambda entry: (entry / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    (lambda entry: (entry / "manifest.json").unlink(), "no manifest.json, so it cannot be verified"),  # an old entry
])
def test_a_damaged_cache_entry_is_refused_or_rebuilt_in_one_line(damage, problem, tmp_path, capsys):
    docs = many_documents(300)
    built = build_corpus(docs, byte_tokenizer(), tmp_path, key="k", val_fraction=0.1, min_units=10)
    arrays = {name: np.array(getattr(built, name)) for name in ("train_tokens", "val_tokens", "train_docs", "val_docs")}
    entry = tmp_path / "k"
    damage(entry)
    with pytest.raises(FlopwiseError) as refused:
        TokenCorpus.load(entry)
    assert str(refused.value).startswith(f"token cache '{entry}' is not intact ({problem}")
    assert str(refused.value).endswith("): delete it and run again to rebuild it from the data")
    capsys.readouterr()
    tokenizer = CountingTokenizer()
    rebuilt = build_corpus(docs, tokenizer, tmp_path, key="k", val_fraction=0.1, min_units=10)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1
    assert warning[0].startswith(f"flopwise: warning: token cache '{entry}' is not intact ({problem}")
    assert warning[0].endswith("): rebuilding it from the data")
    assert tokenizer.calls > 0 and not rebuilt.cache_hit
    for name, array in arrays.items():
        assert np.array_equal(getattr(rebuilt, name), array)
    assert build_corpus(docs, tokenizer, tmp_path, key="k", val_fraction=0.1, min_units=10).cache_hit
    assert sorted(path.name for path in tmp_path.iterdir()) == ["k"]  # the damaged entry is gone


def test_an_untouched_entry_is_opened_without_hashing_and_a_copied_one_is_hashed(tmp_path, monkeypatch):
    """Opening checks sizes always but hashes only files written since the build: a many-GB cache costs a stat
    per file, a copy (new modification times, same bytes) is hashed and used."""
    from flopwise import manifest

    docs = many_documents(300)
    build_corpus(docs, byte_tokenizer(), tmp_path, key="k", val_fraction=0.1, min_units=10)
    hashed = []
    real_sha256 = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    assert build_corpus(docs, byte_tokenizer(), tmp_path, key="k").cache_hit and hashed == []
    for path in (tmp_path / "k").iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert build_corpus(docs, byte_tokenizer(), tmp_path, key="k").cache_hit
    assert sorted(hashed) == ["meta.json", "train.bin", "train_docs.npy", "val.bin", "val_docs.npy"]


def test_cache_files_reach_the_disk_before_the_entry_is_renamed_into_place(tmp_path, monkeypatch):
    from flopwise.data import shards

    events = []
    real_replace = os.replace
    monkeypatch.setattr(shards, "fsync", lambda path: events.append(("fsync", path.name)))
    monkeypatch.setattr(shards.os, "replace", lambda src, dst: events.append(("rename", src.name, dst.name))
                        or real_replace(src, dst))
    build_corpus(many_documents(), byte_tokenizer(), tmp_path, key="k", val_fraction=0.1, min_units=10)
    rename = next(index for index, event in enumerate(events) if event[0] == "rename")
    tmp_name = events[rename][1]
    assert events[rename][2] == "k" and tmp_name.startswith(".tmp-k-")
    assert {name for _, name in events[:rename]} == {*shards.FILES, tmp_name}  # each file, then the folder
    assert events[rename + 1:] == [("fsync", tmp_path.name)]  # then the rename itself


def test_no_text_is_an_error(tmp_path):
    with pytest.raises(FlopwiseError, match="no text"):
        build_corpus([], byte_tokenizer(), tmp_path, key="empty")


# ---------------------------------------------------------------- sampler


TOKENS = np.arange(1001, dtype=np.uint16)  # 100 windows of 10 (+1) tokens


def batches(sampler: PackedSampler, count: int) -> list[torch.Tensor]:
    return [sampler.next_batch()[0] for _ in range(count)]


def test_sampler_batches_are_shifted_windows_and_seeded():
    x, y, domains, segments = PackedSampler(TOKENS, 10, 4, seed=0).next_batch()
    assert segments is None  # attention across the whole window unless data.doc_mask
    assert domains.tolist() == [0, 0, 0, 0]  # one domain
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(x[:, 0] % 10 == 0)
    same = batches(PackedSampler(TOKENS, 10, 4, seed=1), 5)
    assert all(torch.equal(a, b) for a, b in zip(same, batches(PackedSampler(TOKENS, 10, 4, seed=1), 5)))
    assert not torch.equal(same[0], PackedSampler(TOKENS, 10, 4, seed=2).next_batch()[0])


def test_sampler_resumes_exactly_mid_epoch():
    straight = PackedSampler(TOKENS, 10, 3, seed=7)
    expected = batches(straight, 40)
    first = PackedSampler(TOKENS, 10, 3, seed=7)
    batches(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive JSON
    resumed = PackedSampler(TOKENS, 10, 3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 29), expected[11:]))
    assert resumed.domain_epochs() == straight.domain_epochs() == {"domain0": pytest.approx(120 * 10 / 1001)}
    with pytest.raises(FlopwiseError, match="resume with the same data, mixture and model.seq_len"):
        PackedSampler(TOKENS, 20, 3, seed=7).load_state_dict(state)


def test_sampler_crosses_epochs_with_full_batches():
    sampler = PackedSampler(TOKENS, 10, 30, seed=0)
    starts = np.concatenate([(x[:, 0] // 10).numpy() for x in batches(sampler, 10)])  # 3 epochs
    assert sampler.streams[0].epoch == 3 and sampler.streams[0].position == 0
    for epoch in range(3):
        assert sorted(starts[epoch * 100:(epoch + 1) * 100]) == list(range(100))
    assert not np.array_equal(starts[:100], starts[100:200])


def test_two_ranks_split_what_one_rank_with_double_batch_sees():
    single = batches(PackedSampler(TOKENS, 10, 8, seed=5), 20)
    rank0 = batches(PackedSampler(TOKENS, 10, 4, seed=5, rank=0, world_size=2), 20)
    rank1 = batches(PackedSampler(TOKENS, 10, 4, seed=5, rank=1, world_size=2), 20)
    for whole, a, b in zip(single, rank0, rank1):
        assert torch.equal(torch.cat([a, b]), whole)
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())


def test_sampler_needs_one_full_window():
    with pytest.raises(FlopwiseError, match="fewer than model.seq_len \\+ 1 = 11: use a smaller model.seq_len"):
        PackedSampler(np.arange(10), 10, 1, seed=0)
