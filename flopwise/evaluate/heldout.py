"""Held-out loss, perplexity and bits per byte, overall and per domain.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the predicted tokens,
so models with different tokenizers can be compared.  The unigram baseline is the
cross-entropy of the same held-out tokens under the training set's token frequencies: a
model that does not beat it has learned nothing beyond token counts.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from flopwise.data.shards import TokenCorpus, unigram_log_probs
from flopwise.runtime import autocast

LN2 = math.log(2)
# The end-of-run evaluation reads up to this many times train.eval_tokens per domain, for a precise final
# number; evaluations during the run read every k-th of the same windows (``in_run_stride``), so that the
# logged curve estimates the same quantity (the first windows alone are other files and another domain mix).
FINAL_EVAL_SCALE = 4
# An evaluation during the run reads at most this share of the tokens trained so far (and at least one window
# per domain).  A forward pass costs a third of a training token, and the evaluations at 0, 1/4, 1/2 and 3/4 of
# the budget (with train.eval_every 0.25) and before a growth read about twice the run's tokens times this
# share between them: about 3% of its training, where a fixed sample cost a short run more than its training.
IN_RUN_SHARE = 0.05


def heldout_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens, so each target is predicted once.

    A domain with fewer tokens than one window is evaluated as one shorter window.
    """
    length = min(seq_len, len(tokens) - 1)
    if length < 1:
        return np.zeros((0, 2), dtype=np.int64)
    count = (len(tokens) - 1) // length
    if max_tokens is not None:
        count = max(1, min(count, max_tokens // length))
    return np.stack([np.asarray(tokens[i * length: i * length + length + 1], dtype=np.int64) for i in range(count)])


class Evaluator:
    """Evaluates a model on the corpus's held-out split (the same windows every time)."""

    def __init__(self, corpus: TokenCorpus, token_bytes: np.ndarray, seq_len: int, batch_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.corpus = corpus
        self.token_bytes = token_bytes
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.unigram = unigram_log_probs(corpus)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, max_tokens_per_domain: int | None = None,
                 stride: int = 1) -> dict[str, Any]:
        """Loss (nats/token), perplexity and bits per byte for each domain and in total, on the first
        ``max_tokens_per_domain`` held-out tokens of each domain; with ``stride`` k, on every k-th of those
        windows, a sample that keeps each domain's share of them, so it estimates the same overall loss.
        The whole evaluation (``stride`` 1) also gives ``by_stride``: its loss on each such sample, to compare
        with what the model scored on that sample earlier (the same windows: no sampling noise between them)."""
        was_training = model.training
        model.eval()
        per_window: dict[str, dict[str, np.ndarray]] = {}
        for domain in self.corpus.domains:
            windows = heldout_windows(self.corpus.val_tokens_by_domain(domain), self.seq_len, max_tokens_per_domain)
            windows = windows[::stride]
            if len(windows):
                per_window[domain] = self._window_sums(model, windows)
        model.train(was_training)
        result = {**_summary(per_window.values()), "stride": stride,
                  "domains": {domain: _summary([sums]) for domain, sums in per_window.items()}}
        if stride == 1:
            longest = max((len(sums["tokens"]) for sums in per_window.values()), default=0)
            strides = [2 ** power for power in range(1, max(longest - 1, 1).bit_length() + 1)]
            result["by_stride"] = {k: _summary([{key: values[::k] for key, values in sums.items()}
                                                for sums in per_window.values()])["loss"] for k in strides}
        return result

    @torch.no_grad()
    def window_losses(self, model: torch.nn.Module, max_tokens_per_domain: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(nats, tokens) of each window that ``__call__`` reads, domain after domain: for paired comparisons of
        two models on the same windows (bench/compress.py bootstraps over them)."""
        was_training = model.training
        model.eval()
        sums = [self._window_sums(model, windows) for domain in self.corpus.domains
                if len(windows := heldout_windows(self.corpus.val_tokens_by_domain(domain), self.seq_len,
                                                  max_tokens_per_domain))]
        model.train(was_training)
        return np.concatenate([s["nats"] for s in sums]), np.concatenate([s["tokens"] for s in sums])

    def in_run_stride(self, max_tokens_per_domain: int, tokens_trained: float) -> int:
        """The stride of an evaluation during the run after ``tokens_trained``: the smallest power of two from
        FINAL_EVAL_SCALE up whose windows hold at most IN_RUN_SHARE of them, or the one that leaves each domain
        its first window alone.  Powers of two nest: a later, larger sample holds an earlier one's windows."""
        counts = [len(heldout_windows(self.corpus.val_tokens_by_domain(domain), self.seq_len, max_tokens_per_domain))
                  for domain in self.corpus.domains]
        stride = FINAL_EVAL_SCALE
        while (sum(-(-count // stride) for count in counts) * self.seq_len > IN_RUN_SHARE * tokens_trained
               and max(counts, default=0) > stride):
            stride *= 2
        return stride

    def _window_sums(self, model: torch.nn.Module, windows: np.ndarray) -> dict[str, np.ndarray]:
        """Per window: its nats, tokens, UTF-8 bytes and unigram nats."""
        sums: dict[str, list[float]] = {"nats": [], "tokens": [], "bytes": [], "unigram_nats": []}
        for start in range(0, len(windows), self.batch_size):
            chunk = torch.from_numpy(windows[start:start + self.batch_size])
            x, y = chunk[:, :-1], chunk[:, 1:]
            with autocast(self.device, self.dtype):
                losses = model.per_token_loss(x.to(self.device), y.to(self.device))
            targets = y.numpy()
            sums["nats"] += losses.float().sum(dim=1).tolist()
            sums["tokens"] += [targets.shape[1]] * len(targets)
            sums["bytes"] += self.token_bytes[targets].sum(axis=1).tolist()
            sums["unigram_nats"] += (-self.unigram[targets].sum(axis=1)).tolist()
        return {key: np.asarray(values, dtype=np.float64) for key, values in sums.items()}


def _summary(window_sums: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """``summarize`` of the totals of some domains' per-window sums."""
    totals = {"nats": 0.0, "tokens": 0, "bytes": 0, "unigram_nats": 0.0}
    for sums in window_sums:
        for key in totals:
            totals[key] += sums[key].sum()
    return summarize({"nats": float(totals["nats"]), "tokens": int(totals["tokens"]), "bytes": int(totals["bytes"]),
                      "unigram_nats": float(totals["unigram_nats"])})


def summarize(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["nats"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": sums["nats"] / LN2 / max(sums["bytes"], 1),
            "tokens": sums["tokens"], "unigram_loss": sums["unigram_nats"] / sums["tokens"]}
