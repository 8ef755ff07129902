"""Depth growth by stacking (Du et al. 2024, "Stacking Your Transformers: A Closer Look at Model
Growth for Efficient LLM Pre-Training", the G_stack operator).

The run trains the first ``n_layers / factor`` blocks until budget progress ``at``; then those blocks
are stacked ``factor`` times in depth (block i is copied into blocks i + m, i + 2m, ... for m trained
blocks) and the whole model trains on.  The embeddings, final norm and head are shared, so they carry
over as they are.  The early steps run fewer blocks, so they cost fewer FLOPs and seconds: that is
what buys the budget.

The deeper model exists from the start (its unused blocks take no gradient, so every optimizer skips
them), which keeps one optimizer, one checkpoint format and one compiled model for the whole run.
Optimizer state is stacked with the weights: each copy starts with its source block's Muon momentum,
AdamW moments and step count (8-bit codes, GaLore projections and bf16 compensation alike), so it
continues the update its weights were following instead of restarting Adam's bias correction from
zero for half the model.

With ``function_preserving`` (the default) the copies' output projections (attention's o_proj and the MLP's down_proj) start
at zero with fresh optimizer state, so each copy starts as the identity on the residual stream and the loss is
continuous at the growth (the zero-init idea of Net2Net and of the modded-nanoGPT speedrun's blocks); the copies'
other weights then learn as soon as their output projections leave zero.  G_stack's plain copy instead changes
the function at the growth and needs steps after it to recover; it ended worse at normal speed and, by more,
with the steps after the growth cut to a few (bench/growth.py, bench/RESULTS.md).

The speedrun options' per-block parameters (flopwise/model/gpt.py) are copied by name.  A value embedding (and
its gate) is copied where the source block has one; a copy that has one where its source has none keeps its
initial table, as does a U-net skip weight (only blocks past the middle have one, and they are all copies).
With ``function_preserving`` a copy's x0 lambdas restart at (1, 0) and its skip weight at 0, with fresh
optimizer state, so the copy still starts as the identity: its input is the residual stream alone.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunView, StepShape, World
from flopwise.section import in_range


class GrowDepthConfig(MethodConfig):
    """``factor``: the final depth over the first one (G_stack's g); ``at``: the budget progress of the
    growth."""

    factor: int = 2
    at: float = 0.75  # measured: bench/RESULTS.md#progressive-training
    function_preserving: bool = True  # measured: bench/RESULTS.md#growth-that-keeps-the-function

    _factor = in_range("factor", low=2)
    _at = in_range("at", low=0, high=1, above=True, below=True)


class GrowDepth(Method):
    """Trains the first n_layers/factor blocks until ``at``, then stacks them into all n_layers."""

    name: ClassVar[str] = "grow_depth"
    stages = PRETRAIN
    progressive = True
    survives_extension = False
    Config = GrowDepthConfig
    conflicts = {"lisa": "LISA chooses among blocks that depth growth has not yet trained"}

    def __init__(self, config: GrowDepthConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.factor, self.at, self.function_preserving = config.factor, config.at, config.function_preserving
        self.model: nn.Module | None = None

    @classmethod
    def check(cls, config: GrowDepthConfig, run: RunView, world: World | None) -> None:
        cls.refuse_in_parallel(world, "runs fewer blocks before the growth, and DDP and FSDP need every "
                                      "parameter in every step")
        if run.imported:
            raise FlopwiseError("methods.use 'grow_depth' cannot start from --init-from: it grows a shallow "
                                "model trained from scratch; drop one of them")
        n_layers = run.model.n_layers
        if n_layers % config.factor:
            raise FlopwiseError(f"methods.grow_depth.factor={config.factor} must divide model.n_layers={n_layers}: "
                                "the shallow model's blocks are stacked that many times")

    def configure(self, model: nn.Module) -> None:
        self.model = model
        model.depth = model.config.n_layers // self.factor

    def step_shape(self, shape: StepShape, p: float) -> StepShape:
        return dataclasses.replace(shape, n_layers=shape.n_layers // self.factor) if p < self.at else shape

    def shape_breakpoints(self) -> tuple[float, ...]:
        return (self.at,)

    def reshape(self, shape: StepShape, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if shape.n_layers > model.depth:
            stack_blocks(model, optimizer, shape.n_layers, self.function_preserving)

    def log_fields(self) -> dict[str, Any]:
        return {"depth": self.model.depth}

    def state_dict(self) -> dict[str, Any]:
        return {"depth": self.model.depth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.depth = int(state["depth"])


OUTPUT_PROJECTIONS = {"o_proj", "down_proj"}  # a block's projections onto the residual stream
# A block's option parameters at the values that make it read the residual stream alone (flopwise/model/gpt.py
# Block): lambdas (x, x0) = (1, 0), no U-net skip.
NEUTRAL = {"lambdas": (1.0, 0.0), "skip_weight": (0.0,)}


def is_output_projection(name: str) -> bool:
    """A parameter of a block's output projection (all of them, also a sparse or low-rank one's): at zero, the
    projection adds nothing to the residual stream."""
    return not OUTPUT_PROJECTIONS.isdisjoint(name.split("."))


@torch.no_grad()
def stack_blocks(model: nn.Module, optimizer: torch.optim.Optimizer, depth: int,
                 function_preserving: bool = False) -> None:
    """Copy the ``model.depth`` trained blocks, weights, buffers and optimizer state, into blocks
    depth..``depth``-1 in order (block i into i + m, i + 2m, ...), by name (a parameter only the copy has keeps
    its value and starts with no optimizer state), and run all ``depth`` from now on; ``function_preserving``: the copies' output projections start
    at zero and their option parameters at ``NEUTRAL``, with no optimizer state."""
    trained = model.depth
    for target in range(trained, depth):
        sources = dict(model.layers[target % trained].named_parameters())
        for name, to_param in model.layers[target].named_parameters():
            if function_preserving and (is_output_projection(name) or name in NEUTRAL):
                to_param.copy_(torch.tensor(NEUTRAL.get(name, 0.0)))
                optimizer.state.pop(to_param, None)
                continue
            from_param = sources.get(name)
            if from_param is None:  # unused until now: it starts fresh (a resumed run's optimizer gave it a state)
                optimizer.state.pop(to_param, None)
                continue
            to_param.copy_(from_param)
            if from_param in optimizer.state:
                optimizer.state[to_param] = {key: value.clone() if isinstance(value, torch.Tensor)
                                             else copy.deepcopy(value)
                                             for key, value in optimizer.state[from_param].items()}
        buffers = dict(model.layers[target % trained].named_buffers())
        for name, to_buffer in model.layers[target].named_buffers():
            to_buffer.copy_(buffers[name])
    model.depth = depth
