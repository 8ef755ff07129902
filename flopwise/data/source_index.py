"""Which tokenizer and token cache entry a run's sources gave, found from the files' stamps without reading
them, as make and ccache find their outputs: a cached corpus then starts in a stat of each file.

The token cache (flopwise/data/shards.py) is keyed by the content of the cleaned documents, so finding an entry
that way reads, cleans, deduplicates and hashes every document: seconds for the built-in corpus.  This index
keeps, for each run's data settings, each file its readers opened: its path, its stamp (size, modification and
change times, inode: ``sources.Stamp``) taken before reading it, and the SHA-256 of the bytes read; with the
tokenizer and the cache entry those files gave.  Its key is everything else that decides them: the data
section, the seed, a tokenizer given by a resumed run, the code of the modules that read and tokenize, and
the Python, numpy and tokenizers versions.

What is trusted, and when a file is read:

- An unchanged stamp means unchanged bytes: the file is not opened (git's index, and ccache with
  ``file_stat_matches``, trust the same).  The change time moves with every write and cannot be set back by a
  program, so a rewrite that restores the old modification time (``touch -r``, ``cp -p``) is still noticed.
- A changed stamp with the same size (a touch, a copy, a rewrite with the same length) is hashed: the same
  bytes keep the entry and refresh the index; other bytes read the sources again.
- Another size, a file added, removed or no longer readable, a folder that lists differently: the sources are
  read again, and the tokens are those of the new content (the content-keyed cache may still hold them).
- Timestamps are coarse (a filesystem tick): a file modified within ``RACY_SECONDS`` before it was recorded
  could be written again within the same tick, its stamp unmoved, so it is hashed at every start until a
  start records it again later (git's "racily clean" entries).  A later write to a file modified long before
  sets its modification time to now, which moves its stamp.  A network filesystem that caches attributes,
  or a clock set back, can hide a change for as long as it hides it from make.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import tokenizers

from flopwise.atomic import write_json_atomic
from flopwise.data.config import DataSection
from flopwise.data.hygiene import HygieneReport
from flopwise.data.shards import content_key
from flopwise.data.sources import ReadStats, SeenFile, Stamp, parse_source, source_files
from flopwise.data.tokenizer import Tokenizer, byte_tokenizer
from flopwise.errors import FlopwiseError, warn
from flopwise.manifest import sha256

INDEX_FOLDER = "sources"
FORMAT = 1  # of the index files; part of the key
RACY_SECONDS = 2.0  # a coarse clock's tick, with room (FAT's is 2 s)
# The code that decides the tokens of given files (beside this one): a change to it must not reuse an old entry.
DECIDING_FILES = ("sources.py", "hygiene.py", "tokenizer.py", "shards.py", "pipeline.py")


@dataclass(frozen=True)
class Listing:
    """The files the sources open, in reading order, and the folders that could not be listed."""

    files: list[str]
    unreadable: list[str]


@dataclass
class Entry:
    """One index file: what the sources gave, and the files they were read from."""

    files: list[SeenFile]
    unreadable: list[str]
    recorded_ns: int  # when the files' stamps began to be taken (wall clock, as file times are)
    tokenizer_sha256: str  # of the tokenizer's JSON
    tokenizer_file: str | None  # the cached BPE tokenizer (under the cache root), where one was trained
    corpus: str  # the token cache entry's key
    read: dict[str, Any]  # ReadStats.to_dict() of the full read
    hygiene: dict[str, Any]  # HygieneReport.to_dict() of it

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files": [[f.path, None if f.stamp is None else list(asdict(f.stamp).values()),
                                           f.sha256] for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        files = [SeenFile(str(path), None if stamp is None else Stamp(*map(int, stamp)),
                          None if digest is None else str(digest)) for path, stamp, digest in data["files"]]
        return cls(files, [str(u) for u in data["unreadable"]], int(data["recorded_ns"]),
                   str(data["tokenizer_sha256"]), data["tokenizer_file"], str(data["corpus"]), dict(data["read"]),
                   dict(data["hygiene"]))


@dataclass(frozen=True)
class Recalled:
    """What a hit gives back: the entry, and the tokenizer it names, checked against its hash."""

    entry: Entry
    tokenizer: Tokenizer
    stats: ReadStats
    hygiene: HygieneReport


def index_key(data: DataSection, seed: int, given: Tokenizer | None) -> str:
    """Everything but the files that decides the tokenizer and the tokens."""
    code = [(Path(__file__).parent / name).read_bytes() for name in DECIDING_FILES]
    settings = json.dumps(data.model_dump(mode="json", exclude={"cache_dir"}), sort_keys=True)
    versions = f"format={FORMAT}|python={sys.version}|numpy={numpy.__version__}|tokenizers={tokenizers.__version__}"
    return content_key([versions, settings, f"seed={seed}", tokenizer_sha256(given) if given else "", *code])


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


def index_file(root: Path, key: str) -> Path:
    return root / INDEX_FOLDER / f"{key}.json"


def list_sources(data: DataSection) -> Listing:
    """The files the data's sources open, in the order ``pipeline.read_all`` opens them (train, then
    held-out sources), without opening any."""
    files: list[str] = []
    unreadable: list[str] = []
    for spec in [*data.sources, *data.val_sources]:
        files += [str(path) for path in source_files(parse_source(spec).path, data.include or None, unreadable)]
    return Listing(files, unreadable)


def remember(root: Path, key: str, data: DataSection, recorded_ns: int, stats: ReadStats, hygiene: HygieneReport,
             tokenizer: Tokenizer, tokenizer_file: str | None, corpus: str) -> None:
    """Record what a full read gave.  Where the sources no longer list as they were read (a file added while
    they were read), nothing is recorded: the next run reads them again."""
    listing = list_sources(data)
    if listing.files != [seen.path for seen in stats.seen]:
        return
    entry = Entry(list(stats.seen), listing.unreadable, recorded_ns, tokenizer_sha256(tokenizer), tokenizer_file,
                  corpus, stats.to_dict(), hygiene.to_dict())
    _write(index_file(root, key), entry)


def recall(root: Path, key: str, data: DataSection, given: Tokenizer | None) -> Recalled | None:
    """The entry for ``key`` where every file it read is unchanged (module docstring), else None.  Files that
    were touched without being changed are recorded again with their new stamps."""
    path = index_file(root, key)
    if not path.is_file():
        return None
    try:
        entry = Entry.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        warn(f"source index '{path}' is unreadable: reading the data sources again")
        return None
    checked_ns = time.time_ns()
    try:
        listing = list_sources(data)
    except (OSError, FlopwiseError):  # a source gone or unreadable: the full read names it
        return None
    if listing.files != [seen.path for seen in entry.files] or listing.unreadable != entry.unreadable:
        return None
    verified = _verify(entry)
    if verified is None:
        return None
    files, hashed = verified
    tokenizer = _tokenizer(root, entry, data, given)
    if tokenizer is None:
        return None
    if hashed:  # recorded again: a touched file is trusted by its new stamp, a racy one ages out
        _write(path, Entry(files, entry.unreadable, checked_ns, entry.tokenizer_sha256, entry.tokenizer_file,
                           entry.corpus, entry.read, entry.hygiene))
    return Recalled(entry, tokenizer, ReadStats.from_dict(entry.read), HygieneReport(**entry.hygiene))


def _verify(entry: Entry) -> tuple[list[SeenFile], bool] | None:
    """The files with their stamps now, and whether any had to be hashed, where each holds the bytes it was
    read with; None where one does not."""
    racy_ns = entry.recorded_ns - int(RACY_SECONDS * 1e9)
    now: list[SeenFile] = []
    hashed = False
    for seen in entry.files:
        try:
            stamp = Stamp.of(Path(seen.path))
        except OSError:
            stamp = None
        if stamp == seen.stamp and (stamp is None or stamp.mtime_ns < racy_ns):
            now.append(seen)  # unchanged (or unreadable then and now, with the same stamp)
            continue
        if stamp is None or seen.stamp is None or seen.sha256 is None or stamp.size != seen.stamp.size:
            return None
        try:
            digest = sha256(Path(seen.path))
        except OSError:
            return None
        if digest != seen.sha256:
            return None
        now.append(SeenFile(seen.path, stamp, digest))
        hashed = True
    return now, hashed


def _tokenizer(root: Path, entry: Entry, data: DataSection, given: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer the entry was made with, where it is still the one on hand: the given one, bytes, the
    configured file, or the BPE tokenizer trained and cached then."""
    if given is not None:
        tokenizer = given
    elif data.tokenizer == "byte":
        tokenizer = byte_tokenizer()
    else:
        file = Path(data.tokenizer).expanduser() if data.tokenizer != "bpe" else (
            root / entry.tokenizer_file if entry.tokenizer_file else None)
        if file is None or not file.exists():
            return None
        tokenizer = Tokenizer.load(file)
    return tokenizer if tokenizer_sha256(tokenizer) == entry.tokenizer_sha256 else None


def _write(path: Path, entry: Entry) -> None:
    """Write (or replace) an index file whole.  One that cannot be written (a read-only shared cache, a full
    disk) costs the next run a full read, not this run: it is named in one warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entry.to_dict())
    except OSError as error:
        warn(f"source index '{path}' could not be written ({(error.strerror or str(error)).lower()}): the next run "
             "reads the data sources again")
