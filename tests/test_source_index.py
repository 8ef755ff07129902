"""The source index (flopwise/data/source_index.py): a second run on unchanged files opens the cached corpus
without opening them, and a changed file never gives the tokens of its old content."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flopwise.data import pipeline, source_index, sources
from flopwise.data.config import DataSection
from flopwise.data.pipeline import PreparedData, prepare_data
from flopwise.data.sources import ReadStats, source_files, stdlib_documents

HOUR_NS = 3600 * 10**9
_watched: list[tuple[Path, list[str]]] = []  # (folder, the files opened under it) while a test watches


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watched and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        for folder, opened in _watched:
            if path.startswith(str(folder)):
                opened.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while a test watches


@contextlib.contextmanager
def files_opened_under(folder: Path) -> Iterator[list[str]]:
    """Every file opened under ``folder`` in the block (Python's "open" audit event: io.open and os.open)."""
    opened: list[str] = []
    _watched.append((folder, opened))
    try:
        yield opened
    finally:
        _watched.remove((folder, opened))


def texts(folder: Path, count: int = 6) -> Path:
    """``count`` small text files whose last change is an hour old (so none is "racily" recent)."""
    folder.mkdir()
    for index in range(count):
        (folder / f"doc{index}.txt").write_text(f"document {index}: " + "some words of text here. " * 40)
    age(folder, HOUR_NS)
    return folder


def age(folder: Path, ns: int) -> None:
    for file in folder.iterdir():
        os.utime(file, ns=(time.time_ns() - ns, time.time_ns() - ns))


def settings(folder: Path, cache: Path, **values) -> DataSection:
    return DataSection(sources=[str(folder)], cache_dir=str(cache), **{"tokenizer": "byte", **values})


def same(a: PreparedData, b: PreparedData) -> bool:
    """The same tokenizer, tokens, split and reports."""
    return (a.tokenizer.to_json() == b.tokenizer.to_json() and a.corpus.meta == b.corpus.meta
            and np.array_equal(a.corpus.train_tokens, b.corpus.train_tokens)
            and np.array_equal(a.corpus.val_tokens, b.corpus.val_tokens)
            and a.stats.to_dict() == b.stats.to_dict() and a.hygiene == b.hygiene)


def rewrite_same_size(file: Path) -> None:
    text = file.read_text()
    file.write_text(text.replace("some", "SOME"))
    assert file.stat().st_size == len(text)


def test_a_cache_hit_opens_no_source_file(tmp_path):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache", tokenizer="bpe", vocab_size=300)  # a trained tokenizer, cached
    first = prepare_data(data, seed=0)
    with files_opened_under(folder) as opened:
        second = prepare_data(data, seed=0)
    assert opened == []
    assert second.corpus.cache_hit and second.corpus.path == first.corpus.path and same(first, second)


def test_a_file_changed_in_place_with_its_size_gives_its_new_tokens(tmp_path):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    first = prepare_data(data, seed=0)
    rewrite_same_size(folder / "doc3.txt")
    age(folder, HOUR_NS // 2)  # a later modification time than the recorded one
    second = prepare_data(data, seed=0)
    fresh = prepare_data(settings(folder, tmp_path / "other-cache"), seed=0)  # a full read, no index
    assert second.corpus.path != first.corpus.path and same(second, fresh)
    byte_values = np.concatenate([second.corpus.train_tokens, second.corpus.val_tokens]).astype(np.uint8)
    assert b"SOME" in byte_values.tobytes()  # the byte tokenizer's ids are the bytes


def test_a_rewrite_that_sets_the_old_modification_time_back_is_still_noticed(tmp_path):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    first = prepare_data(data, seed=0)
    file = folder / "doc1.txt"
    before = file.stat()
    rewrite_same_size(file)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))  # as touch -r or cp -p would leave it
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = prepare_data(data, seed=0)
    assert second.corpus.path != first.corpus.path
    assert same(second, prepare_data(settings(folder, tmp_path / "other-cache"), seed=0))


def test_a_touched_file_is_hashed_not_read_and_then_trusted_by_its_new_stamp(tmp_path, monkeypatch):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    first = prepare_data(data, seed=0)
    age(folder, HOUR_NS // 2)  # touched: new times, the same bytes
    hashed: list[str] = []
    real_sha256 = source_index.sha256
    monkeypatch.setattr(source_index, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))

    def no_read(*args):
        raise AssertionError("the sources were read again")
    monkeypatch.setattr(pipeline, "read_all", no_read)
    second = prepare_data(data, seed=0)
    assert sorted(hashed) == [f"doc{index}.txt" for index in range(6)]
    assert second.corpus.path == first.corpus.path and same(first, second)
    hashed.clear()
    assert same(first, prepare_data(data, seed=0)) and hashed == []


