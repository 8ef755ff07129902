"""Data that cannot be read: left out, counted and named, or one clear line (exit 2), never skipped
silently and never a traceback.

Tests run as root, where chmod 000 does not stop a read: unreadable entries are real symbolic-link
loops (ELOOP) and dangling links; a permission error is simulated by a narrow monkeypatch.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from flopwise.cli import main
from flopwise.data.sources import ReadStats, read_documents
from tests.helpers import run_error

PROSE = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n") * 40



def data_summary(capsys, folder: Path, out: Path) -> dict:
    assert main(["data", "--data", str(folder), "--tokenizer", "byte", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    return json.loads(out.read_text())


def loop(folder: Path, first: str = "a", second: str = "b") -> None:
    """Two links pointing at each other: reading either gives ELOOP, even as root."""
    (folder / first).symlink_to(second)
    (folder / second).symlink_to(first)


def deny(monkeypatch, owner: object, name: str, target: Path) -> None:
    """``owner.name(path)`` (``os.scandir``, ``Path.read_bytes``) fails with EACCES for ``target`` only,
    as for a user without permission."""
    real = getattr(owner, name)

    def denied(path, *args, **kwargs):
        if os.fspath(path) == str(target):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(owner, name, denied)


def test_unreadable_files_in_a_folder_are_left_out_counted_and_named(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "ok.txt").write_text(PROSE)
    loop(folder)
    (folder / "c.txt").symlink_to("nowhere.txt")
    (folder / "d.txt").symlink_to("d.txt")

    summary = data_summary(capsys, folder, tmp_path / "summary.json")
    read = summary["read"]
    assert (read["files"], read["documents"], read["unreadable"]) == (1, 1, 4)
    assert read["unreadable_named"] == [f"{folder / 'a'} (too many levels of symbolic links)",
                                        f"{folder / 'b'} (too many levels of symbolic links)",
                                        f"{folder / 'c.txt'} (broken symbolic link to 'nowhere.txt')"]

    stats = ReadStats()
    assert [d.text for d in read_documents(str(folder), stats=stats)] == [PROSE]
    assert stats.describe() == (f", 4 file(s) or folder(s) could not be read and were left out: "
                                f"{', '.join(read['unreadable_named'])}, and 1 more")


def test_unlistable_subfolder_is_left_out_and_named(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "texts"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "hidden.txt").write_text(PROSE)
    (folder / "ok.txt").write_text(PROSE)
    deny(monkeypatch, os, "scandir", folder / "locked")

    read = data_summary(capsys, folder, tmp_path / "summary.json")["read"]
    assert (read["documents"], read["unreadable"]) == (1, 1)
    assert read["unreadable_named"] == [f"{folder / 'locked'} (permission denied)"]


def test_linked_folders_are_read_and_link_cycles_end(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "linked.txt").write_text("linked text")
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "own.txt").write_text("own text")
    (folder / "link").symlink_to(outside)
    (folder / "sub" / "up").symlink_to("..")  # a cycle: must not be entered again

    stats = ReadStats()
    texts = [d.text for d in read_documents(str(folder), stats=stats)]
    assert texts == ["linked text", "own text"]
    assert stats.unreadable == 0


def test_folder_with_nothing_readable_names_it_and_the_cause(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    loop(folder)
    err = run_error(capsys, ["data", "--data", str(folder), "--tokenizer", "byte"])
    assert f"data source '{folder}' could not be read: 2 file(s) or folder(s) failed" in err
    assert f"{folder / 'a'} (too many levels of symbolic links)" in err
    assert "holds no non-empty" not in err


def test_unlistable_folder_source_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "ok.txt").write_text(PROSE)
    deny(monkeypatch, os, "scandir", folder)
    err = run_error(capsys, ["data", "--data", str(folder), "--tokenizer", "byte"])
    assert f"data source '{folder}' could not be read: permission denied" in err


@pytest.mark.parametrize("make, cause", [
    (lambda path: loop(path.parent, path.name, "other"), "too many levels of symbolic links"),
    (lambda path: path.symlink_to("gone.txt"), "broken symbolic link to 'gone.txt'"),
], ids=["link-loop", "dangling-link"])
def test_unreadable_file_source_is_one_line_with_the_cause(tmp_path, capsys, make, cause):
    path = tmp_path / "input.txt"
    make(path)
    err = run_error(capsys, ["data", "--data", str(path), "--tokenizer", "byte"])
    assert f"data source '{path}' could not be read: {cause}" in err


def test_file_source_without_permission_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "input.txt"
    path.write_text(PROSE)
    deny(monkeypatch, Path, "read_bytes", path)
    err = run_error(capsys, ["data", "--data", str(path), "--tokenizer", "byte"])
    assert f"data source '{path}' could not be read: permission denied" in err


@pytest.mark.parametrize("name, content, expected", [
    ("x.parquet", "just some text\n", "'{path}' is not a valid Parquet file (Parquet magic bytes not found in footer)"),
    ("x.jsonl", '{"text": "fine"}\n{"text": "cut\n', "{path}:2: invalid JSON"),
    ("x.jsonl", '{"text": "fine"}\n["a list"]\n', "{path}:2: no string field 'text'"),
], ids=["text-named-parquet", "cut-json-line", "json-line-not-an-object"])
def test_malformed_file_is_one_line_naming_it(tmp_path, capsys, name, content, expected):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "ok.txt").write_text(PROSE)
    path = folder / name
    path.write_text(content)
    for source in (path, folder):
        err = run_error(capsys, ["data", "--data", str(source), "--tokenizer", "byte"])
        assert expected.format(path=path) in err


def test_undecodable_text_in_jsonl_and_parquet_is_replaced_and_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "lone \\ud800 surrogate"}\n')
    stats = ReadStats()
    assert [d.text for d in read_documents(str(jsonl), stats=stats)] == ["lone \ufffd surrogate"]
    assert stats.replaced_bytes == 1

    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 3, 0, 0, 0]))  # one string of 3 bytes, invalid UTF-8
    column = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"a\xffb")])
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": column}), parquet)
    stats = ReadStats()
    assert [d.text for d in read_documents(str(parquet), stats=stats)] == ["a\ufffdb"]
    assert stats.replaced_bytes == 1
