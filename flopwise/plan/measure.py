"""Measured peak memory of one training step, to check the estimator in flopwise.memory.estimate against.

On CPU there is no allocator to ask, so ``StorageTracker`` watches every tensor storage that
PyTorch ops create (a dispatch mode sees each op's outputs, forward and backward), counts each
storage once however many views share it, and subtracts it when its last reference dies.  That
is what a caching GPU allocator reports as "allocated", without the allocator's rounding; on
CUDA the allocator's own peak is used instead.  ``rss_step_peak`` measures the whole process
from outside (resident set), which also sees allocator slack and kernels' private buffers.
"""

from __future__ import annotations

import multiprocessing
import resource
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flopwise.methods.stack import MethodStack
from flopwise.runtime import autocast


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storages, and the peak of each named phase.

    Storages that exist before the mode is entered (weights, optimizer states) must be given to
    ``track`` so that the peak includes them; tensors seen later as op inputs are added then."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase = "setup"
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def track(self, tensors: Iterable[Any]) -> None:
        """Count these tensors' storages (each once) from now until they are freed."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._add(tensor.untyped_storage())

    def phase(self, name: str) -> None:
        """Attribute the peak from here on to ``name`` (e.g. forward, backward, optimizer)."""
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.track(tree_leaves((args, kwargs)))
        out = func(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), nbytes)
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
        if self.live > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.live

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[1]


@dataclass
class StepMemory:
    """Bytes: what was alive before the step (weights, optimizer states, buffers), the step's peak,
    and the peak within each phase (forward, backward, optimizer)."""

    before: int
    peak: int
    phases: dict[str, int] = field(default_factory=dict)


def model_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Every tensor a training step finds alive: parameters, gradients, buffers, optimizer states."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += list(model.buffers())
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
    return tensors


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float = 1.0, methods: MethodStack | None = None, step: int = 0,
                  dtype: torch.dtype = torch.float32, on_phase: Callable[[str], None] = lambda name: None) -> float:
    """One micro-batch step as Trainer.run and Trainer.train_step take it (the methods' hooks around it,
    no clipping when they use gradients up in backward), telling ``on_phase`` where it is.
    The logits are dropped as soon as the forward returns, as the trainer drops them."""
    if methods is not None:
        methods.before_step(step, model, optimizer)
    on_phase("forward")
    with autocast(x.device, dtype):
        loss = model(x, y)[1]
    on_phase("backward")
    loss.backward()
    on_phase("optimizer")
    if grad_clip > 0 and (methods is None or methods.keeps_gradients):
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if methods is not None:
        methods.after_step(step + 1, model, optimizer)
    return loss.item()


def measure_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 grad_clip: float = 1.0, methods: MethodStack | None = None, dtype: torch.dtype = torch.float32,
                 warmup: int = 1) -> StepMemory:
    """Peak memory of one training step taken after ``warmup`` steps (which allocate the optimizer
    states).  CUDA: the allocator's peak; elsewhere: StorageTracker's."""
    for step in range(warmup):
        training_step(model, optimizer, x, y, grad_clip, methods, step, dtype)
    if x.device.type == "cuda":
        return _measure_cuda(lambda on_phase: training_step(model, optimizer, x, y, grad_clip, methods, warmup,
                                                            dtype, on_phase), x.device)
    tracker = StorageTracker()
    tracker.track(model_tensors(model, optimizer))
    tracker.track((x, y))
    before = tracker.live
    with tracker:
        training_step(model, optimizer, x, y, grad_clip, methods, warmup, dtype, tracker.phase)
    return StepMemory(before=before, peak=tracker.peak, phases=dict(tracker.phase_peaks))


def measure_training_step(session: Any) -> int:
    """Peak bytes of one more training step of a built ``flopwise.session.Session`` (its model,
    optimizer, methods, next batch and precision), after one warm-up step."""
    x, y = (t.to(session.device) for t in session.sampler.next_batch()[:2])
    return measure_step(session.model, session.optimizer, x, y, session.config.optim.grad_clip,
                        session.methods, session.dtype).peak


def _measure_cuda(step: Callable[[Callable[[str], None]], float], device: torch.device) -> StepMemory:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    phases: dict[str, int] = {}

    def on_phase(name: str) -> None:
        torch.cuda.synchronize(device)
        if phases:
            phases[list(phases)[-1]] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        phases[name] = 0

    step(on_phase)
    on_phase("done")
    phases.pop("done")
    return StepMemory(before=before, peak=max(phases.values()), phases=phases)


def rss_step_peak(build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]],
                  grad_clip: float = 1.0, steps: int = 2) -> int:
    """How far the resident set of a fresh process rises (bytes) above where it stood before it
    built what ``build`` returns (a module-level function, run in the child) and took ``steps``
    training steps: the footprint of training as the operating system sees it, allocator slack and
    kernel workspaces included.  Memory the allocator already held (freed by imports) is reused
    unseen, so this can read low for small models."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_rss_child, (build, grad_clip, steps))


def _rss_child(build: Callable, grad_clip: float, steps: int) -> int:
    _warm_up(grad_clip)
    start = _current_rss()
    model, optimizer, x, y = build()
    for step in range(steps):
        training_step(model, optimizer, x, y, grad_clip, step=step)
    return _max_rss() - start


def _warm_up(grad_clip: float) -> None:
    """One step of a tiny model first: a process's first step imports what torch runs it with (an optimizer's
    step pulls in torch._dynamo, some 300 modules), which is the interpreter's, not training's, footprint, and
    moved the measured rise by hundreds of MB from one process to the next."""
    from flopwise.model.config import ModelConfig
    from flopwise.model.gpt import GPT

    model = GPT(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, seq_len=4))
    x = torch.zeros(1, 4, dtype=torch.long)
    training_step(model, torch.optim.AdamW(model.parameters()), x, x, grad_clip)


def _current_rss() -> int:
    """Resident set of this process now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _max_rss()


def _max_rss() -> int:
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
