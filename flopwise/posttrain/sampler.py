"""SFT batches of whole conversations, packed several to a row or one per row, in an exactly resumable order.

Each epoch visits the conversations in a fresh seeded permutation (RS2 without replacement, as
``flopwise.data.sampler.WindowStream`` visits windows), so a budget shorter than an epoch sees a random subset
without repeats.  A conversation of n tokens takes n - 1 positions of a row: inputs ``ids[:-1]``, targets
``ids[1:]``, so no position ever predicts a token of another conversation.

With packing, rows of seq_len positions are filled greedily in permutation order; a conversation that does not
fit in the rest of a row starts the next one (it is never split, so it keeps its whole context), and the row is
padded.  ``segments`` then tells the model where each conversation begins, so it attends only within its own
(``GPT.logits(segments=)``).  Without packing, each row holds one conversation and padding: simpler, but short
conversations leave most of a row as padding; ``fill`` measures both.

The state is two ints (epoch and position in its permutation): a conversation that did not fit at the end of a
batch is simply the next one taken, so nothing is buffered between batches and resume is exact on any number of
ranks that share the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from flopwise.errors import FlopwiseError


@dataclass(frozen=True)
class Rendered:
    """One conversation as token ids; ``mask[i]``: ids[i] is a target (assistant content and its end token);
    ``source``: the index of its data source, for the held-out loss per source."""

    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]
    source: int

    @classmethod
    def of(cls, ids: Sequence[int], mask: Sequence[bool], source: int) -> Rendered:
        """From ``template.render``'s lists."""
        if len(ids) != len(mask):
            raise ValueError(f"{len(ids)} ids but {len(mask)} mask entries")
        return cls(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), source)


@dataclass(frozen=True)
class PrepareStats:
    """What ``prepare`` did, for the run summary: conversations cut to the window and kept (``truncated``), and
    those removed because no target was left to train on (``dropped``, not counted as truncated)."""

    kept: int
    truncated: int
    dropped: int


def prepare(rendered: Sequence[Rendered], seq_len: int) -> tuple[list[Rendered], PrepareStats]:
    """The conversations cut to at most seq_len + 1 tokens (a row's inputs and the last target), so each fits
    one row; a conversation whose targets all lie past the cut (or that has none) is dropped, since it would
    cost compute and teach nothing.  The first token is never predicted, so only ``mask[1:]`` counts."""
    kept: list[Rendered] = []
    truncated = 0
    for conversation in rendered:
        cut = Rendered(conversation.ids[:seq_len + 1], conversation.mask[:seq_len + 1], conversation.source)
        if not cut.mask[1:].any():
            continue
        truncated += len(cut.ids) < len(conversation.ids)
        kept.append(cut)
    return kept, PrepareStats(len(kept), truncated, len(rendered) - len(kept))


class EpochOrder:
    """``count`` items visited in a fresh seeded permutation each epoch (without replacement); the state is the
    seed, the epoch and the position in its permutation, so resume is exact.  Both samplers take their order
    from it: an item stays next (``peek``) until it is taken (``advance``)."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed
        self.epoch = 0
        self.position = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    @property
    def epochs(self) -> float:
        """Items taken over the number of items."""
        return self.epoch + self.position / self.count

    def peek(self) -> int:
        if self._permutation_epoch != self.epoch:
            self._permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
            self._permutation_epoch = self.epoch
        return int(self._permutation[self.position])

    def advance(self) -> None:
        self.position += 1
        if self.position == self.count:
            self.epoch, self.position = self.epoch + 1, 0

    def take(self) -> int:
        index = self.peek()
        self.advance()
        return index

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off (its seed wins)."""
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._permutation_epoch = -1


