"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
Adam on the blocks' matrices' gradients projected to rank r, the projection refreshed every
``update_gap`` steps by an SVD and the update projected back and scaled by ``scale``, as an update rule of
flopwise's optimizer (flopwise/optim/optimizer.py) registered here.  The paper's defaults: rank 128-512 for
60M-1B models (d_model // 4), update_gap 200, scale 0.25.

The projector: a rows x cols gradient G is projected onto the span of its top-r singular vectors on the smaller
side, as in the paper's reference code: with rows >= cols, the r leading right singular vectors P (cols x r)
give G @ P (rows x r); otherwise the r leading left singular vectors P (rows x r) give P^T @ G (r x cols).
Adam then keeps its moments for the small projected matrix only, which is where the memory goes; its update is
mapped back with P.  P is a state tensor refreshed from the current gradient every ``update_gap`` steps."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, RunView, World, default_rank
from flopwise.model.config import ModelConfig
from flopwise.optim.optimizer import UpdateRule, adam_moments, decay_weights, register_update_rule
from flopwise.section import in_range

RULE = "galore"  # the optimizer groups' ``update``


def projects_right(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a matrix of this shape is projected on its column side (it is at least as tall as wide)."""
    return shape[0] >= shape[1]


def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (fp32) of the top-``rank`` singular subspace on the gradient's smaller side;
    ``rank`` is clamped to min(rows, cols)."""
    u, _, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    rank = min(rank, *grad.shape)
    return vh[:rank].T.contiguous() if projects_right(grad.shape) else u[:, :rank].contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The low-rank gradient: G @ P (tall) or P^T @ G (wide)."""
    basis = basis.to(grad.dtype)
    return grad @ basis if projects_right(grad.shape) else basis.T @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A low-rank update mapped back to the full ``shape``: U @ P^T (tall) or P @ U (wide)."""
    basis = basis.to(low.dtype)
    return low @ basis.T if projects_right(shape) else basis @ low


def galore_update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Adam on the projected gradient; the moments persist across projection refreshes, as in the paper's
    code, and the weight decay applies to the full weight.  The group carries ``rank``, ``update_gap`` and
    ``scale``; the state adds ``projection`` to Adam's."""
    steps_taken = int(state["step"].item()) if "step" in state else 0
    if steps_taken % group["update_gap"] == 0:
        state["projection"] = projection(grad, group["rank"])
    basis = state["projection"]
    exp_avg, denominator, correction = adam_moments(project(grad, basis), state, group)
    update = project_back(exp_avg / denominator, basis, param.shape)
    decay_weights(param, update, group)
    param.add_(update, alpha=-group["lr"] * group["scale"] / correction)


def _check_group(group: dict[str, Any]) -> None:
    if not (isinstance(group.get("rank"), int) and group["rank"] > 0):
        raise ValueError("galore groups need a positive integer rank")



class GaLoreConfig(MethodConfig):
    """``rank``: of the projection (unset: d_model // 4); ``update_gap``: steps between SVDs; ``scale``: of
    the projected-back update."""

    rank: int | None = None
    update_gap: int = 200
    scale: float = 0.25

    _counts = in_range("rank", "update_gap", low=1)  # rank None: d_model // 4
    _scale = in_range("scale", low=0, above=True)


class GaLore(Method):
    name: ClassVar[str] = "galore"
    Config = GaLoreConfig
    saves_memory = True
    legacy_keys = {f"memory.galore_{key}": key for key in ("rank", "update_gap", "scale")}

    @classmethod
    def check(cls, config: GaLoreConfig, run: RunView, world: World | None) -> None:
        if run.optim.name != "adamw":
            raise FlopwiseError(f"methods.use galore runs Adam on projected gradients and cannot be combined "
                                f"with optim.name={run.optim.name}: set optim.name=adamw")
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: GaLoreConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.low_rank_gradients = default_rank(config.rank, model.d_model)

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        c = self.config
        spec.matrix_update = {"update": RULE, "lr": spec.optim.lr, "weight_decay": spec.optim.weight_decay,
                              "rank": default_rank(c.rank, model.config.d_model), "update_gap": c.update_gap,
                              "scale": c.scale}


register_update_rule(RULE, UpdateRule(galore_update, matrices_only=True, check_group=_check_group,
                                       defaults={"rank": None, "update_gap": GaLoreConfig().update_gap,
                                                 "scale": GaLoreConfig().scale}))
