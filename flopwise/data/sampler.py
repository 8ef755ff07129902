"""Training batches as packed windows of the token stream, in an exactly resumable order.

A window is seq_len + 1 consecutive tokens.  A ``WindowStream`` visits the non-overlapping windows
of one token range in a fresh seeded permutation per epoch, so a budget shorter than an epoch sees
a random subset without repeats and a longer one sees every window once before any repeats: RS2
without replacement (Okanovic et al. 2023), the order a budget smaller than the data should use.

Without mixture weights the sampler is one stream over the whole train split ("natural": each
domain in proportion to its tokens).  With weights, each domain is its own stream (the shards keep
domains contiguous) and each window slot goes to the domain owed most by the weights so far, so
every prefix of the run matches the mixture to within one window per domain, with no randomness to
save.  The weights may change during the run (online domain reweighting).

A curriculum gives each window a difficulty; the stream then draws from the easiest fraction
``pacing(p)`` of its windows at budget progress p (Hacohen & Weinshall 2019), seeded per draw.

Document-aware windows (``data.windows = "doc_start"``) begin at a document instead of at a fixed stride:
at the end-of-text token before it, which serves as the beginning-of-sequence token that the speedrun anchors
begin each row with (modded-nanoGPT's ``align_to_bos`` loader; nanochat's BOS-aligned loader).  A document
longer than a window goes on in the next windows, every seq_len tokens, so it is trained on whole; the last
of them (or a short document's only one) is filled up with the documents after it, and the next window
begins at the document that filling cut, which is read again from its start.  Documents that a filling
holds whole get no window of their own.  So an epoch predicts every token, the heads of the cut documents
twice (the anchors crop those documents instead: Ding et al. 2024, "Fewer Truncations Improve Language
Modeling", measure what cropping costs).  The windows are a fixed list computed from the corpus's document
index, visited in the same seeded order as the stream's.

With ``segment_token`` (``data.doc_mask``) each batch that holds a document boundary also carries
``segments``: a new id at each end-of-text token, so attention stays within a document (GPT.logits'
block-causal mask; Zhao et al. 2024, "Analysing The Impact of Sequence Composition on Language Model
Pre-Training", intra-document causal masking).  The end-of-text token begins the next document's segment,
as a beginning-of-sequence token would.

All state is a few ints and floats per stream, saved in each checkpoint, so resume never replays or
skips a window, on any number of ranks that share them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from flopwise.errors import FlopwiseError


class Batch(NamedTuple):
    inputs: torch.Tensor  # [batch, seq_len] int64
    targets: torch.Tensor  # [batch, seq_len] int64, the inputs shifted by one
    domains: torch.Tensor  # [batch] int64: the domain of each window (of its first token, or document)
    segments: torch.Tensor | None = None  # [batch, seq_len] int64 document ids (data.doc_mask); None: causal
    # across each window (without data.doc_mask, or where no window of the batch holds a document boundary)

    def rows(self, index: torch.Tensor) -> Batch:
        """The windows at ``index``, with their segments."""
        return Batch(self.inputs[index], self.targets[index], self.domains[index],
                     None if self.segments is None else self.segments[index])


class WindowStream:
    """The windows of tokens [start, end): shuffled per epoch, or drawn from the easiest ``pacing(p)``
    share when ``difficulty`` (one score per window, lower is easier) is given.  The windows lie at a fixed
    stride from ``start``, or at the offsets ``starts`` (document-aware windows)."""

    def __init__(self, start: int, end: int, seq_len: int, seed_key: tuple[int, ...],
                 difficulty: Callable[[np.ndarray], np.ndarray] | None = None,
                 starts: np.ndarray | None = None) -> None:
        self.start = start
        self.seq_len = seq_len
        self.starts = starts
        self.windows = max(0, (end - start - 1) // seq_len) if starts is None else len(starts)
        self.seed_key = seed_key
        self.epoch = 0
        self.position = 0
        self.draws = 0  # curriculum draws so far (each seeds its own generator)
        self.easiest_first = None if difficulty is None else np.argsort(
            difficulty(self.offsets(np.arange(self.windows, dtype=np.int64))), kind="stable")
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def offsets(self, indices: np.ndarray) -> np.ndarray:
        return self.start + indices * self.seq_len if self.starts is None else self.starts[indices]

    def take(self, count: int, available: float = 1.0) -> np.ndarray:
        """The next ``count`` window start offsets; ``available``: the curriculum's share of windows."""
        if self.easiest_first is not None:
            return self.offsets(self._draw(count, available))
        parts = []
        while count > 0:
            taken = self._epoch_permutation()[self.position:self.position + count]
            parts.append(taken)
            count -= len(taken)
            self.position += len(taken)
            if self.position == self.windows:
                self.epoch, self.position = self.epoch + 1, 0
        return self.offsets(np.concatenate(parts))

    def _draw(self, count: int, available: float) -> np.ndarray:
        pool = max(1, min(self.windows, int(np.ceil(available * self.windows))))
        rng = np.random.default_rng([*self.seed_key, self.draws])
        self.draws += 1
        self.position += count  # windows consumed, for the epoch count
        while self.position >= self.windows:
            self.epoch, self.position = self.epoch + 1, self.position - self.windows
        return self.easiest_first[rng.choice(pool, size=count, replace=count > pool)]

    def _epoch_permutation(self) -> np.ndarray:
        if self._permutation_epoch != self.epoch:
            self._permutation = np.random.default_rng([*self.seed_key, self.epoch]).permutation(self.windows)
            self._permutation_epoch = self.epoch
        return self._permutation

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "draws": self.draws, "windows": self.windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.draws = int(state["epoch"]), int(state["position"]), int(state["draws"])
        self._permutation_epoch = -1  # the seed key may have changed


