"""Training batches as packed windows of the token stream, in an exactly resumable order.

The order is a pure function of (seed, epoch, position): epoch ``e`` visits the windows in
the permutation drawn from ``default_rng([seed, e])``, and ``position`` says how far into it
the next batch starts.  Saving those three ints is enough to resume without replaying or
skipping a single window, on any number of ranks that share them.
"""

from __future__ import annotations

import numpy as np
import torch

from flopwise.errors import FlopwiseError


class PackedSampler:
    """Non-overlapping windows of seq_len + 1 tokens, shuffled per epoch, split across ranks."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise FlopwiseError(f"the training corpus has {len(tokens)} tokens, fewer than model.seq_len + 1 = "
                                f"{seq_len + 1}: use a smaller model.seq_len or more data")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    @property
    def epochs_seen(self) -> float:
        """Passes over the training windows so far, counting every rank's share."""
        return self.epoch + self.position / self.windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each [batch_size, seq_len] int64."""
        indices = self._next_indices(self.batch_size * self.world_size)
        mine = indices[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        offsets = mine[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        windows = torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _next_indices(self, count: int) -> np.ndarray:
        """The next ``count`` window indices of the global order, crossing epochs when needed."""
        parts = []
        while count > 0:
            taken = self._epoch_permutation()[self.position:self.position + count]
            parts.append(taken)
            count -= len(taken)
            self.position += len(taken)
            if self.position == self.windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _epoch_permutation(self) -> np.ndarray:
        if self._permutation_epoch != self.epoch:
            self._permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows)
            self._permutation_epoch = self.epoch
        return self._permutation

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "windows": self.windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off; refuses a state saved over a different set of windows."""
        if int(state["windows"]) != self.windows:
            raise FlopwiseError(f"the checkpoint's data order covers {state['windows']} windows but this corpus "
                                f"has {self.windows}: resume with the same data and model.seq_len")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
