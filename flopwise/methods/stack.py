"""The methods a run uses, as one object the session and the loop call: each hook of ``MethodStack``
calls that hook of every method in registry order, so the loop names no method.  ``check_method`` is the
one place a method's conflicts and ``check`` are run (by the resolve stage, flopwise/resolve.py)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from flopwise.data.sampler import Batch, PackedSampler
from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import (
    Calibration,
    Method,
    OptimizerSpec,
    RunResources,
    RunView,
    SamplerOptions,
    StepOutputs,
    StepShape,
    TokenOutputs,
    World,
)
from flopwise.methods.registry import BY_NAME, METHODS
from flopwise.model.config import ModelConfig
from flopwise.model.int4 import DEFAULT_GROUP
from flopwise.runtime import autocast

LossResult = tuple[torch.Tensor, torch.Tensor]


def in_registry_order(names: Sequence[str]) -> list[str]:
    """``names`` once each, in the order their hooks run."""
    return [method.name for method in METHODS if method.name in names]


def check_method(name: str, others: Sequence[str], sections: Any, run: RunView, world: World | None) -> None:
    """A one-line error if method ``name`` conflicts with one of ``others`` (either may declare it), cannot apply
    to the run's stage, or cannot run with ``run`` and ``world`` (its ``check``, with its settings from
    ``sections``, a config's ``methods``)."""
    method = BY_NAME[name]
    for other in others:
        reason = method.conflicts.get(other) or BY_NAME[other].conflicts.get(name)
        if reason and other != name:
            first, second = in_registry_order([name, other])
            raise FlopwiseError(f"methods.use cannot combine '{first}' and '{second}' ({reason}): keep one of them")
    if method.stages is not None and run.stage not in method.stages:
        applies = ", ".join(m.name for m in METHODS if m.stages is None or run.stage in m.stages)
        raise FlopwiseError(f"methods.use '{name}' applies to the {' and '.join(method.stages)} stage only, not to "
                            f"{run.stage}: drop it ({applies} apply to {run.stage})")
    method.check(getattr(sections, name), run, world)


def train_shape(names: Sequence[str], sections: Any, model: ModelConfig) -> ModelConfig:
    """The shape a run with the methods ``names`` trains, given the imported model's ``model`` (each method's
    ``train_shape`` in registry order)."""
    for name in in_registry_order(names):
        model = BY_NAME[name].train_shape(getattr(sections, name), model)
    return model


def memory_traits(names: Sequence[str], sections: Any, model: ModelConfig) -> MemoryTraits:
    """What the methods ``names`` (with their config ``sections``, ``config.methods``) change in a step's memory."""
    traits = MemoryTraits(names=tuple(dict.fromkeys(names)))
    for name in in_registry_order(names):
        BY_NAME[name].memory(getattr(sections, name), traits, model)
    return traits


def domain_weights_config(weights: dict[str, float]) -> dict[str, Any]:
    """The config values that make a run sample its domains by ``weights`` (the method that does it says how)."""
    return next(values for method in METHODS if (values := method.weights_config(weights)) is not None)


def matmul_dtype(use: Sequence[str]) -> str | None:
    """The dtype a method in ``use`` has the matmuls compute in (fp8), if any."""
    return next((BY_NAME[name].matmul_dtype for name in use if BY_NAME[name].matmul_dtype), None)


def average_block_density(sections: Any) -> float:
    """The block Linears' nonzero share averaged over the run, as the methods of ``sections.use`` (a config's
    ``methods``) make it: 1 unless one prunes."""
    return math.prod(method.average_block_density(getattr(sections, method.name)) for method in METHODS
                     if method.name in sections.use)


def int4_group(sections: Any) -> int:
    """The int4 group a run's model is meant for (a method's, such as QAT's), else the default one;
    ``sections``: the run config's ``methods``."""
    groups = [group for method in METHODS if method.name in sections.use
              if (group := method.int4_group(getattr(sections, method.name))) is not None]
    return groups[0] if groups else DEFAULT_GROUP