def test_a_file_added_or_removed_reads_the_sources_again(tmp_path):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    first = prepare_data(data, seed=0)
    (folder / "new.txt").write_text("a new document " * 50)
    added = prepare_data(data, seed=0)
    assert added.stats.files == 7 and added.corpus.path != first.corpus.path
    assert same(added, prepare_data(settings(folder, tmp_path / "other-cache"), seed=0))
    (folder / "new.txt").unlink()
    removed = prepare_data(data, seed=0)
    assert removed.corpus.path == first.corpus.path and same(first, removed)


def test_a_file_modified_just_before_it_was_recorded_is_hashed_at_every_start(tmp_path, monkeypatch):
    """Within a timestamp's tick it could change again with its stamp unmoved ("racily clean" in git)."""
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    (folder / "doc2.txt").write_text((folder / "doc2.txt").read_text())  # modified now
    prepare_data(data, seed=0)
    hashed: list[str] = []
    real_sha256 = source_index.sha256
    monkeypatch.setattr(source_index, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    for _ in range(2):
        prepare_data(data, seed=0)
    assert hashed == ["doc2.txt", "doc2.txt"]
    hashed.clear()
    monkeypatch.setattr(source_index, "RACY_SECONDS", 0.0)  # as if it had been recorded long after
    prepare_data(data, seed=0)
    assert hashed == []


def test_other_settings_or_seed_do_not_reuse_an_entry(tmp_path):
    folder = texts(tmp_path / "texts")
    first = prepare_data(settings(folder, tmp_path / "cache"), seed=0)
    other_seed = prepare_data(settings(folder, tmp_path / "cache"), seed=1)
    other_split = prepare_data(settings(folder, tmp_path / "cache", val_fraction=0.3), seed=0)
    assert len({first.corpus.path, other_seed.corpus.path, other_split.corpus.path}) == 3
    assert same(other_split, prepare_data(settings(folder, tmp_path / "other-cache", val_fraction=0.3), seed=0))


def test_an_unreadable_index_is_named_and_the_sources_are_read(tmp_path, capsys):
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")
    first = prepare_data(data, seed=0)
    [index] = (tmp_path / "cache" / source_index.INDEX_FOLDER).iterdir()
    index.write_text('{"files": [')
    capsys.readouterr()
    with files_opened_under(folder) as opened:
        again = prepare_data(data, seed=0)
    assert capsys.readouterr().err == (f"flopwise: warning: source index '{index}' is unreadable: reading the data "
                                       "sources again\n")
    assert len(opened) == 6 and same(first, again)
    with files_opened_under(folder) as opened:
        prepare_data(data, seed=0)  # recorded again
    assert opened == []


def test_the_builtin_corpus_lists_the_files_its_reader_opens_in_order(monkeypatch):
    """What lets the built-in corpus hit the index: the stdlib's listing is what its reader opens."""
    monkeypatch.setattr(sources, "_module_docstring", lambda source: None)  # parsing is not what is tested
    stats = ReadStats()
    for _ in stdlib_documents(stats):
        pass
    unreadable: list[str] = []
    listed = source_files("stdlib", None, unreadable)
    assert [seen.path for seen in stats.seen] == [str(path) for path in listed]
    assert listed[0].name == "topics.py" and len(listed) > 500 and unreadable == []
    assert all(seen.sha256 is not None for seen in stats.seen)


@pytest.mark.slow
def test_a_run_on_the_builtin_corpus_opens_no_standard_library_file_the_second_time(tmp_path):
    data = DataSection(cache_dir=str(tmp_path / "cache"))  # the defaults: 'stdlib', BPE
    first = prepare_data(data, seed=0)
    root = Path(sys.modules["os"].__file__).parent
    with files_opened_under(root) as opened:
        second = prepare_data(data, seed=0)
    assert opened == [] and same(first, second)


def test_an_index_that_cannot_be_written_is_named_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """A read-only shared cache holds the token cache entry but takes no index: the run uses the entry."""
    folder = texts(tmp_path / "texts")
    data = settings(folder, tmp_path / "cache")

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(source_index, "write_json_atomic", read_only)
    capsys.readouterr()
    first = prepare_data(data, seed=0)
    index = tmp_path / "cache" / source_index.INDEX_FOLDER / f"{source_index.index_key(data, 0, None)}.json"
    assert capsys.readouterr().err == (f"flopwise: warning: source index '{index}' could not be written (read-only "
                                       "file system): the next run reads the data sources again\n")
    with files_opened_under(folder) as opened:
        again = prepare_data(data, seed=0)
    assert len(opened) == 6 and same(first, again)
