"""The supervised fine-tuning objective: conversations (packed or one per row) scored by cross-entropy on the
assistant's tokens only, as the training loop's ``Objective`` (flopwise/train/trainer.py)."""

from __future__ import annotations

import torch

from flopwise.posttrain.losses import masked_cross_entropy
from flopwise.posttrain.sampler import ConversationSampler, SFTBatch
from flopwise.runtime import Ranks, autocast


class SFTObjective:
    """Batches from the conversation sampler; the loss a packed row's conversations cannot see across.

    Under data parallelism each rank's rows hold a different number of assistant tokens, and DDP averages the
    ranks' gradients, so each rank divides its summed loss by the mean count over ranks: then every assistant
    token of the global batch weighs the same, as in one process."""

    def __init__(self, sampler: ConversationSampler, ranks: Ranks = Ranks()) -> None:
        self.sampler = sampler
        self.ranks = ranks

    def next_batch(self) -> SFTBatch:
        return self.sampler.next_batch()

    def loss(self, model: torch.nn.Module, batch: SFTBatch, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the same detached): the mean over the batch's assistant tokens."""
        segments = batch.segments.to(device) if batch.segments is not None else None
        targets, mask = batch.targets.to(device), batch.mask.to(device)
        with autocast(device, dtype):
            logits = model(batch.inputs.to(device), segments=segments)[0]
        tokens = self.ranks.sum([float(mask.sum())])[0] / self.ranks.world_size
        loss = masked_cross_entropy(logits, targets, mask, tokens)
        return loss, loss.detach()
