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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from flopwise.data.sources import parse_source
from flopwise.errors import FlopwiseError

ONLINE_RULES = ("none", "loss", "excess")


@dataclass
class DomainReweighter:
    base: list[float]  # the starting mixture alpha0, normalized
    rule: str = "loss"
    eta: float = 1.0
    smoothing: float = 1e-3
    decay: float = 0.9  # of the moving averages, per update in which the domain appears
    reference: list[float] | None = None  # per-domain reference loss, for "excess"
    averages: list[float] = field(default_factory=list)
    normalizers: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rule not in ONLINE_RULES[1:]:
            raise FlopwiseError(f"methods.online_mixture.rule='{self.rule}' is not one of {', '.join(ONLINE_RULES)}")
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


def resolve_weights(configured: dict[str, float], sources: Sequence[str], domains: Sequence[str]) -> list[float] | None:
    """The mixture, one weight per corpus domain, from ``methods.mixture.weights`` and ``--data NAME=PATH:WEIGHT``;
    None when neither gives weights (each domain then in proportion to its tokens)."""
    weights = dict(configured)
    for spec in map(parse_source, sources):
        if spec.weight is None:
            continue
        if spec.domain in weights and weights[spec.domain] != spec.weight:
            raise FlopwiseError(f"domain '{spec.domain}' has weight {weights[spec.domain]:g} in methods.mixture.weights and "
                                f"{spec.weight:g} in --data: give it one weight")
        weights[str(spec.domain)] = spec.weight
    if not weights:
        return None
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise FlopwiseError(f"mixture weight for '{unknown[0]}', which is not a domain of the data (domains: "
                            f"{', '.join(domains)}): name a domain with --data NAME=PATH:WEIGHT")
    missing = [domain for domain in domains if domain not in weights]
    if missing:
        raise FlopwiseError(f"domain '{missing[0]}' has no mixture weight: give every domain a weight "
                            f"(0 leaves it out), e.g. --set methods.mixture.weights.{missing[0]}=0.5")
    if sum(weights.values()) <= 0:
        raise FlopwiseError("the mixture weights sum to 0: give at least one domain a positive weight")
    return [float(weights[domain]) for domain in domains]


def natural_weights(ranges: Sequence[tuple[int, int]], seq_len: int) -> list[float]:
    """Each domain's share of the training tokens, the mixture that uniform sampling gives; 0 for a domain
    too small for one window of seq_len + 1 tokens."""
    sizes = [end - start if end - start > seq_len else 0 for start, end in ranges]
    return [size / sum(sizes) for size in sizes]
