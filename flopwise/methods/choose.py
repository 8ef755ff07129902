"""Which memory-saving methods a cap calls for, and the estimate of a named set of methods.

The estimator (flopwise/memory/estimate.py) knows methods only through the ``MemoryTraits`` their
``memory`` hooks record; this module names the candidate sets the planner tries, cheapest in quality
first, and settles a run's methods under ``memory.limit`` (for the resolve stage, flopwise/resolve.py, and the
planner's candidate shapes) before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from flopwise.budget import format_bytes
from flopwise.errors import FlopwiseError
from flopwise.memory.estimate import MemoryEstimate, estimate_memory
from flopwise.methods.registry import BY_NAME, MEMORY_METHODS
from flopwise.methods.stack import memory_traits
from flopwise.model.config import ModelConfig
from flopwise.optim.config import OptimSection

# Method sets the planner tries, cheapest in quality first: 8-bit states cost almost nothing,
# recomputation costs time only, bf16 weights with stochastic rounding cost little (bench/low_precision.py),
# GaLore's projected gradients and SLTrain's factorized weights change what is learned.
CANDIDATES: tuple[tuple[str, ...], ...] = (
    (),
    ("8bit",),
    ("8bit", "checkpointing"),
    ("bf16_weights", "8bit", "checkpointing"),
    ("galore", "8bit", "checkpointing", "layerwise"),
    ("bf16_weights", "galore", "8bit", "checkpointing", "layerwise"),
    ("sltrain", "8bit", "checkpointing"),
)


@dataclass
class MethodChoice:
    """The planner's answer: the methods, the optimizer they run with, their estimate, and why."""

    methods: tuple[str, ...]
    optimizer: str
    estimate: MemoryEstimate
    explanation: str


def choose_methods(model_cfg: ModelConfig, micro_batch: int, sections: Any, optim_name: str,
                   limit: float, dtype: str = "fp32", grad_accum: int = 1) -> MethodChoice:
    """The first of ``CANDIDATES`` (cheapest in quality first) whose estimated peak fits ``limit``,
    with a paragraph saying what each candidate tried needed.  Raises FlopwiseError when none fits.
    With ``grad_accum`` > 1, methods that use gradients up in backward are left out (they cannot
    accumulate them).  ``sections``: the run config's ``methods``, whose settings the estimate uses."""
    tried: list[tuple[MemoryEstimate, str]] = []
    for candidate in CANDIDATES:
        methods = tuple(m for m in candidate if grad_accum == 1 or BY_NAME[m].keeps_gradients)
        estimate = estimate_for(model_cfg, micro_batch, methods, sections, optim_name, dtype, grad_accum=grad_accum)
        label = "+".join(methods) if methods else f"no methods (full {optim_name})"
        tried.append((estimate, label))
        if estimate.peak <= limit:
            return MethodChoice(methods, estimate.optimizer, estimate, _explain(tried, limit, optim_name))
    smallest, label = min(tried, key=lambda item: item[0].peak)
    raise FlopwiseError(f"no memory-saving methods fit memory.limit {format_bytes(limit)}: the smallest estimated "
                        f"peak is {format_bytes(smallest.peak)} ({label}); use a smaller model, optim.batch_size or "
                        f"model.seq_len, or raise the limit")


def _explain(tried: list[tuple[MemoryEstimate, str]], limit: float, optim_name: str) -> str:
    """One paragraph: what each candidate needed against the cap, and what is chosen."""
    chosen, label = tried[-1]
    text = f"memory cap {format_bytes(limit)}: "
    if len(tried) > 1:
        misses = ", ".join(f"{name} {format_bytes(e.peak)}" for e, name in tried[:-1])
        text += f"over it at peak are {misses}; "
    text += (f"{label} needs {format_bytes(chosen.peak)} at peak (its crest: {chosen.peak_at}; "
             f"activations {format_bytes(chosen.activations)}, optimizer states "
             f"{format_bytes(chosen.optimizer_states + chosen.projections)}), so it is chosen")
    if "bf16_weights" in chosen.methods:
        text += ("; bf16_weights stores the matrices in bf16 and rounds each update into them "
                 "(methods.bf16_weights.rounding)")
    if chosen.optimizer != optim_name:
        text += f"; GaLore runs Adam on projected gradients, so the optimizer switches from {optim_name} to adamw"
    return text + "."


def estimate_for(model_cfg: ModelConfig, micro_batch: int, methods: Sequence[str], sections: Any, optim_name: str,
                 dtype: str = "fp32", param_dtype: str = "fp32", grad_accum: int = 1) -> MemoryEstimate:
    """The estimate of a step with the methods ``methods`` (settings from ``sections``, a config's ``methods``)."""
    return estimate_memory(model_cfg, micro_batch, memory_traits(methods, sections, model_cfg), optim_name, dtype,
                           param_dtype, grad_accum)


def memory_methods_of(use: Sequence[str]) -> list[str]:
    """The memory-saving methods among ``use`` (a config's ``methods.use``)."""
    return [name for name in use if name in MEMORY_METHODS]


@dataclass(frozen=True)
class MemorySettlement:
    """What a memory cap settles: the methods to add (none when the run names its own), the optimizer they run
    with, and what to tell the user."""

    added: tuple[str, ...]
    optimizer: str
    note: str


def settle_memory_methods(use: Sequence[str], sections: Any, optim: OptimSection, model_cfg: ModelConfig,
                          micro_batch: int, dtype: str, limit: float) -> MemorySettlement:
    """Under the cap ``limit``: choose memory-saving methods where ``use`` names none, or check that the named
    ones fit, for a step computing in ``dtype`` (fp32 or bf16).  ``sections``: the config's ``methods``, whose
    settings the estimate uses."""
    methods = memory_methods_of(use)
    if not methods:
        choice = choose_methods(model_cfg, micro_batch, sections, optim.name, limit, dtype, optim.grad_accum)
        return MemorySettlement(choice.methods, choice.optimizer, choice.explanation)
    estimate = estimate_for(model_cfg, micro_batch, methods, sections, optim.name, dtype, grad_accum=optim.grad_accum)
    if estimate.peak > limit:
        raise FlopwiseError(f"methods.use {methods} need about {format_bytes(estimate.peak)} at peak, over "
                            f"memory.limit {format_bytes(limit)}: add methods, or leave the memory-saving methods "
                            "out for flopwise to choose, or shrink the model or optim.batch_size")
    return MemorySettlement((), optim.name, f"memory: {', '.join(methods)}: estimated peak "
                                            f"{format_bytes(estimate.peak)} within {format_bytes(limit)}")
