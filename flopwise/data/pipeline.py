"""From the data section of a config to a tokenizer and a tokenized, cached corpus.

Tokenizer and shards are cached under a hash of everything that determines them (the texts,
their domains, the tokenizer, the split settings), so a second run re-tokenizes nothing; and the source index
(flopwise/data/source_index.py) finds that cache entry from the files' stamps, so a second run on unchanged
files does not read them either.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flopwise.atomic import write_atomic
from flopwise.data.config import DataSection
from flopwise.data.hygiene import HygieneReport, clean_documents
from flopwise.data.shards import (
    LAYOUT,
    MIN_HELDOUT_CHARS,
    MIN_HELDOUT_SHARE,
    TokenCorpus,
    build_corpus,
    cache_problem,
    content_key,
)
from flopwise.data.source_index import index_key, recall, remember
from flopwise.data.sources import Document, ReadStats, parse_source, read_documents
from flopwise.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from flopwise.errors import FlopwiseError
from flopwise.filelock import held

CORPUS_FOLDER = "corpus"  # the token cache's entries, under the cache root


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    corpus: TokenCorpus
    stats: ReadStats
    hygiene: HygieneReport

    def summary(self) -> dict[str, Any]:
        """What went in and what was kept: read counts (with the files that could not be read), filters
        and duplicates, tokens per domain."""
        meta = self.corpus.meta
        return {"read": self.stats.to_dict(), "hygiene": self.hygiene.to_dict(), "domains": meta["domains"],
                "tokens": meta["tokens"], "domain_tokens": meta["domain_tokens"], "documents": meta["documents"]}


def cache_root(data: DataSection) -> Path:
    """``data.cache_dir``, else ``$FLOPWISE_CACHE``, else ``~/.cache/flopwise``."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    if os.environ.get("FLOPWISE_CACHE"):
        return Path(os.environ["FLOPWISE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "flopwise"


def read_all(specs: list[str], data: DataSection, stats: ReadStats, held_out: bool = False) -> list[Document]:
    documents: list[Document] = []
    for spec in map(parse_source, specs):
        if held_out and spec.weight is not None:
            raise FlopwiseError(f"--val-data '{spec.domain}={spec.path}:{spec.weight:g}': held-out data has no mixture "
                                "weight; drop the ':WEIGHT'")
        documents.extend(read_documents(spec.path, include=data.include or None, jsonl_field=data.jsonl_field,
                                        domain=spec.domain, stats=stats))
    return documents


def prepare_data(data: DataSection, seed: int, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read the sources, get a tokenizer (given, trained and cached, or bytes) and the corpus; where the source
    index knows the files unchanged, open the cached corpus without reading them."""
    if not data.sources:
        raise FlopwiseError("data.sources is empty: pass --data PATH (a file or folder of text) or use 'stdlib'")
    root = cache_root(data)
    key = index_key(data, seed, tokenizer)
    recalled = recall(root, key, data, tokenizer)
    if recalled is not None:
        entry = root / CORPUS_FOLDER / recalled.entry.corpus
        if entry.is_dir() and cache_problem(entry) is None:  # else read, and rebuild it below (with a warning)
            return PreparedData(recalled.tokenizer, TokenCorpus(entry, cache_hit=True), recalled.stats,
                                recalled.hygiene)
    recorded_ns = time.time_ns()  # before the first file's stamp is taken
    stats = ReadStats()
    documents, hygiene = clean_documents(read_all(data.sources, data, stats), data)
    # one ReadStats for both, so what could not be read in a held-out source is reported too
    val_documents = read_all(data.val_sources, data, stats, held_out=True) if data.val_sources else None
    tokenizer_file = None
    if tokenizer is None:
        tokenizer, tokenizer_file = get_tokenizer(data, documents, seed, root)
    corpus_key = content_key(_corpus_parts(documents, val_documents, tokenizer, data, seed))
    corpus = build_corpus(documents, tokenizer, root / CORPUS_FOLDER, key=corpus_key, val_fraction=data.val_fraction,
                          val_documents=val_documents, seed=seed)
    remember(root, key, data, recorded_ns, stats, hygiene, tokenizer, tokenizer_file, corpus_key)
    return PreparedData(tokenizer=tokenizer, corpus=corpus, stats=stats, hygiene=hygiene)


def get_tokenizer(data: DataSection, documents: list[Document], seed: int, root: Path) -> tuple[Tokenizer, str | None]:
    """'byte', 'bpe' (trained on a sample of the data, cached), or a tokenizer.json / HF folder; with the cached
    BPE tokenizer's file under ``root`` (None for the others)."""
    if data.tokenizer == "byte":
        return byte_tokenizer(), None
    if data.tokenizer != "bpe":
        path = Path(data.tokenizer).expanduser()
        if not path.exists():
            raise FlopwiseError(f"data.tokenizer='{data.tokenizer}' is not 'bpe', 'byte' or an existing "
                                "tokenizer.json / tokenizer folder")
        return Tokenizer.load(path), None
    sample = tokenizer_sample(documents, int(data.tokenizer_sample_mb * 1e6), seed)
    key = content_key(["bpe", str(data.vocab_size), *sample])
    name = f"tokenizers/{key}.json"
    cached = root / name
    if cached.is_file():
        return Tokenizer.load(cached), name
    with held(cached.with_name(f".{key}.lock")):  # one process trains it; the others wait, then load it
        if cached.is_file():
            return Tokenizer.load(cached), name
        tokenizer = train_bpe(sample, data.vocab_size)
        write_atomic(cached, tokenizer.to_json())
    return tokenizer, name


def tokenizer_sample(documents: list[Document], max_chars: int, seed: int) -> list[str]:
    """A seeded random sample of whole documents up to ``max_chars`` characters."""
    order = np.random.default_rng(seed).permutation(len(documents))
    sample, total = [], 0
    for index in order:
        text = documents[index].text
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
        if total >= max_chars:
            break
    return sample


def _corpus_parts(documents: list[Document], val_documents: list[Document] | None, tokenizer: Tokenizer,
                  data: DataSection, seed: int) -> list[str]:
    # The split rule's constants are part of the key: a change to them must not reuse an old split.
    settings = (f"val_fraction={data.val_fraction}|seed={seed}|val_sources={bool(val_documents)}|"
                f"heldout_floor={MIN_HELDOUT_CHARS},{MIN_HELDOUT_SHARE}|layout={LAYOUT}")
    parts = [settings, tokenizer.to_json()]
    for document in documents + (val_documents or []):
        parts.extend((document.domain, document.text))
    return parts
