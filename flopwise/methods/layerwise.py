"""Per-layer updates during backward (Zhao et al. 2024, "GaLore", section 4.2; LOMO, Lv et al. 2023):
each weight is updated the moment its gradient is complete and the gradient freed, so the full set of
gradients is never alive at once and gradient memory drops to about that of the largest layer.

A post-accumulate-grad hook fires once per backward per leaf, after every use of it has added its part (a
tied embedding/head weight included), and updates that parameter through the optimizer's ``update_param``.
The price: there is no global gradient norm to clip by, so the training loop skips clipping (the method
declares ``keeps_gradients = False``), as GaLore's per-layer mode does.  One backward per step and one
process only: gradients cannot be accumulated over micro-batches, and under DDP they are not yet all-reduced
when the hook fires.  The optimizer knows nothing of it: the hooks are installed on its parameters."""

from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, OptimizerSpec, RunView, World
from flopwise.model.config import ModelConfig

_INSTALLED: weakref.WeakKeyDictionary[Any, LayerwiseUpdates] = weakref.WeakKeyDictionary()


class LayerwiseUpdates:
    """Hooks on every parameter of ``optimizer`` (frozen ones too, so a method may unfreeze them later).  Each
    hook updates its parameter with the optimizer's ``update_param`` and frees the gradient it used, so
    ``optimizer.step()`` finds none and does nothing; PyTorch's state-dict tools can still initialize the states
    with a zero-gradient step."""

    def __init__(self, optimizer: Any) -> None:
        if optimizer in _INSTALLED:
            raise ValueError("this optimizer already updates its parameters during backward")
        self.optimizer = optimizer
        # the group is looked up at hook time by index: load_state_dict replaces the group dicts
        self._group_index = {param: index for index, group in enumerate(optimizer.param_groups)
                             for param in group["params"]}
        self._handles = [_register(param, self._on_gradient) for param in self._group_index]
        _INSTALLED[optimizer] = self

    @staticmethod
    def of(optimizer: Any) -> LayerwiseUpdates | None:
        """The hooks installed on ``optimizer``'s parameters, if any."""
        return _INSTALLED.get(optimizer)

    def _on_gradient(self, param: torch.Tensor) -> None:
        self.optimizer.update_param(param, self.optimizer.param_groups[self._group_index[param]])
        param.grad = None

    def remove(self) -> None:
        """Take the hooks off: ``optimizer.step()`` updates every parameter again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _INSTALLED.pop(self.optimizer, None)


def _register(param: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """PyTorch refuses hooks on tensors that do not require grad; a frozen parameter gets its hook
    with requires_grad briefly on, and keeps it should it be unfrozen."""
    requires_grad = param.requires_grad
    param.requires_grad_(True)
    try:
        return param.register_post_accumulate_grad_hook(hook)
    finally:
        param.requires_grad_(requires_grad)


class PerLayerUpdates(Method):
    name: ClassVar[str] = "layerwise"
    saves_memory = True
    keeps_gradients = False

    @classmethod
    def check(cls, config: MethodConfig, run: RunView, world: World | None) -> None:
        if run.optim.grad_accum > 1:
            raise FlopwiseError("methods.use 'layerwise' updates each weight during backward, so it cannot "
                                "accumulate gradients: set optim.grad_accum=1 (raise optim.batch_size instead)")
        cls.refuse_in_parallel(world, "updates weights inside backward, before DDP has reduced "
                                     "their gradients")

    @classmethod
    def memory(cls, config: MethodConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.flopwise_optimizer = True
        traits.updates_in_backward = True

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        spec.wrappers.append(LayerwiseUpdates)