class MethodStack:
    """The methods of one run, built from its config's ``methods`` section; hooks are called in registry order."""

    def __init__(self, sections: Any, seed: int = 0, names: Sequence[str] | None = None) -> None:
        """The methods of ``sections.use`` (a config's ``methods``), or only those of them in ``names``; ``seed``:
        the run's."""
        use = [name for name in sections.use if names is None or name in names]
        self.methods: tuple[Method, ...] = tuple(BY_NAME[name](getattr(sections, name), seed)
                                                 for name in in_registry_order(use))
        self._losses = [m for m in self.methods if type(m).loss is not Method.loss]
        self._token_losses = [m for m in self.methods if type(m).token_loss is not Method.token_loss]
        self.step, self.p = 0, 0.0
        self.full: StepShape | None = None  # the run's own shape (set by the session); None: batches as drawn
        self.shape: StepShape | None = None  # this step's

    @property
    def keeps_gradients(self) -> bool:
        """Whether gradients survive until the optimizer step (so they can be clipped)."""
        return all(m.keeps_gradients for m in self.methods)

    def calibration_windows(self) -> int:
        """The windows of training data ``fill_from`` needs: the most any method asks for."""
        return max((type(m).calibration_windows(m.config) for m in self.methods), default=0)

    def fill_from(self, imported: nn.Module, model: nn.Module, calibration: Calibration) -> None:
        """Fill ``model`` from the ``imported`` one of another shape: the method that changed the shape does it."""
        if not any(method.fill_from(imported, model, calibration) for method in self.methods):
            raise FlopwiseError(f"the run's model shape differs from the imported one and no method in methods.use "
                                f"({', '.join(m.name for m in self.methods) or 'none'}) fills it: start a new run "
                                "with the imported model's shape")

    def configure(self, model: nn.Module) -> None:
        for method in self.methods:
            method.configure(model)

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        for method in self.methods:
            method.shape_optimizer(spec, model)

    def domain_weights(self, sources: Sequence[str], domains: Sequence[str]) -> list[float] | None:
        """The domain weights the config sets (the first method's that sets them), None: the data's own shares."""
        return next((weights for method in self.methods
                     if (weights := method.domain_weights(sources, domains)) is not None), None)

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
        # attention within each document, where the batch says where they are (data.doc_mask)
        segments = None if batch.segments is None else batch.segments.to(device, non_blocking=True)
        with autocast(device, dtype):
            if not self._losses:
                loss = model(x, y, segments=segments)[1]
                return loss, loss.detach()
            logits, token_losses = model(x, y, reduction="none", segments=segments)
            sequence = token_losses.float().mean(dim=1)
            outputs = StepOutputs(batch, x, logits, sequence)
            total = sequence
            for method in self._losses:
                total = method.loss(total, outputs, self.step, self.p)
            return total.mean(), sequence.detach().mean()

    @property
    def changes_token_loss(self) -> bool:
        """Whether a method changes a post-training stage's per-token loss (else the objective keeps its own)."""
        return bool(self._token_losses)

    def token_loss(self, losses: torch.Tensor, outputs: TokenOutputs) -> torch.Tensor:
        """The per-token loss [B, T] of a post-training stage's micro-batch as each method changes it, at this
        step's progress."""
        for method in self._token_losses:
            losses = method.token_loss(losses, outputs, self.step, self.p)
        return losses

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

    def expected_extra_flops(self, tokens: float) -> float:
        """FLOPs the methods expect a step of ``tokens`` tokens to spend beyond the model's own."""
        return sum(m.expected_extra_flops(tokens) for m in self.methods)

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

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Every method's tensors, named ``<method>/<name>``."""
        return {f"{m.name}/{name}": tensor for m in self.methods for name, tensor in m.tensor_state().items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Each method's part of ``tensors`` (empty where the checkpoint holds none of it)."""
        for method in self.methods:
            prefix = f"{method.name}/"
            method.load_tensor_state({name.removeprefix(prefix): t for name, t in tensors.items()
                                      if name.startswith(prefix)})

    def finish(self, model: nn.Module) -> None:
        for method in self.methods:
            method.finish(model)

    def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The methods' state from a checkpoint's extra state: its ``methods`` part, or where an older
        checkpoint kept a method's state (``Method.legacy_state``)."""
        if "methods" in checkpoint:
            self.load_state_dict(checkpoint["methods"])
            return
        self.load_state_dict({m.name: state for m in self.methods if (state := m.legacy_state(checkpoint))})


def split_windows(batch: Batch, seq_len: int) -> Batch:
    """Each window of ``batch`` cut into consecutive windows of ``seq_len`` tokens: the same tokens and
    targets, seen with shorter context (a sequence-length schedule's early steps)."""
    length = batch.inputs.shape[1]
    if seq_len == length:
        return batch
    pieces = length // seq_len
    return Batch(batch.inputs.reshape(-1, seq_len), batch.targets.reshape(-1, seq_len),
                 batch.domains.repeat_interleave(pieces),
                 None if batch.segments is None else batch.segments.reshape(-1, seq_len))
