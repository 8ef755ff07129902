"""Quality filters and deduplication of the documents at ingest, with a report for the data summary.

Duplicated text wastes compute and inflates memorization; near-duplicates that straddle the
train/validation split also make the held-out loss optimistic (Lee et al. 2022, "Deduplicating
training data makes language models better").  Everything here is deterministic: the same
documents and settings keep the same documents in the same order, in any process.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import model_validator

from flopwise.data.sources import Document
from flopwise.errors import FlopwiseError
from flopwise.section import Section

DEDUP_MODES = ("none", "exact", "near")
PRIME = (1 << 31) - 1  # hash values live in [0, PRIME): a*h + b < 2**62, so int64 arithmetic is exact
RADIX = 1_000_003  # polynomial base combining token hashes into a shingle hash
MINHASH_SEED = 20220714
CHUNK_SHINGLES = 8192  # shingles hashed per numpy pass: a (num_perm, CHUNK_SHINGLES) int64 buffer
_WORD = re.compile(r"\w+")
_NOT_SYMBOL = re.compile(r"[^\W_]+|\s+")  # alphanumeric (\w without "_") or whitespace runs


class HygieneSettings(Section):
    """What to filter and how to deduplicate; the defaults only remove exact duplicates.  The data
    section (flopwise/data/config.py) extends it, so these are ``data.`` keys.

    ``near_threshold`` is a Jaccard similarity of word ``shingle_words``-gram sets; every filter
    is off at its default.  Invalid values raise ``FlopwiseError`` naming the ``data.`` field.
    """

    dedup: str = "exact"
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5
    min_chars: int = 0
    max_symbol_ratio: float = 1.0
    max_line_chars: int = 0
    max_duplicate_line_share: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _valid(cls, data: Any) -> Any:
        """Checked as given (before pydantic would turn 64.0 into 64), naming the ``data.`` field."""
        if not isinstance(data, dict):
            return data
        given = {name: data.get(name, field.default) for name, field in HygieneSettings.model_fields.items()}
        if given["dedup"] not in DEDUP_MODES:
            _invalid("dedup", given["dedup"], "must be 'none', 'exact' or 'near'")
        if not _is_number(given["near_threshold"]) or not 0 < given["near_threshold"] <= 1:
            _invalid("near_threshold", given["near_threshold"],
                     "must be a Jaccard similarity in (0, 1], e.g. 0.8")
        if not _is_int(given["num_perm"]) or given["num_perm"] < 4 or not _bandings(given["num_perm"]):
            _invalid("num_perm", given["num_perm"],
                     "must be a whole number >= 4 that splits into LSH bands of 2 or more rows: "
                     "use e.g. 64, 128 or 256")
        if not _is_int(given["shingle_words"]) or given["shingle_words"] < 1:
            _invalid("shingle_words", given["shingle_words"], "must be a whole number of words >= 1, e.g. 5")
        for field in ("min_chars", "max_line_chars"):
            value = given[field]
            if not _is_int(value) or value < 0:
                _invalid(field, value, "must be a whole number >= 0 (0 turns the filter off)")
        for field in ("max_symbol_ratio", "max_duplicate_line_share"):
            value = given[field]
            if not _is_number(value) or not 0 <= value <= 1:
                _invalid(field, value, "must be a share in [0, 1] (1.0 turns the filter off)")
        return data


@dataclass
class HygieneReport:
    """What cleaning removed, overall, by reason and by domain, so a too-eager filter is noticed.

    ``filtered`` lists every enabled filter, a document counting under the first that removed it.
    """

    documents_in: int
    documents_out: int
    exact_duplicates: int
    near_duplicates: int
    filtered: dict[str, int]
    per_domain: dict[str, dict[str, int]]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A clause for the run's data line, e.g. ', 46 exact and 28 near duplicates and 107 filtered removed'."""
        parts = [f"{count} {name}" for name, count in (("exact duplicate(s)", self.exact_duplicates),
                                                       ("near duplicate(s)", self.near_duplicates),
                                                       ("filtered", sum(self.filtered.values()))) if count]
        return f", removed {', '.join(parts)} of {self.documents_in:,} documents" if parts else ""


