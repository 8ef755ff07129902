"""A static domain mixture: each domain sampled to a fixed share of the training tokens, given by
``weights`` or by ``--data NAME=PATH:WEIGHT`` (the sampler's per-domain streams, flopwise/data/sampler.py)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

from pydantic import field_validator

from flopwise.data.config import DataSection
from flopwise.data.sampler import PackedSampler
from flopwise.data.sources import parse_source
from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunResources, RunView, SamplerOptions


class MixtureConfig(MethodConfig):
    """``weights``: domain -> share of training tokens, every domain named (0 leaves one out)."""

    weights: dict[str, float] = {}

    @field_validator("weights", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(isinstance(weight, bool) for weight in value.values()):
            raise ValueError("must be finite weights >= 0 with a positive sum, not true/false")
        return value

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(0 <= weight < math.inf for weight in value.values()) or (value and sum(value.values()) <= 0):
            raise ValueError("must be finite weights >= 0 with a positive sum")
        return value


def mixture_weights(configured: dict[str, float], sources: Sequence[str], domains: Sequence[str]) -> list[float] | None:
    """The mixture, one weight per corpus domain, from ``methods.mixture.weights`` and ``--data NAME=PATH:WEIGHT``;
    None when neither gives weights (each domain then in proportion to its tokens)."""
    weights = dict(configured)
    for spec in map(parse_source, sources):
        if spec.weight is None:
            continue
        if spec.domain in weights and weights[spec.domain] != spec.weight:
            raise FlopwiseError(f"domain '{spec.domain}' has weight {weights[spec.domain]:g} in "
                                f"methods.mixture.weights and {spec.weight:g} in --data: give it one weight")
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



def mixture_field(sampler: PackedSampler | None) -> dict[str, Any]:
    """The logged ``mixture``: the domain weights in force, when the sampler mixes domains."""
    if sampler is None or not sampler.mixed:
        return {}
    return {"mixture": dict(zip(sampler.names, sampler.weights))}


class StaticMixture(Method):
    name: ClassVar[str] = "mixture"
    Config = MixtureConfig
    stages = PRETRAIN
    legacy_keys = {"mixture.weights": "weights"}
    legacy_switch = ("mixture.weights", {})

    def __init__(self, config: MixtureConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.sampler: PackedSampler | None = None

    @classmethod
    def implied(cls, config: MixtureConfig, data: DataSection, run: RunView) -> bool:
        """Weights in ``--data NAME=PATH:WEIGHT`` or in this section ask for the mixture."""
        return bool(config.weights) or any(parse_source(source).weight is not None for source in data.sources)

    @classmethod
    def weights_config(cls, weights: dict[str, float]) -> dict[str, Any]:
        return {f"methods.{cls.name}.weights": weights}

    def domain_weights(self, sources: Sequence[str], domains: Sequence[str]) -> list[float] | None:
        return mixture_weights(self.config.weights, sources, domains)

    def setup(self, run: RunResources) -> None:
        self.sources, self.domains = run.sources, run.data.corpus.domains

    def sampler_options(self, options: SamplerOptions) -> None:
        options.weights = self.domain_weights(self.sources, self.domains)

    def attach(self, sampler: PackedSampler) -> None:
        self.sampler = sampler

    def log_fields(self) -> dict[str, Any]:
        return mixture_field(self.sampler)
