"""A static domain mixture: each domain sampled to a fixed share of the training tokens, given by
``weights`` or by ``--data NAME=PATH:WEIGHT`` (the sampler's per-domain streams, flopwise/data/sampler.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import field_validator

from flopwise.data.mixture import resolve_weights
from flopwise.data.sampler import PackedSampler
from flopwise.data.sources import parse_source
from flopwise.methods.base import Method, MethodConfig, RunResources, SamplerOptions

if TYPE_CHECKING:
    from flopwise.config import RunConfig


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


def mixture_field(sampler: PackedSampler | None) -> dict[str, Any]:
    """The logged ``mixture``: the domain weights in force, when the sampler mixes domains."""
    if sampler is None or not sampler.mixed:
        return {}
    return {"mixture": dict(zip(sampler.names, sampler.weights))}


class StaticMixture(Method):
    name: ClassVar[str] = "mixture"
    Config = MixtureConfig

    def __init__(self, config: MixtureConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.sampler: PackedSampler | None = None

    @classmethod
    def implied(cls, run: RunConfig) -> bool:
        """Weights in ``--data NAME=PATH:WEIGHT`` or in this section ask for the mixture."""
        return bool(getattr(run.methods, cls.name).weights) or any(
            parse_source(source).weight is not None for source in run.data.sources)

    def setup(self, run: RunResources) -> None:
        self.sources, self.domains = run.sources, run.data.corpus.domains

    def sampler_options(self, options: SamplerOptions) -> None:
        options.weights = resolve_weights(self.config.weights, self.sources, self.domains)

    def attach(self, sampler: PackedSampler) -> None:
        self.sampler = sampler

    def log_fields(self) -> dict[str, Any]:
        return mixture_field(self.sampler)
