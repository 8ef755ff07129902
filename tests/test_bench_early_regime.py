"""bench/early_regime.py's split of held-out targets by what could predict them."""

import numpy as np

from tests.helpers import load_bench


def test_targets_are_split_into_copy_seen_and_other():
    bench = load_bench("early_regime")
    training = np.array([50, 1, 2, 3, 4, 5, 6, 7, 8, 60], dtype=np.int64)
    seen = np.unique(bench.ngram_keys(training))
    # targets: 2..8 continue the training split's 8-gram 1..8 only at 8; 9 then 1 2 repeat the bigrams (9, 1), (1, 2)
    window = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], dtype=np.int64)
    kinds = bench.categories(window[None, :], seen)[0]
    assert kinds.tolist() == [2, 2, 2, 2, 2, 2, 1, 2, 2, 0]
    # the bigram (8, 9) is new, (9, 1) is new, (1, 2) occurred at the start: a copy, whatever the 8-grams say
    assert len(kinds) == len(window) - 1


def test_ngram_keys_tell_different_ngrams_apart_and_match_equal_ones():
    bench = load_bench("early_regime")
    tokens = np.arange(20, dtype=np.int64) % 7
    keys = bench.ngram_keys(tokens)
    assert len(keys) == len(tokens) - bench.NGRAM + 1
    assert keys[0] == keys[7] and len(set(keys.tolist())) == 7  # period 7: 7 distinct 8-grams
