"""The optimizer's and the learning-rate schedule's config sections."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from flopwise.optim.schedules import SCHEDULES, Schedule
from flopwise.section import Section, in_range


class OptimSection(Section):
    """AdamW with decoupled weight decay on matrices only; or Muon (or NorMuon) for the blocks' matrices and
    that AdamW (at ``lr``) for embeddings, head, gains and biases.  The ``muon_*`` and ``ns_*`` keys serve NorMuon
    too; ``cautious_weight_decay`` applies to both decays (docs/optimizer.md)."""

    # NorMuon with Polar Express's coefficients: the default since issue 37 (bench/RESULTS.md#the-speed-recipe)
    name: Literal["adamw", "muon", "normuon"] = "normuon"
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    normuon_beta2: float = 0.95
    ns_coefficients: Literal["newton_schulz", "polar_express"] = "polar_express"  # flopwise/optim/muon.py's ITERATIONS
    ns_precision: Literal["fp32", "bf16"] = "fp32"  # ... and its PRECISIONS
    cautious_weight_decay: bool = False

    _rates = in_range("lr", "muon_lr", "eps", low=0, above=True)
    _betas = in_range("beta1", "beta2", "muon_momentum", "normuon_beta2", low=0, high=1, below=True)
    _decay = in_range("weight_decay", "muon_weight_decay", low=0)
    _clip = in_range("grad_clip", low=0)  # 0: no clipping
    _counts = in_range("batch_size", "grad_accum", low=1)


class ScheduleSection(Section):
    """Learning-rate multiplier as a function of budget progress p."""

    name: Literal[SCHEDULES] = "wsd"  # type: ignore[valid-type]
    warmup: float = 0.02
    decay: float = 0.2
    final_lr_frac: float = 0.0

    _fractions = in_range("warmup", "decay", "final_lr_frac", low=0, high=1)

    @model_validator(mode="after")
    def _fits(self) -> ScheduleSection:
        self.build()  # the rules across keys (wsd's warmup + decay within the budget), at validation
        return self

    def build(self) -> Schedule:
        return Schedule(**self.model_dump())
