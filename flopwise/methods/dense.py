"""The map between a plain ``GPT``'s block linears and their factorized stand-ins (SLTrain's
sparse plus low-rank, Han et al. 2024; LoRA's adapters, Hu et al. 2021): swap them in, and give
back the plain model's state dict with each stand-in's dense weight, so checkpoints of a factorized
model export and evaluate as an ordinary ``GPT(model.config)``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT


class DenseEquivalent(Protocol):
    """A module that stands in for an ``nn.Linear`` and can say what that Linear's weight is."""

    bias: torch.Tensor | None

    def dense_weight(self) -> torch.Tensor: ...


def block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, Linear) for every ``nn.Linear`` inside ``model.layers``: the
    attention and MLP projections, never the embeddings or the head."""
    for name, parent in list(model.layers.named_modules(prefix="layers")):
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                yield f"{name}.{attr}", parent, attr, child


def replace_block_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Swap every block Linear for ``make(linear)``, in module order (so seeded draws are
    reproducible); returns how many were swapped."""
    count = 0
    for _, parent, attr, linear in block_linears(model):
        setattr(parent, attr, make(linear))
        count += 1
    return count


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a plain ``GPT`` with the same config loads: every stand-in's entries (factors,
    sparse values and indices, adapters, frozen base) replaced by ``<name>.weight`` (and
    ``<name>.bias``) holding its dense weight; the other entries as they are, in the same order."""
    stand_ins: dict[str, DenseEquivalent] = {name: module for name, module in model.named_modules()
                                             if hasattr(module, "dense_weight")}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        module = stand_ins.get(owner)
        if module is None:
            state[key] = value
        elif f"{owner}.weight" not in state:
            state[f"{owner}.weight"] = module.dense_weight()
            if module.bias is not None:
                state[f"{owner}.bias"] = module.bias.detach()
    return state


def build_model(cfg: ModelConfig, configure: Callable[[GPT], None] | None = None,
                initialize: Callable[[GPT], None] | None = None) -> GPT:
    """A ``GPT`` as a run trains it: initial weights first (``--init-from``), then the methods' changes
    (``MethodStack.configure``: LoRA adapts the loaded weights; SLTrain factorizes).  Checkpoints of the
    run load into it."""
    model = GPT(cfg)
    if initialize is not None:
        initialize(model)
    if configure is not None:
        configure(model)
    return model


def plain_model(model: GPT) -> GPT:
    """``model`` itself, or, when methods replaced its linears, a plain ``GPT`` with their dense weights
    (for export, evaluation and sampling, which know only the plain architecture)."""
    if not any(hasattr(module, "dense_weight") for module in model.modules()):
        return model
    plain = GPT(model.config)
    plain.load_state_dict(dense_state_dict(model), strict=True)
    return plain.to(model.embed_tokens.weight.device)
