"""Where and how a run computes: device and precision, the measured matmul peak MFU is reported
against, and running under ``torchrun`` (the process group, data-parallel wrapping, the few
collectives the loop needs).

bf16 is chosen only where the hardware computes it fast (CUDA with bf16 support, or CPUs with
AMX / AVX512-BF16): on an AVX2-only CPU a bf16 matmul runs about 100x slower than fp32.

One rule keeps distributed runs simple: every rank runs the same loop on the same numbers.
``optim.batch_size`` is the global batch, split evenly over the ranks; the loss that is logged,
the step time that drives a seconds budget and an interruption are agreed on by all ranks each
step, so they take the same learning rate, checkpoint at the same step and stop together.
Checkpoints hold full (unsharded) state dicts, so a run saved on N ranks resumes on any number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flopwise.atomic import write_json_atomic
from flopwise.errors import FlopwiseError

_FAST_BF16_CPU = ("AVX512_BF16", "AMX")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_KEEP_FREED_BYTES = 1 << 30


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlopwiseError(f"train.device='{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlopwiseError(f"train.device='{name}' but CUDA is not available here: use train.device=cpu")
    return device


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    return any(flag in capability for flag in _FAST_BF16_CPU)


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 when asked for or when 'auto' finds fast bf16, else fp32."""
    if precision == "fp32" or (precision == "auto" and not fast_bf16(device)):
        return torch.float32
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_cpu_memory() -> bool:
    """Let glibc keep freed blocks (up to 1 GiB each) instead of returning them to the OS.

    A CPU training step frees and reallocates the same large activation buffers every step;
    by default glibc unmaps each one and the next step page-faults it back in.  Keeping them
    made the default model's steps about 1.25x faster on a 2-core machine (bench/allocator.py).
    Returns whether the setting took (False off glibc, e.g. macOS or musl).
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None) -> float:
    """Best FLOP/s of a square matmul on this device and dtype, cached per machine."""
    key = f"{device_name(device)}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    cache_file = cache_dir / "matmul_peak.json" if cache_dir else None
    cached = json.loads(cache_file.read_text()) if cache_file and cache_file.is_file() else {}
    if key in cached:
        return float(cached[key])
    peak = max(_best_matmul_rate(n, device, dtype) for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048)))
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, {**cached, key: peak})
    return peak


def _best_matmul_rate(n: int, device: torch.device, dtype: torch.dtype, repeats: int = 8) -> float:
    """FLOP/s of the fastest of several n x n matmuls (the best run is the least disturbed one)."""
    generator = torch.Generator(device).manual_seed(0)  # the run's own random stream stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up: first touch of memory, thread start
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated GPU memory, or the process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"  # where collective tensors live: NCCL reduces only CUDA tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: float) -> float:
        """The average of ``value`` over the ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.item() / self.world_size

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum over the ranks (one collective for several numbers)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, *values: float) -> tuple[float, ...]:
        """The element-wise maximum over the ranks (one collective for several numbers)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(tensor.tolist())

    @property
    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (e.g. a run folder named from rank 0's clock)."""
        if not self.distributed:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. tokenizing into the cache); the others then find it done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def init_ranks(device_type: str) -> Ranks:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on
    CUDA), or return a single-process Ranks when not launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")), device_type)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return ranks


def wrap_for_training(model: nn.Module, parallel: str, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (``fully_shard`` per block and at the
    root: weights, gradients and optimizer states sharded).  FSDP2 shards ``model`` in place."""
    if not ranks.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ranks.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state dicts on the CPU, keyed by parameter name (a collective
    under FSDP: every rank must call it).  torch.distributed.checkpoint is imported here and in the two below,
    at the first checkpoint, not at start-up, where it cost up to a second before the first step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded model state dict on the CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Inverse of full_state: each rank keeps its shard (FSDP) or the whole (single process, DDP).

    Every weight must be in the checkpoint; optimizer state need not be, since parameters that were
    frozen when it was saved (LISA's inactive blocks) have none and start fresh, as they would have."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=True))
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
