"""Where the text comes from: files, folders, JSONL, Parquet, or the Python standard library.

Every reader yields ``Document`` objects lazily and counts what it read in a ``ReadStats``,
so the user can see how much text was used, how many undecodable bytes were replaced and which
files could not be read (those are left out and named, never skipped silently).
Order is deterministic (folders are walked in sorted order) so a content hash of the
documents identifies the corpus.  Each file read is also noted in ``ReadStats.seen`` with its stat and the
SHA-256 of the bytes read, which lets a later run find its cached corpus without reading the files again
(flopwise/data/source_index.py); ``source_files`` lists the files a source reads, in the order it reads them.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import re
import stat
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.manifest import sha256

REPLACEMENT = "\ufffd"
REPLACEMENT_UTF8 = REPLACEMENT.encode("utf-8")
BINARY_PROBE_BYTES = 8192
MIN_DOCSTRING_CHARS = 200
SKIPPED_DIRS = frozenset({"__pycache__"})
STDLIB_SKIPPED_DIRS = SKIPPED_DIRS | {"site-packages", "dist-packages", "pydoc_data"}
MAX_NAMED = 3  # unreadable entries named in a summary; the count covers the rest
_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON escape like "\\ud800" decodes to one, unencodable


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


def uses_builtin_corpus(specs: list[str]) -> bool:
    """Whether some ``--data`` entry is the built-in standard-library corpus (whose code the built-in
    docstring tasks are made from)."""
    return any(parse_source(spec).path == "stdlib" for spec in specs)


@dataclass(frozen=True)
class Stamp:
    """What a stat says of a file: its size, its modification and change times (ns), its inode and device.  The change
    time moves with every write and every metadata change and cannot be set back by a program, so equal stamps
    are taken to mean the same bytes, as git's index and ccache's ``file_stat_matches`` take them."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        info = path.stat()
        return cls(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


@dataclass(frozen=True)
class SeenFile:
    """A file a reader opened: its stamp taken before reading (None: it could not be stat'ed) and the SHA-256
    of the bytes read (None: it could not be read)."""

    path: str
    stamp: Stamp | None
    sha256: str | None


@dataclass
class ReadStats:
    """What the readers consumed, shown to the user so a wrong source or encoding is noticed.

    ``bytes`` is the UTF-8 size of the documents yielded; ``replaced_bytes`` counts the invalid
    UTF-8 sequences (and unpaired surrogate escapes in JSON) decoded as U+FFFD; ``skipped_binary``
    the files skipped for NUL bytes; ``unreadable`` the files and folders the OS would not read
    (left out), the first ``MAX_NAMED`` of them named in ``unreadable_named`` as 'path (cause)'.
    ``seen``: every file the readers opened, with its stamp and the hash of the bytes read (the source index
    records them; plan.json does not).
    """

    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    skipped_binary: int = 0
    unreadable: int = 0
    unreadable_named: list[str] = field(default_factory=list)
    seen: list[SeenFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The counts and the files named, as plan.json keeps them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seen"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadStats:
        return cls(**data)

    def read_bytes(self, path: Path) -> bytes:
        """``path``'s bytes, noted in ``seen`` (an OSError propagates, noted too)."""
        raw = b""

        def digest() -> str:
            nonlocal raw
            raw = path.read_bytes()
            return hashlib.sha256(raw).hexdigest()
        self._note(path, digest)
        return raw

    def hash_file(self, path: Path) -> None:
        """Note a file that another library reads (Parquet, the imported help topics), hashed before it does."""
        self._note(path, lambda: sha256(path))

    def _note(self, path: Path, digest: Callable[[], str]) -> None:
        """The stamp is taken before the bytes are read: a write after it moves the stamp, so the hash recorded
        is never of bytes newer than the stamp says."""
        try:
            stamp = Stamp.of(path)
        except OSError:
            self.seen.append(SeenFile(str(path), None, None))
            raise
        try:
            value = digest()
        except OSError:
            self.seen.append(SeenFile(str(path), stamp, None))
            raise
        self.seen.append(SeenFile(str(path), stamp, value))

    def left_out(self, entries: list[str]) -> None:
        """Count entries that could not be read; only the first few are named, to keep plan.json small."""
        self.unreadable += len(entries)
        self.unreadable_named += entries[:MAX_NAMED - len(self.unreadable_named)]

    def describe(self) -> str:
        """A clause for the run's data line, e.g. ', 1 binary file(s) skipped, 2 file(s) or folder(s)
        could not be read and were left out: a.txt (permission denied), ...', so nothing is dropped unseen."""
        parts = [f"{self.replaced_bytes} undecodable bytes replaced" if self.replaced_bytes else "",
                 f"{self.skipped_binary} binary file(s) skipped" if self.skipped_binary else "",
                 f"{self.unreadable} file(s) or folder(s) could not be read and were left out: "
                 + _named(self.unreadable_named, self.unreadable) if self.unreadable else ""]
        return "".join(f", {part}" for part in parts if part)


def _named(names: list[str], count: int) -> str:
    """'a (x), b (y), and 3 more': the entries named, then how many were not."""
    return ", ".join(names) + (f", and {count - len(names)} more" if count > len(names) else "")


def read_documents(spec: str, *, include: list[str] | None = None, jsonl_field: str = "text",
                   domain: str | None = None, stats: ReadStats) -> Iterator[Document]:
    """Documents of one source: a text file, a folder, a .jsonl/.parquet file, or 'stdlib'.

    ``include`` filters folder entries by file name glob; ``domain`` overrides the default
    ("text" for files, "prose"/"code" for stdlib).  Entries of a folder that cannot be read are
    left out and counted in ``stats``; raises if the source holds no readable text.
    """
    skipped_before = stats.skipped_binary
    unreadable: list[str] = []
    yielded = False
    for document in _source_documents(spec, include, jsonl_field, domain, stats, unreadable):
        if document.text.strip():
            stats.documents += 1
            stats.bytes += len(document.text.encode("utf-8"))
            yielded = True
            yield document
    stats.left_out(unreadable)
    if yielded:
        return
    if unreadable:
        named = _named(unreadable[:MAX_NAMED], len(unreadable))
        raise FlopwiseError(f"data source '{spec}' could not be read: {len(unreadable)} file(s) or folder(s) "
                            f"failed: {named}: make them readable (permissions, broken or looping symbolic links) "
                            "or remove them")
    skipped = stats.skipped_binary - skipped_before
    note = f" ({skipped} binary files skipped)" if skipped else ""
    raise FlopwiseError(f"data source '{spec}' holds no non-empty text documents{note}: "
                        "pass files with text in them, or check data.include")


def _source_documents(spec: str, include: list[str] | None, jsonl_field: str, domain: str | None,
                      stats: ReadStats, unreadable: list[str]) -> Iterator[Document]:
    """A folder's unreadable entries go to ``unreadable``; an unreadable source itself raises."""
    if spec == "stdlib":
        for document in stdlib_documents(stats):
            yield Document(document.text, domain, document.source) if domain else document
        return
    path = Path(spec).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if isinstance(error, FileNotFoundError) and not path.is_symlink():
            raise FlopwiseError(f"data source '{spec}' does not exist: pass a text file, a folder, "
                                "a .jsonl/.parquet file, or 'stdlib'") from None
        raise _unreadable_source(spec, path, error) from None
    if stat.S_ISDIR(mode):
        for file in _folder_files(path, include, unreadable):
            try:
                yield from _file_documents(file, jsonl_field, domain or "text", stats)
            except OSError as error:
                unreadable.append(_entry(file, error))
    elif stat.S_ISREG(mode):
        try:
            yield from _file_documents(path, jsonl_field, domain or "text", stats)
        except OSError as error:
            raise _unreadable_source(spec, path, error) from None
    else:
        raise FlopwiseError(f"data source '{spec}' is neither a file nor a folder: pass a text file, a folder, "
                            "a .jsonl/.parquet file, or 'stdlib'")


def _cause(path: Path, error: OSError) -> str:
    """The OS's reason in words ('permission denied'); a dangling link also says where it points."""
    if isinstance(error, FileNotFoundError) and path.is_symlink():
        return f"broken symbolic link to '{os.readlink(path)}'"
    return error.strerror.lower() if error.strerror else str(error)


def _entry(path: Path, error: OSError) -> str:
    return f"{path} ({_cause(path, error)})"


def _unreadable_source(spec: str, path: Path, error: OSError) -> FlopwiseError:
    return FlopwiseError(f"data source '{spec}' could not be read: {_cause(path, error)}: make it readable "
                         "(permissions, symbolic links) or pass another path")


def _file_documents(path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    """One file by its extension: JSONL and Parquet give one document per row, text one per file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, field, domain, stats)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, field, domain, stats)
    else:
        raw = stats.read_bytes(path)  # an OSError here leaves the file out (in a folder) or names it (a source)
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


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSON Lines text with their 1-based numbers.  Split on "\n" only: JSON strings
    may hold a raw U+2028 (json.dumps with ensure_ascii=False writes it so), which str.splitlines would cut."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _jsonl_documents(path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    text = decode_counting(stats.read_bytes(path), stats)
    stats.files += 1
    for number, line in jsonl_lines(text):
        value, replaced = _SURROGATE.subn(REPLACEMENT, _jsonl_text(line, field, f"{path}:{number}"))
        stats.replaced_bytes += replaced
        yield Document(value, domain, f"{path}:{number}")


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
    """Rows of one column; a file pyarrow cannot parse is named in one line, not a pyarrow traceback."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise FlopwiseError(f"reading '{path}' needs pyarrow: pip install pyarrow") from None
    stats.hash_file(path)
    with path.open("rb") as handle:  # opened here so an unreadable file raises OSError as for the other formats
        try:
            yield from _parquet_rows(pq.ParquetFile(handle), path, field, domain, stats)
        except pyarrow.ArrowException as error:
            reason = str(error).split(". ")[0].rstrip(".")
            raise FlopwiseError(f"'{path}' is not a valid Parquet file ({reason}): rename it if it holds "
                                "other text, or convert it to Parquet again") from None


def _parquet_rows(parquet, path: Path, field: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise FlopwiseError(f"{path}: no column '{field}' (columns: {', '.join(columns)}): "
                            "set data.jsonl_field to the column holding the text")
    stats.files += 1
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in _parquet_values(batch.column(0), stats):
            row += 1
            if value is not None and not isinstance(value, str):
                raise FlopwiseError(f"{path}: column '{field}' holds {type(value).__name__}, not text: "
                                    "set data.jsonl_field to a string column")
            if value:
                yield Document(value, domain, f"{path}:{row}")


def _parquet_values(column, stats: ReadStats) -> list:
    """A column's Python values; text is decoded from its bytes, so invalid UTF-8 is replaced and
    counted as in text files instead of raising UnicodeDecodeError."""
    import pyarrow

    as_bytes = {"string": pyarrow.binary(), "large_string": pyarrow.large_binary()}.get(str(column.type))
    if as_bytes is None:
        return column.to_pylist()
    return [None if raw is None else decode_counting(raw, stats) for raw in column.view(as_bytes).to_pylist()]


def source_files(spec: str, include: list[str] | None, unreadable: list[str]) -> list[Path]:
    """The files the source at ``spec`` (a path or 'stdlib') opens, in the order its reader opens them, found
    without opening any; folders that cannot be listed go to ``unreadable`` as its reader's do."""
    if spec == "stdlib":
        return [topics_file(), *stdlib_files(unreadable)]
    path = Path(spec).expanduser()
    return list(_folder_files(path, include, unreadable)) if path.is_dir() else [path]


def _folder_files(folder: Path, include: list[str] | None, unreadable: list[str]) -> Iterator[Path]:
    """A folder's files that ``include`` lets through (all where it is None), hidden ones left out."""
    for file in _walk_files(folder, SKIPPED_DIRS, skip_hidden=True, unreadable=unreadable):
        if include is None or any(fnmatch.fnmatch(file.name, pattern) for pattern in include):
            yield file


def _walk_files(root: Path, skipped_dirs: frozenset[str], skip_hidden: bool,
                unreadable: list[str]) -> Iterator[Path]:
    """Files under ``root`` in sorted order.  Linked folders are followed (their files are data too),
    but no folder is entered twice, so a link cycle ends; folders that cannot be listed go to
    ``unreadable``, and ``root`` itself unreadable raises."""
    def failed(error: OSError) -> None:
        if error.filename == str(root):
            raise _unreadable_source(str(root), root, error)
        unreadable.append(_entry(Path(error.filename), error))

    seen = {_identity(root)}
    for dirpath, dirnames, filenames in os.walk(root, onerror=failed, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if d not in skipped_dirs and not (skip_hidden and d.startswith("."))):
            try:
                identity = _identity(Path(dirpath) / name)
            except OSError as error:
                unreadable.append(_entry(Path(dirpath) / name, error))
                continue
            if identity not in seen:
                seen.add(identity)
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if not (skip_hidden and name.startswith(".")):
                yield Path(dirpath) / name


def _identity(folder: Path) -> tuple[int, int]:
    info = folder.stat()
    return info.st_dev, info.st_ino


def stdlib_documents(stats: ReadStats) -> Iterator[Document]:
    """The running Python's standard library as a built-in corpus with two domains.

    "prose": the ``pydoc_data`` help topics (English reference text), then the module
    docstrings of non-test files; "code": every ``.py`` file.  Each file is read once and
    yields its code document followed by its docstring, so the first few documents already
    cover both domains.  Deterministic for a given Python version.  Unreadable files are left out
    and counted in ``stats``.
    """
    import pydoc_data.topics

    stats.hash_file(topics_file())
    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield Document(topics[key], "prose", f"pydoc_data.topics:{key}")
    root = stdlib_root()
    unreadable: list[str] = []
    for path in stdlib_files(unreadable):
        try:
            raw = stats.read_bytes(path)
        except OSError as error:
            unreadable.append(_entry(path, error))
            continue
        stats.files += 1
        source = decode_counting(raw, stats, _declared_encoding(raw))
        yield Document(source, "code", str(path))
        docstring = None if _is_test_file(path.relative_to(root)) else _module_docstring(source)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            yield Document(docstring, "prose", f"{path}:docstring")
    stats.left_out(unreadable)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def topics_file() -> Path:
    """The file of the ``pydoc_data.topics`` module (the help topics), found without importing it."""
    return Path(importlib.util.find_spec("pydoc_data.topics").origin)


def stdlib_files(unreadable: list[str]) -> Iterator[Path]:
    """The standard library's ``.py`` files in sorted order (the built-in corpus's code)."""
    return (path for path in _walk_files(stdlib_root(), STDLIB_SKIPPED_DIRS, skip_hidden=False, unreadable=unreadable)
            if path.suffix == ".py")


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
