"""Held-out loss on the assistant's tokens, per data source: SFT's counterpart of the held-out loss per domain.

Each held-out conversation is scored alone (one per row, padded), so the figure does not depend on how the
training batches were packed; the loss is the mean over assistant tokens, per source and over all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flopwise.posttrain.sampler import Rendered
from flopwise.runtime import autocast


class AssistantEvaluator:
    """Scores a model on fixed held-out conversations (the same ones every time)."""

    def __init__(self, conversations: Sequence[Rendered], source_names: Sequence[str], batch_size: int,
                 device: torch.device, dtype: torch.dtype, pad_id: int) -> None:
        self.conversations = list(conversations)
        self.source_names = list(source_names)
        self.batch_size, self.device, self.dtype, self.pad_id = batch_size, device, dtype, pad_id

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        """Loss (nats per assistant token) and perplexity per source and overall, with token counts."""
        was_training = model.training
        model.eval()
        nats = [0.0] * len(self.source_names)
        tokens = [0] * len(self.source_names)
        for start in range(0, len(self.conversations), self.batch_size):
            chunk = self.conversations[start:start + self.batch_size]
            losses, mask = self._chunk_losses(model, chunk)
            for row, conversation in enumerate(chunk):
                nats[conversation.source] += float(losses[row][mask[row]].sum())
                tokens[conversation.source] += int(mask[row].sum())
        model.train(was_training)
        sources = {name: summarize(n, t) for name, n, t in zip(self.source_names, nats, tokens) if t}
        return {**summarize(sum(nats), sum(tokens)), "sources": sources}

    def _chunk_losses(self, model: torch.nn.Module, chunk: list[Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(c.ids) for c in chunk) - 1
        inputs = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, conversation in enumerate(chunk):
            n = len(conversation.ids) - 1
            inputs[row, :n] = torch.from_numpy(conversation.ids[:-1])
            targets[row, :n] = torch.from_numpy(conversation.ids[1:])
            mask[row, :n] = torch.from_numpy(conversation.mask[1:])
        with autocast(self.device, self.dtype):
            logits = model(inputs.to(self.device))[0]
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets.to(self.device), reduction="none")
        return losses.cpu(), mask


def summarize(nats: float, tokens: int) -> dict[str, float]:
    loss = nats / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens}
