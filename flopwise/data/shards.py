"""The tokenized corpus: token memmaps, a document index and a fixed held-out split, cached.

A cache entry is the folder ``cache_root/<key>`` holding ``train.bin``/``val.bin`` (raw
uint16 or uint32 tokens), ``train_docs.npy``/``val_docs.npy`` (rows of start offset, length
including the end-of-text token, domain id), ``meta.json`` and ``manifest.json``.  It is written under a
temporary name, fsynced and renamed when complete, so an interrupted build never leaves an entry that loads.

The manifest records each file's size, SHA-256 and modification time.  Every open checks the sizes (a stat);
a file whose modification time changed since the build (overwritten, or copied without its times) is also
hashed.  An untouched entry is not re-hashed: the token files are memory-mapped and may be many GB, and
reading them whole at every start would cost more than the run reads of them.  A damaged entry is rebuilt
from the data when the data is at hand (``build_corpus``) and refused in one line otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from flopwise.atomic import fsync, json_text
from flopwise.data.sources import Document
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError, warn
from flopwise.filelock import held
from flopwise.manifest import MANIFEST_FILE, Checksums, files_record, problem

SPLITS = ("train", "val")
DATA_FILES = ("meta.json", *(f"{split}{suffix}" for split in SPLITS for suffix in (".bin", "_docs.npy")))
FILES = (*DATA_FILES, MANIFEST_FILE)
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 24 * 3600  # an older temporary folder belongs to a build that died
BATCH_DOCS = 1000
BATCH_CHARS = 1 << 24
MIN_HELDOUT_CHARS = 100_000  # a small domain still gets this much held-out text ...
MIN_HELDOUT_SHARE = 0.1  # ... unless that would be more than this share of it
# Train documents are stored grouped by domain (stable within a domain), so each domain's tokens are one
# contiguous range that a mixture samples from without copying; part of the cache key via LAYOUT.
LAYOUT = "domain-grouped"


def content_key(parts: Iterable[bytes | str]) -> str:
    """SHA-256 over the parts, each length-prefixed so that ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class TokenCorpus:
    """A cache entry opened read-only: token memmaps plus the document index."""

    def __init__(self, path: Path, cache_hit: bool) -> None:
        self.path = path
        self.cache_hit = cache_hit
        self.meta: dict[str, Any] = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.meta["dtype"])
        self.domains: list[str] = list(self.meta["domains"])
        self.train_tokens = _open_tokens(path / "train.bin", self.dtype)
        self.val_tokens = _open_tokens(path / "val.bin", self.dtype)
        self.train_docs: np.ndarray = np.load(path / "train_docs.npy", allow_pickle=False)
        self.val_docs: np.ndarray = np.load(path / "val_docs.npy", allow_pickle=False)

    @classmethod
    def load(cls, path: str | Path, *, cache_hit: bool = True) -> TokenCorpus:
        """Open a verified entry; a damaged one is refused in one line naming it."""
        path = Path(path)
        if not path.is_dir():
            raise FlopwiseError(f"'{path}' is not a complete token cache: delete it and run again to rebuild")
        damage = cache_problem(path)
        if damage is not None:
            raise FlopwiseError(f"token cache '{path}' is not intact ({damage}): delete it and run again to rebuild it "
                                "from the data")
        return cls(path, cache_hit)

    def train_domain_ranges(self) -> list[tuple[int, int]]:
        """[start, end) token offsets of each domain (in ``domains`` order) in the train split."""
        ranges, end = [], 0
        for domain_id in range(len(self.domains)):
            rows = self.train_docs[self.train_docs[:, 2] == domain_id]
            start, end = (int(rows[0, 0]), int(rows[-1, 0] + rows[-1, 1])) if len(rows) else (end, end)
            ranges.append((start, end))  # a domain with no training text (held-out only) is empty where it would be
        return ranges

    def val_tokens_by_domain(self, domain: str) -> np.ndarray:
        """The held-out tokens of one domain, its documents concatenated in order."""
        if domain not in self.domains:
            raise FlopwiseError(f"domain '{domain}' is not in this corpus: use one of {', '.join(self.domains)}")
        token_domain = np.repeat(self.val_docs[:, 2], self.val_docs[:, 1])
        return np.asarray(self.val_tokens)[token_domain == self.domains.index(domain)]


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def cache_problem(path: Path) -> str | None:
    """Why the entry at ``path`` is not as built (see the module docstring for what is checked), or None."""
    return problem(path, Checksums.CHANGED)


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memmap (numpy cannot map an empty file, so an empty split is an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def build_corpus(documents: Iterable[Document], tokenizer: Tokenizer, cache_root: Path, *, key: str,
                 val_fraction: float = 0.005, val_documents: Iterable[Document] | None = None,
                 seed: int = 0, min_units: int = 100) -> TokenCorpus:
    """Load ``cache_root/key`` if it exists and verifies, else split, tokenize and write it (a damaged entry is
    named in one line on stderr and rebuilt).

    ``key`` must hash everything that determines the result (texts, domains, tokenizer,
    settings); ``content_key`` computes it.  Held-out units are ``val_documents`` if given,
    else a seeded ``val_fraction`` of the units of each domain.
    """
    cache_root = Path(cache_root)
    target = cache_root / key
    if target.exists():
        damage = cache_problem(target)
        if damage is None:
            return TokenCorpus(target, cache_hit=True)  # verified just now: not twice
        warn(f"token cache '{target}' is not intact ({damage}): rebuilding it from the data")
    documents = list(documents)
    if not any(document.text for document in documents):
        raise FlopwiseError("the data sources hold no text to train on: pass files or folders with text in them")
    if val_documents is None:
        train, val = split_heldout(split_units(documents, min_units), val_fraction, seed)
    else:
        train, val = documents, list(val_documents)
    cache_root.mkdir(parents=True, exist_ok=True)
    # one builder per entry; the others wait, then load it (lock files beside the cache, never in it)
    with held(cache_root.with_name(f"{cache_root.name}.locks") / f"{key}.lock"):
        if target.exists() and cache_problem(target) is None:  # another process built it meanwhile
            return TokenCorpus(target, cache_hit=True)
        _remove_stale_tmp(cache_root)
        _remove_entry(target, cache_root)
        tmp = cache_root / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            _write_corpus(tmp, {"train": train, "val": val}, tokenizer)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenCorpus.load(target, cache_hit=False)


def _remove_entry(target: Path, cache_root: Path) -> None:
    """Remove a damaged or partial entry (under its build lock): renamed aside first, so that no reader ever
    opens it half deleted; a reader that has it open keeps its files until it closes them."""
    if not target.exists():
        return
    aside = cache_root / f"{TMP_PREFIX}{target.name}-removed-{uuid.uuid4().hex}"
    os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Flush the entry's files to disk, then rename it into place (so a crash cannot leave an entry whose
    manifest is on disk but whose tokens are not); if another process published the same key first, keep
    theirs."""
    for name in FILES:
        fsync(tmp / name)
    fsync(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
    fsync(target.parent)


def _remove_stale_tmp(cache_root: Path) -> None:
    """Delete temporary folders left by builds that died long ago (recent ones may be running)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for path in cache_root.glob(f"{TMP_PREFIX}*"):
        if path.is_dir() and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)


