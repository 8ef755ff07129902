"""Where the text comes from: files, folders, JSONL, Parquet, or the Python standard library.

Every reader yields ``Document`` objects lazily and counts what it read in a ``ReadStats``,
so the user can see how much text was used and how many undecodable bytes were replaced.
Order is deterministic (folders are walked in sorted order) so a content hash of the
documents identifies the corpus.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import json
import os
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flopwise.errors import FlopwiseError

REPLACEMENT = "\ufffd"
REPLACEMENT_UTF8 = REPLACEMENT.encode("utf-8")
BINARY_PROBE_BYTES = 8192
MIN_DOCSTRING_CHARS = 200
SKIPPED_DIRS = frozenset({"__pycache__"})
STDLIB_SKIPPED_DIRS = SKIPPED_DIRS | {"site-packages", "dist-packages", "pydoc_data"}


@dataclass(frozen=True)
class Document:
    """One unit of text; ``domain`` drives mixtures and per-domain evaluation."""

    text: str
    domain: str
    source: str


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` entry: ``PATH``, ``NAME=PATH`` (its documents form domain NAME) or
    ``NAME=PATH:WEIGHT`` (and that domain gets this share of the training tokens)."""

    path: str
    domain: str | None = None
    weight: float | None = None


_NAMED = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)=(?P<rest>.+)$")
_WEIGHTED = re.compile(r"^(?P<path>.+):(?P<weight>\d+(?:\.\d*)?(?:[eE]-?\d+)?|\.\d+)$")


def parse_source(spec: str) -> SourceSpec:
    """A path that exists is read as a path, whatever it looks like."""
    exists = Path(spec).exists()
    named = None if exists else _NAMED.match(spec)
    if not named:
        if _WEIGHTED.match(spec) and not exists:
            raise FlopwiseError(f"data source '{spec}' has a weight but no domain name: write NAME=PATH:WEIGHT, "
                                "e.g. --data docs=./docs:0.7")
        return SourceSpec(spec)
    rest = named.group("rest")
    weighted = _WEIGHTED.match(rest)
    if weighted and not Path(rest).exists():
        return SourceSpec(weighted.group("path"), named.group("name"), float(weighted.group("weight")))
    return SourceSpec(rest, named.group("name"))


@dataclass
class ReadStats:
    """What the readers consumed, shown to the user so a wrong source or encoding is noticed.

    ``bytes`` is the UTF-8 size of the documents yielded; ``replaced_bytes`` counts the invalid
    UTF-8 sequences decoded as U+FFFD; ``skipped_binary`` the files skipped for NUL bytes.
    """

    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    skipped_binary: int = 0


def read_documents(spec: str, *, include: list[str] | None = None, jsonl_field: str = "text",
                   domain: str | None = None, stats: ReadStats) -> Iterator[Document]:
    """Documents of one source: a text file, a folder, a .jsonl/.parquet file, or 'stdlib'.

    ``include`` filters folder entries by file name glob; ``domain`` overrides the default
    ("text" for files, "prose"/"code" for stdlib).  Raises if the source holds no text.
    """
    skipped_before = stats.skipped_binary
    yielded = False
    for document in _source_documents(spec, include, jsonl_field, domain, stats):
        if document.text.strip():
            stats.documents += 1
            stats.bytes += len(document.text.encode("utf-8"))
            yielded = True
            yield document
    if not yielded:
        skipped = stats.skipped_binary - skipped_before
        note = f" ({skipped} binary files skipped)" if skipped else ""
        raise FlopwiseError(f"data source '{spec}' holds no non-empty text documents{note}: "
                            "pass files with text in them, or check data.include")


def _source_documents(spec: str, include: list[str] | None, jsonl_field: str, domain: str | None,
                      stats: ReadStats) -> Iterator[Document]:
    if spec == "stdlib":
        for document in stdlib_documents(stats):
            yield Document(document.text, domain, document.source) if domain else document
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        for file in _walk_files(path, SKIPPED_DIRS, skip_hidden=True):
            if include is None or any(fnmatch.fnmatch(file.name, pattern) for pattern in include):
                yield from _file_documents(file, jsonl_field, domain or "text", stats)
    elif path.is_file():
        yield from _file_documents(path, jsonl_field, domain or "text", stats)
    else:
        raise FlopwiseError(f"data source '{spec}' does not exist: pass a text file, a folder, "
                            "a .jsonl/.parquet file, or 'stdlib'")


