"""Settle a run's memory methods before anything is built: check that they suit this run (one
process or many, gradient accumulation), and, given a cap (``--memory``), pick them or check that
the chosen ones fit.  The resolved set is written to config.toml, so a resume rebuilds the same run."""

from __future__ import annotations

from flopwise.budget import format_bytes
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig

# Methods that change which tensors exist or when they are updated in ways the data-parallel
# wrappers do not see: DDP reduces gradients in buckets after the per-layer hooks would have
# used them, and it fixes the set of trained parameters when it wraps the model.
SINGLE_PROCESS = {"layerwise": "updates weights inside backward, before DDP has reduced their gradients",
                  "lisa": "changes which layers train, while DDP fixes that set when it wraps the model"}
# FSDP2 shards every tensor as a DTensor; these methods work on whole local matrices.
NOT_WITH_FSDP = ("8bit", "galore", "sltrain", "lora")


def check_method_constraints(config: RunConfig, world_size: int) -> None:
    """One-line errors for method sets this run cannot use."""
    methods = config.memory.methods
    if "lora" in methods and not config.model.init_from:
        raise FlopwiseError("memory.methods 'lora' fine-tunes an imported model through adapters on frozen weights, "
                            "and random frozen weights learn nothing: add --init-from MODEL, or drop lora")
    if "layerwise" in methods and config.optim.grad_accum > 1:
        raise FlopwiseError("memory.methods 'layerwise' updates each weight during backward, so it cannot "
                            "accumulate gradients: set optim.grad_accum=1 (raise optim.batch_size instead)")
    if world_size > 1:
        for name in methods:
            if name in SINGLE_PROCESS:
                raise FlopwiseError(f"memory.methods '{name}' runs in one process only (it {SINGLE_PROCESS[name]}): "
                                    "run without torchrun, or drop it")
            if config.train.parallel == "fsdp" and name in NOT_WITH_FSDP:
                raise FlopwiseError(f"memory.methods '{name}' is not supported with --parallel fsdp (FSDP2 shards "
                                    "already save its memory): use --parallel ddp, or drop it")


def resolve_memory_methods(config: RunConfig, model_cfg: ModelConfig, micro_batch: int, dtype: str) -> str | None:
    """With ``memory.limit`` set: choose methods (when none are given) or check the given ones fit,
    for a step computing in ``dtype`` (fp32 or bf16).  Returns what to tell the user, or None when
    no cap is set."""
    from flopwise.plan.memory import choose_methods, estimate_memory

    memory = config.memory
    if memory.limit is None:
        return None
    if not memory.methods:
        choice = choose_methods(model_cfg, micro_batch, memory, config.optim.name, memory.limit, dtype,
                                config.optim.grad_accum)
        memory.methods = list(choice.methods)
        if "galore" in choice.methods:
            config.optim.name = "adamw"
        return choice.explanation
    estimate = estimate_memory(model_cfg, micro_batch, memory.methods, memory, config.optim.name, dtype,
                               grad_accum=config.optim.grad_accum)
    if estimate.peak > memory.limit:
        raise FlopwiseError(f"memory.methods {memory.methods} need about {format_bytes(estimate.peak)} at peak, "
                            f"over memory.limit {format_bytes(memory.limit)}: add methods, or leave memory.methods "
                            "empty for flopwise to choose, or shrink the model or optim.batch_size")
    return (f"memory: {', '.join(memory.methods)}: estimated peak {format_bytes(estimate.peak)} "
            f"within {format_bytes(memory.limit)}")