def clean_documents(documents: Sequence[Document],
                    settings: HygieneSettings) -> tuple[list[Document], HygieneReport]:
    """Filters, then exact dedup, then near dedup; kept documents stay in order, the first of a group wins."""
    filters = [(name, test) for name, enabled, test in _FILTERS if enabled(settings)]
    filtered = {name: 0 for name, _ in filters}
    kept: list[Document] = []
    for document in documents:
        failed = next((name for name, test in filters if test(document.text, settings)), None)
        if failed is None:
            kept.append(document)
        else:
            filtered[failed] += 1
    exact = near = 0
    if settings.dedup != "none":
        before = len(kept)
        kept = _drop_exact_duplicates(kept)
        exact = before - len(kept)
    if settings.dedup == "near":
        before = len(kept)
        kept = _drop_near_duplicates(kept, settings)
        near = before - len(kept)
    report = HygieneReport(documents_in=len(documents), documents_out=len(kept), exact_duplicates=exact,
                           near_duplicates=near, filtered=filtered, per_domain=_per_domain(documents, kept))
    return kept, report


# ---------------------------------------------------------------- filters


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither alphanumeric nor whitespace (markup, tables, line noise)."""
    return len(_NOT_SYMBOL.sub("", text)) / len(text) if text else 0.0


def mean_line_chars(text: str) -> float:
    """Mean characters per line: very long lines mean minified code or machine-generated data."""
    lines = text.splitlines()
    return sum(map(len, lines)) / len(lines) if lines else 0.0


def duplicate_line_share(text: str) -> float:
    """Share of non-blank lines repeating an earlier line of the same text (boilerplate, logs; Gopher)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


# name, whether the settings enable it, whether it removes a text; checked in this order
_FILTERS: tuple[tuple[str, Callable[[HygieneSettings], bool], Callable[[str, HygieneSettings], bool]], ...] = (
    ("min_chars", lambda s: s.min_chars > 0,
     lambda text, s: len(text.strip()) < s.min_chars),
    ("max_symbol_ratio", lambda s: s.max_symbol_ratio < 1,
     lambda text, s: symbol_ratio(text) > s.max_symbol_ratio),
    ("max_line_chars", lambda s: s.max_line_chars > 0,
     lambda text, s: mean_line_chars(text) > s.max_line_chars),
    ("max_duplicate_line_share", lambda s: s.max_duplicate_line_share < 1,
     lambda text, s: duplicate_line_share(text) > s.max_duplicate_line_share),
)


# ---------------------------------------------------------------- exact duplicates


def exact_key(text: str) -> bytes:
    """A stable digest of the text with line endings, trailing spaces and outer blank lines normalized."""
    normalized = "\n".join(line.rstrip() for line in text.splitlines()).strip()
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _drop_exact_duplicates(documents: list[Document]) -> list[Document]:
    seen: set[bytes] = set()
    kept = []
    for document in documents:
        key = exact_key(document.text)
        if key not in seen:
            seen.add(key)
            kept.append(document)
    return kept


# ---------------------------------------------------------------- near duplicates


def minhash_signatures(texts: Sequence[str], num_perm: int, shingle_words: int) -> np.ndarray:
    """MinHash signatures (Broder 1997) of the word-shingle sets, shape (len(texts), num_perm).

    Shingles are ``shingle_words`` consecutive lowercased ``\\w+`` tokens (a shorter text is one
    shingle of all its words); each token is hashed with CRC-32 and a shingle is the polynomial
    of its tokens mod 2**31-1, so hashes are stable across processes.  The permutations are
    (a*h + b) mod 2**31-1 with seeded a, b, evaluated exactly in int64 over chunks of shingles.
    The fraction of equal entries of two rows estimates the Jaccard similarity of the sets.
    A text without words gets a row of PRIME, which matches no text with words.
    """
    shingles, starts, has_words = _shingle_hashes(texts, shingle_words)
    rng = np.random.default_rng(MINHASH_SEED)
    a = rng.integers(1, PRIME, size=(num_perm, 1), dtype=np.int64)
    b = rng.integers(0, PRIME, size=(num_perm, 1), dtype=np.int64)
    signature = np.full((num_perm, len(starts)), PRIME, dtype=np.int64)
    buffer = np.empty((num_perm, CHUNK_SHINGLES), dtype=np.int64)
    for begin in range(0, len(shingles), CHUNK_SHINGLES):
        chunk = shingles[begin:begin + CHUNK_SHINGLES]
        values = buffer[:, :len(chunk)]
        np.multiply(a, chunk, out=values)
        values += b
        np.remainder(values, PRIME, out=values)
        # the texts whose shingles overlap this chunk, and where each starts inside it
        first = np.searchsorted(starts, begin, side="right") - 1
        last = np.searchsorted(starts, begin + len(chunk), side="left")
        local = np.maximum(starts[first:last] - begin, 0)
        mins = np.minimum.reduceat(values, local, axis=1)
        np.minimum(signature[:, first:last], mins, out=signature[:, first:last])
    result = np.full((len(texts), num_perm), PRIME, dtype=np.int64)
    result[has_words] = signature.T
    return result


