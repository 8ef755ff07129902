"""The methods a run uses, as one object the session and the loop call: each hook of ``MethodStack``
calls that hook of every method in registry order, so the loop names no method."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from flopwise.data.sampler import Batch, PackedSampler
from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, OptimizerSpec, RunResources, SamplerOptions, StepOutputs, StepShape, World
from flopwise.methods.registry import BY_NAME, METHODS
from flopwise.model.config import ModelConfig
from flopwise.runtime import autocast

if TYPE_CHECKING:
    from flopwise.config import RunConfig

LossResult = tuple[torch.Tensor, torch.Tensor]


def in_registry_order(names: Sequence[str]) -> list[str]:
    """``names`` once each, in the order their hooks run."""
    return [method.name for method in METHODS if method.name in names]


def check_methods(config: RunConfig, world: World | None) -> None:
    """One-line errors for methods that conflict, or cannot run with ``config`` and ``world``."""
    names = config.methods.use
    for name in names:
        for other, reason in BY_NAME[name].conflicts.items():
            if other in names:
                first, second = in_registry_order([name, other])
                raise FlopwiseError(f"methods.use cannot combine '{first}' and '{second}' ({reason}): "
                                    "keep one of them")
    for name in names:
        BY_NAME[name].check(getattr(config.methods, name), config, world)


def memory_traits(names: Sequence[str], sections: Any, model: ModelConfig) -> MemoryTraits:
    """What the methods ``names`` (with their config ``sections``, ``config.methods``) change in a step's memory."""
    traits = MemoryTraits(names=tuple(dict.fromkeys(names)))
    for name in in_registry_order(names):
        BY_NAME[name].memory(getattr(sections, name), traits, model)
    return traits


class MethodStack:
    """The methods of one run, built from its config; hooks are called in registry order."""

    def __init__(self, config: RunConfig, names: Sequence[str] | None = None) -> None:
        """The methods of ``config.methods.use``, or only those of them in ``names``."""
        use = [name for name in config.methods.use if names is None or name in names]
        self.methods: tuple[Method, ...] = tuple(BY_NAME[name](getattr(config.methods, name), config.train.seed)
                                                 for name in in_registry_order(use))
        self._losses = [m for m in self.methods if type(m).loss is not Method.loss]
        self.step, self.p = 0, 0.0
        self.full: StepShape | None = None  # the run's own shape (set by the session); None: batches as drawn
        self.shape: StepShape | None = None  # this step's

    @property
    def keeps_gradients(self) -> bool:
        """Whether gradients survive until the optimizer step (so they can be clipped)."""
        return all(m.keeps_gradients for m in self.methods)

    def configure(self, model: nn.Module) -> None:
        for method in self.methods:
            method.configure(model)

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        for method in self.methods:
            method.shape_optimizer(spec, model)

    def setup(self, run: RunResources) -> None:
        for method in self.methods:
            method.setup(run)

    def sampler_options(self) -> SamplerOptions:
        options = SamplerOptions()
        for method in self.methods:
            method.sampler_options(options)
        return options

    def attach(self, sampler: PackedSampler) -> None:
        self.sampler = sampler
        for method in self.methods:
            method.attach(sampler)

    def shape_at(self, p: float) -> StepShape:
        """The shape of a step taken at budget progress ``p`` (the run's own without progressive methods)."""
        assert self.full is not None, "the session sets the run's shape before training"
        shape = self.full
        for method in self.methods:
            shape = method.step_shape(shape, p)
        return shape

    def shape_breakpoints(self) -> tuple[float, ...]:
        """Where any method's shape changes, in order."""
        return tuple(sorted({p for method in self.methods for p in method.shape_breakpoints()}))

    def begin_step(self, p: float, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepShape | None:
        """Set the shape of the step about to be taken at budget progress ``p`` and let the methods train at it
        (nothing where the session set no shape: post-training's objective draws its own batches)."""
        if self.full is None:
            return None
        self.shape = self.shape_at(p)
        for method in self.methods:
            method.reshape(self.shape, model, optimizer)
        return self.shape

    def on_progress(self, step: int, p: float) -> None:
        """Enter step ``step + 1`` at progress ``p``: the batch and loss hooks read both."""
        self.step, self.p = step, p
        for method in self.methods:
            method.on_progress(step, p)

    def next_batch(self) -> Batch:
        """The first batch a method chooses, else the sampler's next: this step's share of windows, each cut
        into windows of this step's length."""
        for method in self.methods:
            batch = method.next_batch(self.sampler, self.p)
            if batch is not None:
                return batch
        if self.shape is None or self.shape == self.full:
            return self.sampler.next_batch()
        return split_windows(self.sampler.next_batch(self.shape.batch_size // self.sampler.world_size),
                             self.shape.seq_len)

    def loss(self, model: nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype) -> LossResult:
        """(the loss to backpropagate, the plain mean cross-entropy, detached) of one micro-batch.  Without a
        method that changes the loss, the model's own mean loss (no per-token losses or logits kept: they
        would stay alive through backward); else the per-sequence losses as each such method changes them."""
        x, y = batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            if not self._losses:
                loss = model(x, y)[1]
                return loss, loss.detach()
            logits, token_losses = model(x, y, reduction="none")
            sequence = token_losses.float().mean(dim=1)
            outputs = StepOutputs(batch, x, logits, sequence)
            total = sequence
            for method in self._losses:
                total = method.loss(total, outputs, self.step, self.p)
            return total.mean(), sequence.detach().mean()

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for method in self.methods:
            method.before_step(step, model, optimizer)

    def lr_factor(self, step: int) -> float:
        return math.prod(m.lr_factor(step) for m in self.methods)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for method in self.methods:
            method.after_step(step, model, optimizer)

    def take_extra_flops(self) -> float:
        return sum(m.take_extra_flops() for m in self.methods)

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for method in self.methods:
            fields.update(method.log_fields())
        return fields

    def state_dict(self) -> dict[str, Any]:
        return {m.name: state for m in self.methods if (state := m.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for method in self.methods:
            if method.name in state:
                method.load_state_dict(state[method.name])


def split_windows(batch: Batch, seq_len: int) -> Batch:
    """Each window of ``batch`` cut into consecutive windows of ``seq_len`` tokens: the same tokens and
    targets, seen with shorter context (a sequence-length schedule's early steps)."""
    length = batch.inputs.shape[1]
    if seq_len == length:
        return batch
    pieces = length // seq_len
    return Batch(batch.inputs.reshape(-1, seq_len), batch.targets.reshape(-1, seq_len),
                 batch.domains.repeat_interleave(pieces))
