"""Per-task accuracies, the centered accuracy (acc - random) / (1 - random) that CORE reports, and a bootstrap
interval for it.

For multiple choice, as lm-eval's ``multiple_choice`` tasks: ``acc`` picks the choice of highest
log-likelihood, ``acc_norm`` divides it by the choice's length in characters, ``acc_bytes`` by its length in
UTF-8 bytes.  The centered accuracy is taken on ``acc_bytes``: normalized by length, so long and short
choices compete fairly, and by bytes, so models with different tokenizers are compared on the same scale.
Generation tasks have ``exact_match``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flopwise.evaluate.tasks.spec import Example

RESAMPLES = 1000  # bootstrap resamples of the examples
INTERVAL = 0.95
CENTERED_ON = {"choice": "acc_bytes", "generate": "exact_match"}


def choice_correct(examples: Sequence[Example], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Per example, whether acc, acc_norm and acc_bytes pick the right choice (1.0 or 0.0)."""
    picks: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for example, lls in zip(examples, loglikelihoods, strict=True):
        scores = np.asarray(lls, dtype=float)
        chars = np.array([len(c) for c in example.choices], dtype=float)
        size = np.array([len(c.encode("utf-8")) for c in example.choices], dtype=float)
        for name, values in (("acc", scores), ("acc_norm", scores / chars), ("acc_bytes", scores / size)):
            picks[name].append(float(int(np.argmax(values)) == example.answer))
    return {name: np.asarray(values) for name, values in picks.items()}


def exact_match(examples: Sequence[Example], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per example, whether the generation equals the target once both are stripped of outer whitespace, or passes
    the example's own check where it has one."""
    return {"exact_match": np.array([float(e.verify(out) if e.verify is not None else out.strip() == e.target.strip())
                                     for e, out in zip(examples, outputs, strict=True)])}


def summarize(correct: dict[str, np.ndarray], kind: str, random_baseline: float, seed: int) -> dict[str, Any]:
    """Mean of each accuracy, the random baseline, and the centered accuracy with its bootstrap interval."""
    metric = CENTERED_ON[kind]
    values = correct[metric]
    low, high = bootstrap_interval(values, random_baseline, seed)
    return {**{name: float(v.mean()) for name, v in correct.items()}, "n": len(values), "random": random_baseline,
            "metric": metric, "centered": center(float(values.mean()), random_baseline),
            "low": low, "high": high}


def center(accuracy: float, random_baseline: float) -> float:
    """(acc - random) / (1 - random): 0 at chance, 1 when always right."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def bootstrap_interval(values: np.ndarray, random_baseline: float, seed: int,
                       resamples: int = RESAMPLES, level: float = INTERVAL) -> tuple[float, float]:
    """The percentile bootstrap interval of the centered accuracy, resampling examples with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return center(float(low), random_baseline), center(float(high), random_baseline)
