"""The supervised fine-tuning objective: conversations (packed or one per row) scored by cross-entropy on the
assistant's tokens only, as the training loop's ``Objective`` (flopwise/train/trainer.py); methods that add a
per-token term (a teacher's, flopwise/methods/distill.py) change it through ``MethodStack.token_loss``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flopwise.methods.base import TokenOutputs
from flopwise.posttrain.losses import masked_cross_entropy, masked_mean, token_cross_entropy
from flopwise.posttrain.sampler import ConversationSampler, SFTBatch
from flopwise.runtime import Ranks, autocast

if TYPE_CHECKING:
    from flopwise.methods.stack import MethodStack


class SFTObjective:
    """Batches from the conversation sampler; the loss a packed row's conversations cannot see across.

    Under data parallelism each rank's rows hold a different number of assistant tokens, and DDP averages the
    ranks' gradients, so each rank divides its summed loss by the mean count over ranks: then every assistant
    token of the global batch weighs the same, as in one process."""

    def __init__(self, sampler: ConversationSampler, ranks: Ranks = Ranks(), methods: MethodStack | None = None
                 ) -> None:
        self.sampler = sampler
        self.ranks = ranks
        self.methods = methods  # their token_loss hooks change the per-token loss; None: plain cross-entropy

    def next_batch(self) -> SFTBatch:
        return self.sampler.next_batch()

    def loss(self, model: torch.nn.Module, batch: SFTBatch, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the plain cross-entropy detached): the mean over the batch's assistant
        tokens, of the cross-entropy as the methods change it."""
        segments = batch.segments.to(device) if batch.segments is not None else None
        inputs, targets, mask = batch.inputs.to(device), batch.targets.to(device), batch.mask.to(device)
        with autocast(device, dtype):
            logits = model(inputs, segments=segments)[0]
        tokens = self.ranks.sum([float(mask.sum())])[0] / self.ranks.world_size
        if self.methods is None or not self.methods.changes_token_loss:
            loss = masked_cross_entropy(logits, targets, mask, tokens)
            return loss, loss.detach()
        plain = token_cross_entropy(logits, targets)
        total = self.methods.token_loss(plain, TokenOutputs(inputs, targets, segments, logits, mask))
        return masked_mean(total, mask, tokens), masked_mean(plain.detach(), mask, tokens)
