"""Online domain reweighting: mixture weights that follow the per-domain training loss.

The weights are a softmax around the starting mixture, alpha = softmax(log alpha0 + eta * s), with
s_d a score per domain and DoReMi's smoothing toward uniform, (1 - c) alpha + c / K (Xie et al. 2023,
c = 1e-3, eta = 1).  Two rules:

- ``loss``: s_d is domain d's training loss (an exponential moving average of the batches that held
  it), centred over the domains seen: domains the model finds hardest get more data.
- ``excess``: s_d = max(loss_d - reference_d, 0), DoReMi's clipped excess loss over a reference run
  (here the reference's final held-out loss per domain, a small run on the starting mixture): a
  domain the model already predicts as well as the reference does gets no extra data, however hard.

Unlike DoReMi, which trains a proxy model first and then a second run with the proxy's averaged
weights, the weights act on the run itself (online), so no second run is needed.  All state is one
moving average and its normalizer per domain, saved in the checkpoint for exact resume.

The method updates the weights after every step from the losses of all its micro-batches on all ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from flopwise.data.sampler import PackedSampler, natural_weights
from flopwise.errors import FlopwiseError
from flopwise.methods.base import (
    PRETRAIN,
    Method,
    MethodConfig,
    RunResources,
    RunView,
    SamplerOptions,
    StepOutputs,
    World,
)
from flopwise.methods.mixture import mixture_field
from flopwise.rundir import read_metrics
from flopwise.section import in_range

RULES = ("loss", "excess")


class OnlineMixtureConfig(MethodConfig):
    """``rule``: 'loss' or 'excess' (needs ``reference``, a finished run on the same data); ``eta`` and
    ``smoothing``: DoReMi's step size and mix toward uniform."""

    rule: Literal["loss", "excess"] = "loss"
    reference: str | None = None
    eta: float = 1.0
    smoothing: float = 1e-3

    _smoothing = in_range("smoothing", low=0, high=1, below=True)
    _eta = in_range("eta", low=0)  # 0: the weights stay put


@dataclass
class DomainReweighter:
    """The rule's state and weights: the moving average of each domain's training loss and its normalizer."""

    base: list[float]  # the starting mixture alpha0, normalized
    rule: str = "loss"
    eta: float = 1.0
    smoothing: float = 1e-3
    decay: float = 0.9  # of the moving averages, per update in which the domain appears
    reference: list[float] | None = None  # per-domain reference loss, for "excess"
    averages: list[float] = field(default_factory=list)
    normalizers: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise FlopwiseError(f"methods.online_mixture.rule='{self.rule}' is not one of {', '.join(RULES)}")
        if self.rule == "excess" and (self.reference is None or len(self.reference) != len(self.base)):
            raise FlopwiseError("methods.online_mixture.rule='excess' needs methods.online_mixture.reference: a "
                                "finished run on the same data whose per-domain held-out losses serve as the reference")
        if not 0.0 <= self.smoothing < 1.0 or self.eta < 0:
            raise FlopwiseError(f"methods.online_mixture.eta={self.eta:g} must be >= 0 and "
                                f"methods.online_mixture.smoothing={self.smoothing:g} in [0, 1)")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay} must lie in [0, 1)")
        total = sum(self.base)
        self.base = [w / total for w in self.base]
        self.averages = self.averages or [0.0] * len(self.base)
        self.normalizers = self.normalizers or [0.0] * len(self.base)

    def observe(self, loss_sums: Sequence[float], token_counts: Sequence[float]) -> None:
        """Fold in one step's summed per-token training loss and token count per domain (all ranks)."""
        for d, (loss_sum, count) in enumerate(zip(loss_sums, token_counts)):
            if count > 0:
                self.averages[d] = self.decay * self.averages[d] + (1 - self.decay) * loss_sum / count
                self.normalizers[d] = self.decay * self.normalizers[d] + (1 - self.decay)

    def domain_losses(self) -> list[float | None]:
        """The bias-corrected moving average of each domain's loss (None: not seen yet)."""
        return [a / n if n > 0 else None for a, n in zip(self.averages, self.normalizers)]

    def scores(self) -> list[float]:
        losses = self.domain_losses()
        if self.rule == "excess":
            assert self.reference is not None
            return [max(loss - ref, 0.0) if loss is not None else 0.0 for loss, ref in zip(losses, self.reference)]
        seen = [loss for loss in losses if loss is not None]
        centre = sum(seen) / len(seen) if seen else 0.0
        return [loss - centre if loss is not None else 0.0 for loss in losses]

    def weights(self) -> list[float]:
        logits = [math.log(max(w, 1e-30)) + self.eta * s for w, s in zip(self.base, self.scores())]
        top = max(logits)
        raw = [math.exp(v - top) if w > 0 else 0.0 for v, w in zip(logits, self.base)]
        total = sum(raw)
        live = sum(1 for w in self.base if w > 0)
        return [(1 - self.smoothing) * r / total + (self.smoothing / live if w > 0 else 0.0)
                for r, w in zip(raw, self.base)]

    def state_dict(self) -> dict[str, Any]:
        """The averages, and the reference losses: a resume must not depend on the reference run still existing."""
        return {"averages": list(self.averages), "normalizers": list(self.normalizers), "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averages = [float(v) for v in state["averages"]]
        self.normalizers = [float(v) for v in state["normalizers"]]
        self.reference = state["reference"]



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
    stages = PRETRAIN
    legacy_keys = {"mixture.online": "rule", **{f"mixture.{key}": key for key in ("reference", "eta", "smoothing")}}
    legacy_switch = ("mixture.online", "none")

    @classmethod
    def legacy_state(cls, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """Checkpoints written before the method protocol kept this state as ``objective.mixture``."""
        return checkpoint.get("objective", {}).get("mixture")

    @classmethod
    def check(cls, config: OnlineMixtureConfig, run: RunView, world: World | None) -> None:
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
