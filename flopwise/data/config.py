"""The data section of a run's config: where the text comes from, how it becomes tokens, and the
ingest hygiene (deduplication and quality filters) applied on the way."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from flopwise.data.hygiene import HygieneSettings
from flopwise.section import in_range, one_or_many


class DataSection(HygieneSettings):
    """Where the text comes from and how it becomes tokens; the ingest filters and deduplication are
    its ``HygieneSettings`` fields.  ``windows``: where pretraining's windows begin, at a fixed stride of the
    token stream or at a document ("doc_start"); ``doc_mask``: attention stays within each document of a
    window (flopwise/data/sampler.py).  Both leave the held-out evaluation as it is."""

    sources: list[str] = ["stdlib"]
    include: list[str] = []
    jsonl_field: str = "text"
    val_sources: list[str] = []
    val_fraction: float = 0.02
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    tokenizer_sample_mb: float = 4.0
    cache_dir: str | None = None
    windows: Literal["stream", "doc_start"] = "stream"
    doc_mask: bool = False

    _lists = field_validator("sources", "include", "val_sources", mode="before")(one_or_many)
    _fraction = in_range("val_fraction", low=0, high=0.5, above=True, below=True)
    # byte-level BPE needs its 256 bytes, the end-of-text token and a merge (MIN_BPE_VOCAB in tokenizer.py)
    _vocab = in_range("vocab_size", low=258)
    _sample = in_range("tokenizer_sample_mb", low=0, above=True)
