"""Online domain reweighting (flopwise/data/mixture.py): the mixture follows the per-domain training
loss ('loss') or its excess over a reference run's held-out losses ('excess', DoReMi, Xie et al. 2023),
updated after every step from the losses of all its micro-batches on all ranks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from flopwise.data.mixture import DomainReweighter, natural_weights
from flopwise.data.sampler import PackedSampler
from flopwise.errors import FlopwiseError
from flopwise.methods.base import Method, MethodConfig, RunResources, SamplerOptions, StepOutputs, World
from flopwise.methods.mixture import mixture_field
from flopwise.rundir import read_metrics
from flopwise.section import in_range

if TYPE_CHECKING:
    from flopwise.config import RunConfig


class OnlineMixtureConfig(MethodConfig):
    """``rule``: 'loss' or 'excess' (needs ``reference``, a finished run on the same data); ``eta`` and
    ``smoothing``: DoReMi's step size and mix toward uniform."""

    rule: Literal["loss", "excess"] = "loss"
    reference: str | None = None
    eta: float = 1.0
    smoothing: float = 1e-3

    _smoothing = in_range("smoothing", low=0, high=1, below=True)
    _eta = in_range("eta", low=0)  # 0: the weights stay put


def reference_losses(reference: str | None, domains: list[str]) -> list[float] | None:
    """Per-domain final held-out losses of a finished reference run (DoReMi's reference model)."""
    if reference is None:
        return None
    metrics = Path(reference) / "metrics.jsonl"
    if not metrics.is_file():
        raise FlopwiseError(f"methods.online_mixture.reference='{reference}' is not a finished flopwise run (no "
                            "metrics.jsonl): train the reference run first and give its folder")
    evals = [event for event in read_metrics(metrics) if event["event"] == "eval"]
    final = evals[-1]["domains"] if evals else {}
    missing = [domain for domain in domains if domain not in final]
    if missing:
        raise FlopwiseError(f"methods.online_mixture.reference='{reference}' has no held-out loss for domain "
                            f"'{missing[0]}': use a reference run trained on the same data")
    return [float(final[domain]) for domain in domains]


class OnlineMixture(Method):
    name: ClassVar[str] = "online_mixture"
    Config = OnlineMixtureConfig

    @classmethod
    def check(cls, config: OnlineMixtureConfig, run: RunConfig, world: World | None) -> None:
        if config.rule == "excess" and config.reference is None:
            raise FlopwiseError("methods.online_mixture.rule='excess' needs methods.online_mixture.reference: a "
                                "finished run on the same data whose per-domain held-out losses serve as the "
                                "reference")

    def setup(self, run: RunResources) -> None:
        corpus = run.data.corpus
        self.ranks, self.seq_len, self.ranges = run.ranks, run.seq_len, corpus.train_domain_ranges()
        self.reference = reference_losses(self.config.reference, corpus.domains)
        self._sums: torch.Tensor | None = None  # [2, domains]: summed token losses, token counts

    def sampler_options(self, options: SamplerOptions) -> None:
        if options.weights is None:  # start from the natural mixture
            options.weights = natural_weights(self.ranges, self.seq_len)

    def attach(self, sampler: PackedSampler) -> None:
        c = self.config
        self.sampler = sampler
        self.reweighter = DomainReweighter(base=list(sampler.weights), rule=c.rule, eta=c.eta,
                                           smoothing=c.smoothing, reference=self.reference)

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        """Sum this micro-batch's token losses and counts per domain (on the device: no sync per micro-batch)."""
        sequence, seq_len = outputs.sequence.detach(), outputs.inputs.shape[1]
        domains = outputs.batch.domains.to(sequence.device)
        if self._sums is None:
            self._sums = torch.zeros(2, len(self.ranges), dtype=torch.float64, device=sequence.device)
        self._sums[0].index_add_(0, domains, sequence.double() * seq_len)
        self._sums[1].index_add_(0, domains, torch.full_like(sequence, seq_len, dtype=torch.float64))
        return total

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Fold the step's per-domain losses (all ranks) into the mixture."""
        if self._sums is None:
            return
        count = len(self.ranges)
        totals = self.ranks.sum(self._sums.flatten().tolist())
        self.reweighter.observe(totals[:count], totals[count:])
        self.sampler.set_weights(self.reweighter.weights())
        self._sums = None

    def log_fields(self) -> dict[str, Any]:
        return mixture_field(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.reweighter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reweighter.load_state_dict(state)
