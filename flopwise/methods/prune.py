"""Magnitude pruning during pre-training, unstructured or 2:4, ramped over budget progress p.

The schedule is gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv:1710.01878): the
share of zeros in each pruned matrix rises from 0 to ``sparsity`` between p = ``start`` and ``end`` along
s(u) = sparsity * (1 - (1 - u)^3), u the ramp's elapsed share (``linear``: sparsity * u), and the masks are
recomputed at ``updates`` evenly spaced points of the ramp (the paper's pruning every Δt steps; 10 points, our
choice, keep each of the cubic's first jumps under 28% of the final sparsity).  The defaults start 0.25 and end
0.75 with the cubic come from Jin et al. 2025, "The Journey Matters: Average Parameter Count over Pre-training
Unifies Sparse and Dense Scaling Laws" (arXiv:2501.12486), which compared 80 schedules and found a ramp over
the middle half of the training compute near-optimal.  ``start == end`` prunes in one shot at that point.

What is pruned: every block Linear's weight (attention q/k/v/o, the MLP), each matrix on its own to the
schedule's share of zeros, by magnitude |w|; never the embeddings, the head, the norms or the model options'
tables.  ``unstructured`` zeroes the round(s * numel) smallest |w| of the matrix; ``2:4`` zeroes, in each
group of 4 consecutive input columns of each row (the layout torch.sparse.to_sparse_semi_structured and
NVIDIA's sparse tensor cores expect), the z smallest, z = the schedule's share rounded down to whole quarters:
1 of 4 once the cubic passes 0.25, 2 of 4 at the ramp's end, so every intermediate mask already lies inside
the final 2:4 pattern and the average parameter count still follows the cubic to within a quarter.

The masks (bool, one per weight) are computed at the step where the schedule's share changes (``reshape``, before
that step's forward, and again where a growth in depth copied trained blocks into new ones) and the pruned
weights are set to zero then and after every optimizer step, so the forward always sees the masked weight, as in
Zhu & Gupta's masked layers. The optimizer's moments of a pruned weight are left alone: the weight is zeroed
again after each update and, being zero, ranks smallest at the next mask update, so it never regrows and its
moments never act. A step's FLOPs count the pruned matrices at their density (StepShape.block_sparsity,
flopwise/model/flops.py), as the sparse scaling papers count; a dense kernel on hardware without sparse support
still multiplies the zeros, which a seconds budget measures as it is. The masks and the share they were made at
are saved in the checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunView, StepShape, World
from flopwise.methods.dense import block_linears
from flopwise.model.config import ModelConfig
from flopwise.section import in_range

GROUP = 4  # 2:4: the input columns of one group


class PruneConfig(MethodConfig):
    """``kind``: unstructured or 2:4; ``sparsity``: the final share of zeros in each pruned matrix (2:4: 0.5);
    ``start`` / ``end``: the budget progress where the ramp begins and ends (equal: one shot); ``schedule``:
    cubic (Zhu & Gupta) or linear; ``updates``: mask recomputations over the ramp."""

    kind: Literal["unstructured", "2:4"] = "unstructured"
    sparsity: float = 0.5
    start: float = 0.25
    end: float = 0.75
    schedule: Literal["cubic", "linear"] = "cubic"
    updates: int = 10

    _sparsity = in_range("sparsity", low=0, high=1, below=True)
    _progress = in_range("start", "end", low=0, high=1)
    _updates = in_range("updates", low=1)

    @field_validator("kind", mode="before")
    @classmethod
    def _sexagesimal(cls, value: Any) -> Any:
        """YAML 1.1 (``--set``, .yaml files) reads an unquoted 2:4 as the base-60 number 2 * 60 + 4."""
        return "2:4" if value == 2 * 60 + 4 else value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.start > self.end:
            raise ValueError(f"start={self.start} lies after end={self.end}: the ramp must start before it ends "
                             "(equal values prune in one shot)")
        if self.kind == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"sparsity={self.sparsity} does not fit kind '2:4', which zeroes 2 of every 4 weights "
                             "(0.5): drop sparsity or use kind 'unstructured'")
        return self


def ramp_points(config: PruneConfig) -> tuple[float, ...]:
    """The budget progress values where the masks are recomputed: ``updates`` evenly spaced points ending at
    ``end`` (one point, ``start``, for a one-shot prune)."""
    if config.start == config.end:
        return (config.start,)
    return tuple(config.start + (config.end - config.start) * i / config.updates
                 for i in range(1, config.updates + 1))


def scheduled_sparsity(config: PruneConfig, p: float) -> float:
    """The share of zeros in each pruned matrix for a step taken at budget progress ``p``: the schedule's value
    at the last ramp point reached (2:4: rounded down to whole quarters)."""
    points = ramp_points(config)
    reached = sum(p >= point for point in points)
    u = reached / len(points)
    share = u if config.schedule == "linear" else 1.0 - (1.0 - u) ** 3
    sparsity = config.sparsity * share
    if config.kind == "2:4":
        return math.floor(GROUP * sparsity + 1e-9) / GROUP
    return sparsity


def average_density(config: PruneConfig, samples: int = 10_000) -> float:
    """The block matrices' density averaged over budget progress p in [0, 1]: the average parameter count over
    the run over the dense one, which Jin et al. 2025 put in a dense scaling law in place of the parameter
    count.  Exact: the density is constant between the ramp points, so the integral is a sum of segments."""
    edges = (0.0, *ramp_points(config), 1.0)
    return sum((high - low) * (1.0 - scheduled_sparsity(config, low)) for low, high in zip(edges, edges[1:]))


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float, kind: str) -> torch.Tensor:
    """True where ``weight`` [out, in] keeps its value at ``sparsity``: all but the round(sparsity * numel)
    smallest |w| (unstructured), or in each row's groups of 4 consecutive input columns all but the
    sparsity * 4 smallest (2:4)."""
    magnitude = weight.detach().abs()
    mask = torch.ones_like(magnitude, dtype=torch.bool)
    if kind == "2:4":
        zeros = round(sparsity * GROUP)
        groups = magnitude.reshape(magnitude.shape[0], -1, GROUP)
        smallest = torch.topk(groups, zeros, dim=-1, largest=False).indices
        return mask.reshape(groups.shape).scatter_(-1, smallest, False).reshape(weight.shape)
    zeros = round(sparsity * magnitude.numel())
    smallest = torch.topk(magnitude.flatten(), zeros, largest=False).indices
    return mask.flatten().index_fill_(0, smallest, False).reshape(weight.shape)


class Prune(Method):
    """Prunes the block Linears' weights by magnitude along a ramp over budget progress p."""

    name: ClassVar[str] = "prune"
    Config = PruneConfig
    stages = PRETRAIN
    survives_extension = False  # its ramp follows the original budget's share: a longer run would unprune
    conflicts = {"lora": "LoRA freezes the block weights that pruning would zero; prune in pretraining",
                 "sltrain": "SLTrain replaces the block Linears' dense weights, which pruning masks"}

    def __init__(self, config: PruneConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.weights: dict[str, nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0  # the share the masks were made at
        self.depth = 0  # the blocks that ran when they were made

    @classmethod
    def check(cls, config: PruneConfig, run: RunView, world: World | None) -> None:
        cls.refuse_sharded(world)
        if config.kind != "2:4":
            return
        widths = {"d_model": run.model.d_model, "MLP hidden": run.model.hidden, "attention": run.model.attn_dim}
        if any(width % GROUP for width in widths.values()):
            shown = ", ".join(f"{name} {width}" for name, width in widths.items())
            raise FlopwiseError(f"methods.prune.kind='2:4' needs every block Linear's input width divisible by 4 "
                                f"({shown}): choose multiples of 4, or kind 'unstructured'")

    @classmethod
    def average_block_density(cls, config: PruneConfig) -> float:
        return average_density(config)

    @classmethod
    def memory(cls, config: PruneConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.pruning_masks = True

    def configure(self, model: nn.Module) -> None:
        self.weights = {name: linear.weight for name, _, _, linear in block_linears(model)}

    def step_shape(self, shape: StepShape, p: float) -> StepShape:
        return dataclasses.replace(shape, block_sparsity=scheduled_sparsity(self.config, p))

    def shape_breakpoints(self) -> tuple[float, ...]:
        return ramp_points(self.config)

    def reshape(self, shape: StepShape, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # a growth in depth (grow_depth) copies trained blocks over ones whose masks were made untrained
        if shape.block_sparsity != self.sparsity or (self.masks and shape.n_layers != self.depth):
            self.sparsity, self.depth = shape.block_sparsity, shape.n_layers
            self.masks = {name: magnitude_mask(weight, self.sparsity, self.config.kind)
                          for name, weight in self.weights.items()}
            self.apply_masks()

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (the optimizer's update moved them)."""
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def log_fields(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity}

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "depth": self.depth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsity, self.depth = state["sparsity"], state["depth"]

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.sparsity and set(tensors) != set(self.weights):
            raise FlopwiseError(f"the checkpoint's pruning masks cover {len(tensors)} matrices, the model has "
                                f"{len(self.weights)}: resume with the config.toml the run was saved with")
        self.masks = {name: tensors[name].to(self.weights[name].device) for name in tensors}
