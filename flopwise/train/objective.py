"""What a training step minimizes when a data-side method needs more than the mean cross-entropy.

The plain path is the model's own mean loss.  With any of these on, the step computes per-token
losses and then, per sequence:
- SALT (flopwise/methods/salt.py): a small teacher picks the batch from a larger candidate pool and,
  early in the budget, adds a distillation term: (1 - w) CE + w KD;
- sample reweighting (flopwise/methods/sample_weights.py, Sow et al. 2025): weights from the
  sequences' losses within the global batch, mean 1, multiply each sequence's loss;
- online domain reweighting (flopwise/data/mixture.py): the per-domain training losses, summed over
  the step's micro-batches and all ranks, update the sampler's mixture after the step.
The logged training loss stays the plain mean cross-entropy, comparable across methods.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from flopwise.data.mixture import DomainReweighter
from flopwise.data.sampler import Batch, PackedSampler
from flopwise.methods.salt import SaltSettings, Teacher, distillation_loss, kd_weight_at, select_windows, selecting_at
from flopwise.methods.sample_weights import ReweightSettings, sample_weights
from flopwise.train.device import autocast
from flopwise.train.distributed import Ranks


class Objective:
    """Per-sequence losses, weights and teacher terms for one run; ``step`` and ``p`` are set by the
    loop before each step, so everything here is a function of them and the saved reweighter."""

    def __init__(self, sampler: PackedSampler, dtype: torch.dtype, ranks: Ranks = Ranks(),
                 reweight: ReweightSettings | None = None,
                 burn_in: float = 0.0, salt: SaltSettings | None = None, teacher: Teacher | None = None,
                 reweighter: DomainReweighter | None = None) -> None:
        self.sampler = sampler
        self.dtype = dtype
        self.ranks = ranks
        self.reweight = reweight
        self.burn_in = burn_in  # uniform weights while p < burn_in (Sow et al.'s uniform first steps)
        self.salt = salt
        self.teacher = teacher
        self.reweighter = reweighter
        self.step = 0
        self.p = 0.0
        self.teacher_device = next(teacher.model.parameters()).device if teacher is not None else None
        self._teacher_logits: torch.Tensor | None = None
        self.teacher_flops = 0.0  # the teacher's forward FLOPs this step, all ranks (taken by the loop's meter)
        self._domain_sums: torch.Tensor | None = None  # [2, domains]: summed token losses, token counts
        self._rejected: list[torch.Tensor] = []  # domains of this step's rejected SALT candidates

    def next_batch(self) -> Batch:
        """The sampler's next batch, or, in SALT's selection phase, the pool's best by the teacher's score
        (its logits kept for the distillation term, so the teacher runs once per window)."""
        self._teacher_logits = None
        if self.salt is None or self.teacher is None or not selecting_at(self.p, self.salt):
            return self.sampler.next_batch()
        candidates = self.sampler.next_batch(self.salt.pool_size(self.sampler.batch_size))
        logits = self._teacher_logits_of(candidates.inputs)
        scores = Teacher.scores_from_logits(logits, candidates.targets.to(self.teacher_device), self.salt.select_top_k)
        chosen = select_windows(scores, self.sampler.batch_size, self.salt)
        self._teacher_logits = logits[chosen]
        chosen = chosen.cpu()
        rejected = torch.ones(len(candidates.domains), dtype=torch.bool)
        rejected[chosen] = False
        self._rejected.append(candidates.domains[rejected])
        return Batch(candidates.inputs[chosen], candidates.targets[chosen], candidates.domains[chosen])

    def _teacher_logits_of(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, in the run's precision, with their FLOPs counted for the meter."""
        with autocast(self.teacher_device, self.dtype):
            logits = self.teacher.logits(inputs.to(self.teacher_device))
        self.teacher_flops += self.teacher.flops_per_token * inputs.numel() * self.ranks.world_size
        return logits

    def take_teacher_flops(self) -> float:
        flops, self.teacher_flops = self.teacher_flops, 0.0
        return flops

    def loss(self, model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the plain mean cross-entropy, detached) of one micro-batch."""
        x, y = batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
        logits, token_losses = model(x, y, reduction="none")
        sequence = token_losses.float().mean(dim=1)
        total = sequence
        kd_weight = kd_weight_at(self.p, self.salt) if self.salt is not None and self.teacher is not None else 0.0
        if kd_weight > 0:
            teacher_logits = self._teacher_logits if self._teacher_logits is not None else self._teacher_logits_of(x)
            kd = distillation_loss(logits, teacher_logits, self.salt.temperature)
            total = (1 - kd_weight) * sequence + kd_weight * kd
        if self.reweight is not None and self.p >= self.burn_in:
            total = total * sample_weights(sequence.detach(), self.step, self.reweight, self.ranks)
        if self.reweighter is not None:
            self._add_domain_losses(sequence.detach(), batch.domains, y.shape[1])
        return total.mean(), sequence.detach().mean()

    def _add_domain_losses(self, sequence: torch.Tensor, domains: torch.Tensor, seq_len: int) -> None:
        """Sum this micro-batch's token losses and counts per domain (on the device: no sync per micro-batch)."""
        domains = domains.to(sequence.device)
        if self._domain_sums is None:
            self._domain_sums = torch.zeros(2, len(self.sampler.ranges), dtype=torch.float64, device=sequence.device)
        self._domain_sums[0].index_add_(0, domains, sequence.double() * seq_len)
        self._domain_sums[1].index_add_(0, domains, torch.full_like(sequence, seq_len, dtype=torch.float64))

    def end_step(self) -> None:
        """After the optimizer step: uncount SALT's rejected candidates and fold the step's per-domain
        losses into the mixture (both over all ranks)."""
        if self._rejected:
            counts = torch.bincount(torch.cat(self._rejected), minlength=len(self.sampler.ranges))
            self.sampler.untake(self.ranks.sum(counts.double().tolist()))
            self._rejected = []
        if self.reweighter is None or self._domain_sums is None:
            return
        count = len(self.sampler.ranges)
        totals = self.ranks.sum(self._domain_sums.flatten().tolist())
        self.reweighter.observe(totals[:count], totals[count:])
        self.sampler.set_weights(self.reweighter.weights())
        self._domain_sums = None

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self.reweighter.state_dict()} if self.reweighter is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.reweighter is not None:
            self.reweighter.load_state_dict(state["mixture"])


def plain_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own mean cross-entropy (the default path: no per-token losses kept)."""
    x, y = batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
    loss = model(x, y)[1]  # the logits are not kept: they would stay alive through backward
    return loss, loss.detach()


LossFunction = Callable[[torch.nn.Module, Batch, torch.device], tuple[torch.Tensor, torch.Tensor]]