def _file_documents(path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    """One file by its extension: JSONL and Parquet give one document per row, text one per file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, field, domain, stats)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, field, domain, stats)
    else:
        raw = path.read_bytes()
        if b"\0" in raw[:BINARY_PROBE_BYTES]:
            stats.skipped_binary += 1
            return
        stats.files += 1
        yield Document(decode_counting(raw, stats, encoding="utf-8-sig"), domain, str(path))


def decode_counting(raw: bytes, stats: ReadStats, encoding: str = "utf-8") -> str:
    """Decode with errors='replace', adding the number of U+FFFD introduced to ``stats``.

    A U+FFFD already in the file is the valid sequence EF BF BD, which no invalid sequence
    can swallow, so the difference of the two counts is exactly the replacements made.
    """
    text = raw.decode(encoding, errors="replace")
    stats.replaced_bytes += text.count(REPLACEMENT) - raw.count(REPLACEMENT_UTF8)
    return text


def _jsonl_documents(path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    stats.files += 1
    text = decode_counting(path.read_bytes(), stats)
    # split on "\n" only: JSON strings may hold raw U+2028, which str.splitlines would cut
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield Document(_jsonl_text(line, field, f"{path}:{number}"), domain, f"{path}:{number}")


def _jsonl_text(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise FlopwiseError(f"{where}: invalid JSON ({error.msg}): write one JSON object per line") from None
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise FlopwiseError(f"{where}: no string field '{field}': give each line a '{field}' field "
                            "or set data.jsonl_field to the field holding the text")
    return value


def _parquet_documents(path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FlopwiseError(f"reading '{path}' needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise FlopwiseError(f"{path}: no column '{field}' (columns: {', '.join(columns)}): "
                            "set data.jsonl_field to the column holding the text")
    stats.files += 1
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None and not isinstance(value, str):
                raise FlopwiseError(f"{path}: column '{field}' holds {type(value).__name__}, not text: "
                                    "set data.jsonl_field to a string column")
            if value:
                yield Document(value, domain, f"{path}:{row}")


def _walk_files(root: Path, skipped_dirs: frozenset[str], skip_hidden: bool) -> Iterator[Path]:
    """Files under ``root`` in sorted order (directories pruned in place, so none is entered twice)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skipped_dirs and not (skip_hidden and d.startswith(".")))
        for name in sorted(filenames):
            if not (skip_hidden and name.startswith(".")):
                yield Path(dirpath) / name


def stdlib_documents(stats: ReadStats) -> Iterator[Document]:
    """The running Python's standard library as a built-in corpus with two domains.

    "prose": the ``pydoc_data`` help topics (English reference text), then the module
    docstrings of non-test files; "code": every ``.py`` file.  Each file is read once and
    yields its code document followed by its docstring, so the first few documents already
    cover both domains.  Deterministic for a given Python version.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield Document(topics[key], "prose", f"pydoc_data.topics:{key}")
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk_files(root, STDLIB_SKIPPED_DIRS, skip_hidden=False):
        if path.suffix != ".py":
            continue
        stats.files += 1
        raw = path.read_bytes()
        source = decode_counting(raw, stats, _declared_encoding(raw))
        yield Document(source, "code", str(path))
        docstring = None if _is_test_file(path.relative_to(root)) else _module_docstring(source)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            yield Document(docstring, "prose", f"{path}:docstring")


def _declared_encoding(raw: bytes) -> str:
    """A source file's PEP 263 encoding (a few stdlib test files are deliberately not UTF-8)."""
    try:
        return tokenize.detect_encoding(io.BytesIO(raw).readline)[0]
    except SyntaxError:
        return "utf-8"


def _is_test_file(relative: Path) -> bool:
    """Test suites are mostly code fragments and slow to parse; their docstrings are skipped."""
    folders = relative.parts[:-1]
    return relative.name.startswith("test_") or any(p in ("test", "tests") or p.endswith("_test") for p in folders)


def _module_docstring(source: str) -> str | None:
    try:
        return ast.get_docstring(ast.parse(source))
    except (SyntaxError, ValueError):  # py2-only files and stray NUL bytes
        return None
