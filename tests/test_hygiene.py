"""Quality filters, exact and MinHash near-duplicate removal, and the hygiene report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from flopwise.data.hygiene import (
    HygieneSettings,
    clean_documents,
    duplicate_line_share,
    lsh_banding,
    mean_line_chars,
    minhash_signatures,
    symbol_ratio,
)
from flopwise.data.sources import Document
from flopwise.errors import FlopwiseError


def words(count: int, seed: int) -> list[str]:
    """Distinct-looking random words, so shingle sets are controlled by construction."""
    return [f"w{value}" for value in np.random.default_rng(seed).integers(0, 10**9, size=count)]


def replaced(tokens: list[str], positions: range | list[int], seed: int) -> list[str]:
    out = list(tokens)
    for position, word in zip(positions, words(len(positions), seed)):
        out[position] = word
    return out


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    tokens = re.findall(r"\w+", text.lower())
    if len(tokens) < n:
        return {tuple(tokens)}
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def doc(text: str, source: str, domain: str = "text") -> Document:
    return Document(text, domain, source)


BASE = words(300, seed=1)
TEXT = " ".join(BASE)
OTHER = " ".join(words(300, seed=2))


# ---------------------------------------------------------------- dedup


def test_exact_duplicates_are_removed_after_whitespace_normalization_keeping_the_first():
    first = doc("line one\nline two\n", "a")
    documents = [first, doc("\n\nline one   \r\nline two\t\n\n", "b"), doc("line two\nline one", "c"),
                 doc("line one\nline two", "d")]
    kept, report = clean_documents(documents, HygieneSettings(dedup="exact"))
    assert [d.source for d in kept] == ["a", "c"] and kept[0] is first
    assert (report.documents_in, report.documents_out, report.exact_duplicates, report.near_duplicates) == (4, 2, 2, 0)


def test_dedup_none_keeps_exact_copies():
    kept, report = clean_documents([doc("same", "a"), doc("same", "b")], HygieneSettings(dedup="none"))
    assert len(kept) == 2 and report.exact_duplicates == 0


def test_near_duplicate_is_removed_by_near_but_not_by_exact_and_unrelated_texts_stay():
    near_copy = " ".join(replaced(BASE, [100, 200], seed=3))
    assert 0.9 < jaccard(TEXT, near_copy) < 1
    documents = [doc(TEXT, "original"), doc(OTHER, "unrelated"), doc(near_copy, "copy")]

    kept, report = clean_documents(documents, HygieneSettings(dedup="near"))
    assert [d.source for d in kept] == ["original", "unrelated"]
    assert (report.exact_duplicates, report.near_duplicates) == (0, 1)

    kept, report = clean_documents(documents, HygieneSettings(dedup="exact"))
    assert len(kept) == 3 and report.near_duplicates == 0


def test_near_duplicates_compare_with_kept_documents_so_similarity_does_not_chain():
    # b is near a and c is near b, but c is not near a: once b is dropped, c stays
    a = " ".join(BASE)
    b = " ".join(replaced(BASE, range(100, 126), seed=4))
    c = " ".join(replaced(replaced(BASE, range(100, 126), seed=4), range(200, 226), seed=5))
    assert jaccard(a, b) > 0.8 and jaccard(b, c) > 0.8 and jaccard(a, c) < 0.7
    settings = HygieneSettings(dedup="near", near_threshold=0.73, num_perm=256)
    kept, report = clean_documents([doc(a, "a"), doc(b, "b"), doc(c, "c")], settings)
    assert [d.source for d in kept] == ["a", "c"] and report.near_duplicates == 1


def test_texts_without_words_are_left_to_exact_dedup():
    documents = [doc("!!! ???", "a"), doc("--- +++", "b"), doc("!!! ???", "c")]
    kept, report = clean_documents(documents, HygieneSettings(dedup="near"))
    assert [d.source for d in kept] == ["a", "b"] and report.exact_duplicates == 1


@pytest.mark.parametrize("changed", [3, 15, 25, 40])
def test_minhash_estimate_is_close_to_the_exact_jaccard_of_the_shingle_sets(changed):
    other = " ".join(replaced(BASE, range(0, 300, 300 // changed), seed=changed))
    signatures = minhash_signatures([TEXT, other], num_perm=128, shingle_words=5)
    estimate = np.mean(signatures[0] == signatures[1])
    assert abs(estimate - jaccard(TEXT, other)) < 0.1


def test_minhash_of_texts_shorter_than_a_shingle_uses_all_their_words():
    signatures = minhash_signatures(["Two words", "two   WORDS!", "two other"], num_perm=64, shingle_words=5)
    assert (signatures[0] == signatures[1]).all()
    assert (signatures[0] != signatures[2]).mean() > 0.9


def test_signatures_do_not_depend_on_the_process_or_on_chunking():
    texts = [TEXT, OTHER, "short text", ""]
    here = minhash_signatures(texts, num_perm=32, shingle_words=3)
    code = ("import json, sys; from flopwise.data.hygiene import minhash_signatures; "
            "print(json.dumps(minhash_signatures(json.loads(sys.argv[1]), 32, 3).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True,
                            env=env, check=True)
    assert json.loads(result.stdout) == here.tolist()
    one_by_one = np.vstack([minhash_signatures([text], num_perm=32, shingle_words=3) for text in texts])
    assert (one_by_one == here).all()


def test_lsh_banding_errs_below_the_threshold():
    assert lsh_banding(128, 0.8) == (16, 8)
    for num_perm, threshold in [(128, 0.5), (256, 0.9), (64, 0.7), (12, 0.5)]:
        bands, rows = lsh_banding(num_perm, threshold)
        assert bands * rows == num_perm and rows >= 2 and bands >= 2
        assert (1 / bands) ** (1 / rows) <= threshold
    assert lsh_banding(12, 0.3) == (6, 2)  # no banding that low: the lowest there is


def test_two_calls_give_identical_output():
    documents = [doc(TEXT, "a"), doc(" ".join(replaced(BASE, [7], seed=9)), "b"), doc(OTHER, "c"), doc(TEXT, "d")]
    settings = HygieneSettings(dedup="near", min_chars=10)
    first_kept, first_report = clean_documents(documents, settings)
    second_kept, second_report = clean_documents(documents, settings)
    assert first_kept == second_kept and first_report.to_dict() == second_report.to_dict()
    assert [d.source for d in first_kept] == ["a", "c"]


# ---------------------------------------------------------------- filters


PROSE = "A plain paragraph of ordinary words.\nAnother line, with a comma.\nAnd a third one here.\n"
FILTER_DOCS = [
    doc(PROSE, "prose"),
    doc("tiny", "short"),
    doc("{}[]()<>" * 10 + " word", "symbols"),
    doc("word " * 100, "long_line"),
    doc("the same line\n" * 10 + "another line\n", "repeated_lines"),
]


@pytest.mark.parametrize("setting, removed", [
    ({"min_chars": 20}, "short"),
    ({"max_symbol_ratio": 0.5}, "symbols"),
    ({"max_line_chars": 100}, "long_line"),
    ({"max_duplicate_line_share": 0.3}, "repeated_lines"),
])
def test_each_filter_removes_its_target_and_nothing_else(setting, removed):
    kept, report = clean_documents(FILTER_DOCS, HygieneSettings(dedup="none", **setting))
    assert [d.source for d in kept] == [d.source for d in FILTER_DOCS if d.source != removed]
    assert report.filtered == {next(iter(setting)): 1}


def test_a_document_counts_under_the_first_filter_that_removes_it():
    settings = HygieneSettings(min_chars=20, max_symbol_ratio=0.5, max_line_chars=100, max_duplicate_line_share=0.3)
    kept, report = clean_documents(FILTER_DOCS + [doc("{{}}", "short_and_symbols")], settings)
    assert [d.source for d in kept] == ["prose"]
    assert report.filtered == {"min_chars": 2, "max_symbol_ratio": 1, "max_line_chars": 1,
                               "max_duplicate_line_share": 1}


def test_filter_measures():
    assert symbol_ratio("a_b") == pytest.approx(1 / 3)  # "_" is not alphanumeric
    assert symbol_ratio("naïve café 日本\n\t42") == 0
    assert symbol_ratio("") == 0
    assert mean_line_chars("ab\nabcd\n") == 3
    assert duplicate_line_share("x\n\n\ny\n\n") == 0  # blank lines do not count
    assert duplicate_line_share("x\nx  \ny\nx\n") == pytest.approx(0.5)  # trailing spaces ignored


def test_filters_are_off_by_default():
    kept, report = clean_documents(FILTER_DOCS, HygieneSettings())
    assert kept == FILTER_DOCS and report.filtered == {}


# ---------------------------------------------------------------- report and settings


def test_per_domain_counts_and_report_dict():
    documents = [doc(TEXT, "p1", "prose"), doc(TEXT, "p2", "prose"), doc("x", "c1", "code"),
                 doc(OTHER, "c2", "code"), doc("def f(): pass", "c3", "code")]
    kept, report = clean_documents(documents, HygieneSettings(min_chars=5))
    assert [d.source for d in kept] == ["p1", "c2", "c3"]
    assert report.to_dict() == {
        "documents_in": 5, "documents_out": 3, "exact_duplicates": 1, "near_duplicates": 0,
        "filtered": {"min_chars": 1},
        "per_domain": {"prose": {"documents_in": 2, "documents_out": 1, "removed": 1},
                       "code": {"documents_in": 3, "documents_out": 2, "removed": 1}},
    }


def test_empty_input():
    kept, report = clean_documents([], HygieneSettings(dedup="near"))
    assert kept == [] and report.documents_in == 0 and report.per_domain == {}


@pytest.mark.parametrize("field, value", [
    ("dedup", "fuzzy"), ("near_threshold", 0), ("near_threshold", 1.5), ("num_perm", 127), ("num_perm", 2),
    ("num_perm", 64.0), ("shingle_words", 0), ("min_chars", -1), ("max_symbol_ratio", -0.1),
    ("max_line_chars", -5), ("max_duplicate_line_share", 1.5),
])
def test_bad_settings_give_one_line_errors_naming_the_field(field, value):
    with pytest.raises(FlopwiseError) as error:
        HygieneSettings(**{field: value})
    message = str(error.value)
    assert message.startswith(f"data.{field}={value!r} ") and "\n" not in message