class PackedSampler:
    """Batches of windows from one natural stream or from per-domain streams mixed to ``weights``.

    ``domain_ranges``: each domain's [start, end) in ``tokens`` (contiguous, in domain-id order);
    ``difficulty``: a function from a stream's window offsets to scores, for a curriculum;
    ``pacing``: the share of easiest windows available at progress p (set ``progress`` each step);
    ``doc_starts``: the offsets where documents begin (the corpus's document index), for windows that begin
    at a document (see the module docstring); ``segment_token``: the end-of-text token, for batches whose
    ``segments`` keep attention within each document."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, domain_ranges: Sequence[tuple[int, int]] | None = None,
                 weights: Sequence[float] | None = None, domain_names: Sequence[str] | None = None,
                 difficulty: Callable[[np.ndarray], np.ndarray] | None = None,
                 pacing: Callable[[float], float] | None = None, doc_starts: np.ndarray | None = None,
                 segment_token: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.layout = "stream" if doc_starts is None else "doc_start"  # data.windows
        self.segment_token = segment_token
        self.ranges = list(domain_ranges) if domain_ranges else [(0, len(tokens))]
        self.names = list(domain_names) if domain_names else [f"domain{i}" for i in range(len(self.ranges))]
        self._range_ends = np.array([end for _, end in self.ranges], dtype=np.int64)
        self.pacing = pacing
        self.progress = 0.0
        self.mixed = weights is not None
        spans = self.ranges if self.mixed else [(0, len(tokens))]
        self.streams = [WindowStream(start, end, seq_len, self._seed_key(index), difficulty,
                                     None if doc_starts is None else document_windows(doc_starts, start, end, seq_len))
                        for index, (start, end) in enumerate(spans)]
        self.windows = sum(stream.windows for stream in self.streams)
        if self.windows < 1:
            raise FlopwiseError(f"the training corpus has {len(tokens)} tokens, fewer than model.seq_len + 1 = "
                                f"{seq_len + 1}: use a smaller model.seq_len or more data")
        self.taken = [0] * len(self.ranges)  # windows trained on per domain (all ranks)
        self.credit = [0.0] * len(self.ranges)
        self.weights: list[float] = []
        if weights is not None:
            self.set_weights(weights)

    def _seed_key(self, stream: int) -> tuple[int, ...]:
        """The natural stream keeps the historical key (seed,); domain streams get (seed, 1 + domain)."""
        return (self.seed, 1 + stream) if self.mixed else (self.seed,)

    def set_weights(self, weights: Sequence[float]) -> None:
        """The mixture from the next window on (normalized); a domain too small for one window may not
        get weight."""
        total = float(sum(weights))
        if len(weights) != len(self.streams) or total <= 0 or min(weights) < 0:
            raise FlopwiseError(f"mixture weights {list(weights)} must be {len(self.streams)} non-negative "
                                "numbers with a positive sum, one per domain")
        for name, weight, stream in zip(self.names, weights, self.streams):
            if weight > 0 and stream.windows == 0:
                raise FlopwiseError(f"domain '{name}' has fewer than model.seq_len + 1 = {self.seq_len + 1} training "
                                    "tokens, so it cannot be sampled: give it weight 0, more text or a shorter seq_len")
        self.weights = [float(w) / total for w in weights]

    def domain_epochs(self) -> dict[str, float]:
        """How many times each domain's training tokens have been seen, on all ranks together."""
        return {name: taken * self.seq_len / max(1, end - start)
                for name, taken, (start, end) in zip(self.names, self.taken, self.ranges)}

    def next_batch(self, count: int | None = None) -> Batch:
        """This rank's share of the next ``count`` (default: batch size) windows of each rank."""
        count = count or self.batch_size
        offsets = self._next_offsets(count * self.world_size)[self.rank * count:(self.rank + 1) * count]
        windows = torch.from_numpy(np.asarray(self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)],
                                              dtype=np.int64))
        inputs = windows[:, :-1]
        domains = torch.from_numpy(self.window_domains(offsets))
        return Batch(inputs, windows[:, 1:], domains, self._segments(inputs))

    def _segments(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The document ids of ``inputs`` where attention keeps within documents; None where no window of the
        batch holds a document boundary, since the mask is then the causal one, which attention computes
        without a mask and faster (most batches of a corpus of documents longer than a window)."""
        if self.segment_token is None:
            return None
        segments = document_segments(inputs, self.segment_token)
        return segments if bool((segments[:, -1] != segments[:, 0]).any()) else None

    def untake(self, counts: Sequence[float]) -> None:
        """Windows read but not trained on, per domain (SALT's rejected candidates, all ranks): not counted
        as seen."""
        self.taken = [int(t - c) for t, c in zip(self.taken, counts)]

    def domains_of(self, offsets: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._range_ends, offsets, side="right").astype(np.int64)

    def window_domains(self, offsets: np.ndarray) -> np.ndarray:
        """The domain of each window: its first token's, or, for a window that begins at the end-of-text token
        before a document, that document's."""
        return self.domains_of(offsets if self.layout == "stream" else offsets + 1)

    def _next_offsets(self, count: int) -> np.ndarray:
        available = self.pacing(self.progress) if self.pacing else 1.0
        if not self.mixed:
            offsets = self.streams[0].take(count, available)
        else:
            choice = np.array([self._owed_domain() for _ in range(count)], dtype=np.int64)
            offsets = np.empty(count, dtype=np.int64)
            for domain, stream in enumerate(self.streams):
                slots = np.flatnonzero(choice == domain)
                if len(slots):
                    offsets[slots] = stream.take(len(slots), available)
        counts = np.bincount(self.window_domains(offsets), minlength=len(self.taken))
        self.taken = [int(t + c) for t, c in zip(self.taken, counts)]
        return offsets

    def _owed_domain(self) -> int:
        """Credit each domain its weight; the most owed one gets the window (ties: lowest id)."""
        for index, weight in enumerate(self.weights):
            self.credit[index] += weight
        domain = int(np.argmax(self.credit))
        self.credit[domain] -= 1.0
        return domain

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "windows": self.windows, "layout": self.layout,
                "streams": [s.state_dict() for s in self.streams], "taken": list(self.taken),
                "credit": list(self.credit), "weights": list(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; refuses a state saved over a different set of windows."""
        if "streams" not in state:
            raise FlopwiseError("the checkpoint was saved by an older flopwise whose data order this one cannot "
                                "continue: start a new run, or resume with that version")
        saved_layout = state.get("layout", "stream")  # older checkpoints: the stream's windows
        if saved_layout != self.layout:
            raise FlopwiseError(f"the checkpoint's data order has data.windows='{saved_layout}' windows but this run "
                                f"has '{self.layout}': resume with the run's own config.toml")
        if int(state["windows"]) != self.windows or len(state["streams"]) != len(self.streams):
            raise FlopwiseError(f"the checkpoint's data order covers {state['windows']} windows in "
                                f"{len(state['streams'])} stream(s) but this corpus has {self.windows} in "
                                f"{len(self.streams)}: resume with the same data, mixture and model.seq_len")
        self.seed = int(state["seed"])
        for index, (stream, saved) in enumerate(zip(self.streams, state["streams"])):
            stream.seed_key = self._seed_key(index)
            stream.load_state_dict(saved)
        self.taken = [int(t) for t in state["taken"]]
        self.credit = [float(c) for c in state["credit"]]
        if state["weights"]:
            self.weights = [float(w) for w in state["weights"]]


def document_windows(doc_starts: np.ndarray, start: int, end: int, seq_len: int) -> np.ndarray:
    """Start offsets, ascending, of the windows of seq_len + 1 tokens in [start, end) that begin at a document.

    Each document is read with the end-of-text token before it (none before the very first token): a window
    starts there, and the windows after it continue the document every ``seq_len`` tokens until it has been
    predicted to its own end-of-text token.  The next window begins at the document in which the last one
    ended; the documents that window held whole get none.  A window ends by ``end``; the first may begin at the
    end-of-text token just before ``start`` (the last token of the domain before, in a mixture's stream)."""
    firsts = np.asarray(doc_starts, dtype=np.int64)
    firsts = firsts[(firsts >= start) & (firsts < end)]
    if len(firsts) == 0:
        return np.zeros(0, dtype=np.int64)
    heads = np.maximum(firsts - 1, 0)  # where each document's windows begin: the end-of-text token before it
    predicted_to = np.append(heads[1:], end - 1)  # the last target of each: its own end-of-text token
    pieces = np.maximum(1, -(-(predicted_to - heads) // seq_len))  # windows to predict it whole
    after = heads + pieces * seq_len  # where its last window's targets end
    # the next document to begin a window: the one its last window cut (the last one after all)
    following = np.maximum(np.searchsorted(heads, after, side="right") - 1, np.arange(1, len(heads) + 1)).tolist()
    chain, document = [], 0
    while document < len(heads):
        chain.append(document)
        document = following[document]
    chain = np.array(chain, dtype=np.int64)
    counts = pieces[chain]
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    offsets = np.repeat(heads[chain], counts) + (np.arange(int(counts.sum())) - first_piece) * seq_len
    return offsets[offsets + seq_len + 1 <= end]


def document_segments(inputs: torch.Tensor, token: int) -> torch.Tensor:
    """Document ids [B, T] of inputs [B, T]: a new one at each end-of-text ``token``, which begins the next
    document as a beginning-of-sequence token would."""
    return torch.cumsum(inputs == token, dim=1)


def natural_weights(ranges: Sequence[tuple[int, int]], seq_len: int) -> list[float]:
    """Each domain's share of the training tokens, the mixture that uniform sampling gives; 0 for a domain
    too small for one window of seq_len + 1 tokens."""
    sizes = [end - start if end - start > seq_len else 0 for start, end in ranges]
    return [size / sum(sizes) for size in sizes]