def check_share(batch_size: int, rank: int, world_size: int, unit: str) -> None:
    """A global batch of ``batch_size`` ``unit`` that each rank can take its contiguous share of."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} ({unit} of all ranks) must split evenly over world_size "
                         f"{world_size}")


class SFTBatch(NamedTuple):
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64: the inputs shifted by one within each conversation
    mask: torch.Tensor  # [B, T] bool: targets[b, t] is an assistant token (never padding)
    segments: torch.Tensor | None  # [B, T] int64 conversation ids per row, padding its own (packing only)
    sources: torch.Tensor  # [B, T] int64 source of each target, -1 on padding


class ConversationSampler:
    """Batches of ``batch_size`` rows (all ranks together; each rank gets its contiguous share) of
    ``conversations`` already cut by ``prepare``; ``pad_id`` fills padding (masked, so any id will do)."""

    def __init__(self, conversations: Sequence[Rendered], seq_len: int, batch_size: int, seed: int, pack: bool,
                 pad_id: int, rank: int = 0, world_size: int = 1) -> None:
        if not conversations:
            raise FlopwiseError("no conversation has an assistant reply within the window: use a longer "
                                "model.seq_len or shorter conversations")
        check_share(batch_size, rank, world_size, "rows")
        longest = max(len(c.ids) for c in conversations)
        if longest > seq_len + 1 or min(len(c.ids) for c in conversations) < 2:
            raise ValueError(f"conversations must have 2 to seq_len + 1 = {seq_len + 1} tokens (longest: "
                             f"{longest}): cut them with prepare first")
        self.conversations = list(conversations)
        self.seq_len, self.batch_size, self.pack, self.pad_id = seq_len, batch_size, pack, pad_id
        self.rank, self.world_size = rank, world_size
        self.tokens = sum(len(c.ids) for c in conversations)
        self.progress = 0.0  # set by the Trainer each step; the order does not pace by it
        self.order = EpochOrder(len(self.conversations), seed)

    def domain_epochs(self) -> dict[str, float]:
        """Conversations taken (all ranks) over their number, under the one name the Trainer logs per domain."""
        return {"conversations": self.order.epochs}

    def next_batch(self) -> SFTBatch:
        """This rank's rows of the next global batch."""
        rows = [self._next_row() for _ in range(self.batch_size)]
        share = self.batch_size // self.world_size
        return self._tensors(rows[self.rank * share:(self.rank + 1) * share])

    def _next_row(self) -> list[int]:
        """The indices of the conversations of one row: greedily as many as fit, or one without packing."""
        row: list[int] = []
        used = 0
        while not row or self.pack:
            index = self.order.peek()
            length = len(self.conversations[index].ids) - 1
            if used + length > self.seq_len:
                break
            row.append(index)
            used += length
            self.order.advance()
        return row

    def _tensors(self, rows: list[list[int]]) -> SFTBatch:
        shape = (len(rows), self.seq_len)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, self.pad_id, dtype=np.int64)
        mask = np.zeros(shape, dtype=bool)
        segments = np.zeros(shape, dtype=np.int64)
        sources = np.full(shape, -1, dtype=np.int64)
        for b, row in enumerate(rows):
            start = 0
            for segment, index in enumerate(row):
                conversation = self.conversations[index]
                end = start + len(conversation.ids) - 1
                inputs[b, start:end] = conversation.ids[:-1]
                targets[b, start:end] = conversation.ids[1:]
                mask[b, start:end] = conversation.mask[1:]
                segments[b, start:end] = segment
                sources[b, start:end] = conversation.source
                start = end
            segments[b, start:] = len(row)  # padding: its own sequence, attending only to itself
        packed = torch.from_numpy(segments) if self.pack else None
        return SFTBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask), packed,
                        torch.from_numpy(sources))

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "conversations": len(self.conversations), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; refuses a state saved over different conversations (counted in
        conversations and tokens, so a different seq_len's cut is caught too)."""
        check_same_data(state, "conversations", "conversations", len(self.conversations), self.tokens)
        self.order.load_state_dict(state)


def check_same_data(state: dict[str, Any], key: str, unit: str, count: int, tokens: int) -> None:
    """Refuse a sampler state saved over other data than this run's ``count`` records (``state[key]``, named
    ``unit``) of ``tokens`` tokens."""
    saved = (int(state[key]), int(state["tokens"]))
    if saved != (count, tokens):
        raise FlopwiseError(f"the checkpoint's data order covers {saved[0]} {unit} of "
                            f"{saved[1]} tokens but this run has {count} of {tokens}: resume with the same data "
                            "and model.seq_len")


@dataclass(frozen=True)
class Fill:
    """Shares of batch positions: assistant targets (the positions that teach) and padding (wasted compute)."""

    targets: float
    padding: float


def fill(batches: Iterable[SFTBatch]) -> Fill:
    """How well ``batches`` use their positions, to compare packing with one conversation per row."""
    positions = targets = padding = 0
    for batch in batches:
        positions += batch.mask.numel()
        targets += int(batch.mask.sum())
        padding += int((batch.sources < 0).sum())
    return Fill(targets / max(1, positions), padding / max(1, positions))
