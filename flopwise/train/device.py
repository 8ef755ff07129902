"""Device and precision choice, and the measured matmul peak that MFU is reported against.

bf16 is chosen only where the hardware computes it fast (CUDA with bf16 support, or CPUs with
AMX / AVX512-BF16): on an AVX2-only CPU a bf16 matmul runs about 100x slower than fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import platform
import resource
import time
from pathlib import Path

import torch

from flopwise.errors import FlopwiseError
from flopwise.atomic import write_json_atomic

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
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
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