def split_units(documents: list[Document], min_units: int) -> list[Document]:
    """Cut documents longer than total/min_units characters into pieces of about that size.

    So a corpus of one big file still gets a held-out split of many pieces rather than
    all or nothing.  Cuts fall after a newline when one lies in the second half of a piece.
    """
    chunk = max(1, math.ceil(sum(len(d.text) for d in documents) / max(1, min_units)))
    return [piece for d in documents for piece in _pieces(d, chunk)]


def _pieces(document: Document, chunk: int) -> Iterator[Document]:
    text, start = document.text, 0
    while len(text) - start > chunk:
        newline = text.rfind("\n", start + chunk // 2, start + chunk)
        end = newline + 1 if newline >= 0 else start + chunk
        yield Document(text[start:end], document.domain, document.source)
        start = end
    yield Document(text[start:], document.domain, document.source)


def split_heldout(units: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """A seeded random choice of whole units per domain for the held-out split.

    Each domain gives ``val_fraction`` of its characters, but at least the smaller of
    MIN_HELDOUT_CHARS and MIN_HELDOUT_SHARE of them, so that a small domain (a few hundred
    KB of prose beside 30 MB of code) is still measured on more than a handful of tokens.
    Every domain with two or more units gives at least one and keeps at least one for training.
    """
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        by_domain.setdefault(unit.domain, []).append(index)
    held_out: set[int] = set()
    for domain in sorted(by_domain):
        indices = by_domain[domain]
        chars = sum(len(units[i].text) for i in indices)
        target = max(val_fraction * chars, min(MIN_HELDOUT_CHARS, MIN_HELDOUT_SHARE * chars))
        taken = 0
        for position in rng.permutation(len(indices))[: len(indices) - 1]:
            if taken >= target:
                break
            held_out.add(indices[position])
            taken += len(units[indices[position]].text)
    train = [unit for index, unit in enumerate(units) if index not in held_out]
    val = [unit for index, unit in enumerate(units) if index in held_out]
    return train, val


@dataclass
class _SplitWriter:
    """Appends the tokens of one split to its .bin file and records the document index."""

    path: Path
    dtype: np.dtype
    rows: list[tuple[int, int, int]] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0

    def write(self, ids: list[list[int]], texts: list[str], domain_ids: list[int], eos_id: int) -> None:
        with open(self.path, "ab") as file:
            for document_ids, text, domain_id in zip(ids, texts, domain_ids):
                array = np.array([*document_ids, eos_id], dtype=self.dtype)
                array.tofile(file)
                self.rows.append((self.tokens, len(array), domain_id))
                self.tokens += len(array)
                self.bytes += len(text.encode("utf-8"))

    def index(self) -> np.ndarray:
        return np.array(self.rows, dtype=np.int64).reshape(-1, 3)

    def domain_tokens(self, domains: list[str]) -> dict[str, int]:
        index = self.index()
        counts = np.bincount(index[:, 2], weights=index[:, 1], minlength=len(domains))
        return {domain: int(count) for domain, count in zip(domains, counts)}


def _write_corpus(folder: Path, splits: dict[str, list[Document]], tokenizer: Tokenizer) -> None:
    domains = sorted({d.domain for units in splits.values() for d in units})
    domain_ids = {domain: index for index, domain in enumerate(domains)}
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    writers = {split: _SplitWriter(folder / f"{split}.bin", dtype) for split in SPLITS}
    for split, units in splits.items():
        units = sorted(units, key=lambda unit: domain_ids[unit.domain])  # stable: see LAYOUT
        writers[split].path.touch()
        for batch in _batches(units):
            texts = [unit.text for unit in batch]
            writers[split].write(tokenizer.encode_batch(texts), texts, [domain_ids[u.domain] for u in batch],
                                 tokenizer.eos_id)
        np.save(folder / f"{split}_docs.npy", writers[split].index(), allow_pickle=False)
    meta = {
        "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "domains": domains,
        "tokens": {split: w.tokens for split, w in writers.items()},
        "domain_tokens": {split: w.domain_tokens(domains) for split, w in writers.items()},
        "documents": {split: len(w.rows) for split, w in writers.items()},
        "bytes": {split: w.bytes for split, w in writers.items()},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (folder / MANIFEST_FILE).write_text(json_text(files_record(folder, list(DATA_FILES), with_mtime=True)),
                                        encoding="utf-8")


def _batches(units: list[Document]) -> Iterator[list[Document]]:
    """Groups of up to BATCH_DOCS documents and about BATCH_CHARS characters, to bound memory."""
    batch: list[Document] = []
    chars = 0
    for unit in units:
        if batch and (len(batch) >= BATCH_DOCS or chars + len(unit.text) > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(unit)
        chars += len(unit.text)
    if batch:
        yield batch


def unigram_log_probs(corpus: TokenCorpus) -> np.ndarray:
    """log P(token) from training counts with add-one smoothing (so unseen tokens stay finite)."""
    vocab = int(corpus.meta["vocab_size"])
    counts = np.bincount(np.asarray(corpus.train_tokens), minlength=vocab).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())