def _shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All shingle hashes concatenated, the offset of each worded text's first one, and which texts have words."""
    token_hash = _TokenHashes()
    hashes: list[int] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for index, text in enumerate(texts):
        tokens = _WORD.findall(text.lower())
        counts[index] = len(tokens)
        hashes.extend(map(token_hash.__getitem__, tokens))
    has_words = counts > 0
    counts = counts[has_words]
    token_starts = np.cumsum(counts) - counts
    tokens = np.concatenate([np.array(hashes, dtype=np.int64), np.zeros(n - 1, dtype=np.int64)])
    # window[j] after step w hashes tokens j..j+w-1; a text shorter than n words takes its whole-text window
    window = np.zeros(len(hashes), dtype=np.int64)
    short_values = np.zeros(len(counts), dtype=np.int64)
    for width in range(1, n + 1):
        window = (window * RADIX + tokens[width - 1:width - 1 + len(hashes)]) % PRIME
        short = counts == width
        short_values[short] = window[token_starts[short]]
    per_text = np.maximum(counts - n + 1, 1)
    starts = np.cumsum(per_text) - per_text
    positions = np.arange(per_text.sum(), dtype=np.int64) + np.repeat(token_starts - starts, per_text)
    shingles = window[positions]
    short = counts < n
    shingles[starts[short]] = short_values[short]
    return shingles, starts, has_words


class _TokenHashes(dict):
    """CRC-32 of each distinct token, computed once (most tokens repeat)."""

    def __missing__(self, token: str) -> int:
        value = zlib.crc32(token.encode("utf-8", "surrogatepass")) % PRIME
        self[token] = value
        return value


def _bandings(num_perm: int) -> list[tuple[int, int]]:
    """(bands, rows) with bands * rows == num_perm and at least 2 bands of at least 2 rows."""
    return [(num_perm // rows, rows) for rows in range(2, num_perm // 2 + 1) if num_perm % rows == 0]


def lsh_banding(num_perm: int, threshold: float) -> tuple[int, int]:
    """The banding whose S-curve threshold (1/b)^(1/r) is the highest not above ``threshold``.

    Erring low favours recall: pairs that collide in a band are verified afterwards, so a
    lower LSH threshold costs only comparisons, while a higher one silently misses duplicates.
    """
    options = sorted(_bandings(num_perm), key=lambda banding: (1 / banding[0]) ** (1 / banding[1]))
    below = [banding for banding in options if (1 / banding[0]) ** (1 / banding[1]) <= threshold]
    return below[-1] if below else options[0]


def _drop_near_duplicates(documents: list[Document], settings: HygieneSettings) -> list[Document]:
    """MinHash LSH (Broder 1997; as in Lee et al. 2022): a document is dropped when its estimated
    Jaccard similarity to an earlier kept document is at least ``near_threshold``.

    Only kept documents enter the LSH buckets, so a large group of near-copies costs one
    comparison per copy, and similarity does not chain through documents already dropped.
    Documents without words are left to exact dedup.
    """
    signatures = minhash_signatures([d.text for d in documents], settings.num_perm, settings.shingle_words)
    bands, rows = lsh_banding(settings.num_perm, settings.near_threshold)
    band_keys = _band_keys(signatures, bands, rows).tolist()
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    needed = settings.near_threshold * settings.num_perm
    kept = []
    for index, document in enumerate(documents):
        if signatures[index, 0] == PRIME:  # no words
            kept.append(document)
            continue
        candidates = {other for band, key in enumerate(band_keys[index]) for other in buckets[band].get(key, ())}
        if candidates:
            matches = np.count_nonzero(signatures[sorted(candidates)] == signatures[index], axis=1)
            if matches.max() >= needed - 1e-9:  # threshold * num_perm may round just above a whole count
                continue
        kept.append(document)
        for band, key in enumerate(band_keys[index]):
            buckets[band].setdefault(key, []).append(index)
    return kept


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band); a key collision only adds a candidate that is then verified."""
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for row in range(rows):
        keys = keys * np.uint64(0x9E3779B97F4A7C15) + grouped[:, :, row]  # wraps mod 2**64, deliberately
    return keys


# ---------------------------------------------------------------- report


def _per_domain(documents: Sequence[Document], kept: list[Document]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for document in documents:
        counts.setdefault(document.domain, {"documents_in": 0, "documents_out": 0, "removed": 0})
        counts[document.domain]["documents_in"] += 1
    for document in kept:
        counts[document.domain]["documents_out"] += 1
    for entry in counts.values():
        entry["removed"] = entry["documents_in"] - entry["documents_out"]
    return counts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(field: str, value: object, fix: str) -> None:
    raise FlopwiseError(f"data.{field}={value!r} {fix}")
