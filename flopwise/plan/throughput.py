"""Measured training throughput of a model shape on this device, cached per device.

Seconds become tokens only through a measurement: at small sizes the vocabulary head,
attention, norms and Python overhead take a share of each step that 6N FLOPs do not see, so the
probe times real optimizer steps (the trainer's own ``train_step``, on random tokens) with the
run's batch, precision, optimizer and memory methods.  Results are cached by everything that
changes them (device, threads, torch version, dtype, shape, batch, optimizer, methods), so
planning the same budget again costs nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flopwise.atomic import write_json_atomic
from flopwise.config import RunConfig
from flopwise.data.sampler import Batch
from flopwise.methods.choose import memory_methods_of
from flopwise.model.config import ModelConfig
from flopwise.runtime import device_name, keep_freed_cpu_memory, synchronize

CACHE_FILE = "throughput.json"


def probe_key(model_cfg: ModelConfig, config: RunConfig, device: torch.device, dtype: torch.dtype) -> str:
    o = config.optim
    return json.dumps({"device": device_name(device), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "dtype": str(dtype), "shape": model_cfg.to_dict(),
                       "batch": o.batch_size, "grad_accum": o.grad_accum, "optimizer": o.name,
                       "methods": sorted(memory_methods_of(config.methods.use)),
                       "keep_freed_memory": config.train.cpu_keep_freed_memory}, sort_keys=True)


class RandomBatches:
    """Uniform random tokens: the step's cost does not depend on which tokens they are."""

    def __init__(self, vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (batch, seq_len + 1)
        self.vocab_size = vocab_size

    def next_batch(self) -> Batch:
        window = torch.randint(self.vocab_size, self.shape, generator=self.generator)
        return Batch(window[:, :-1], window[:, 1:], torch.zeros(self.shape[0], dtype=torch.int64))


def measure_step_seconds(model_cfg: ModelConfig, config: RunConfig, device: torch.device, dtype: torch.dtype,
                         min_seconds: float = 1.5, max_steps: int = 20) -> float:
    """Fastest of at least four optimizer steps (about ``min_seconds`` in all) after two warm-up
    steps.  The fastest is the least disturbed by whatever else the machine runs; what real runs
    lose besides (data, logging, a busier machine) is measured by the scan's pilots and applied as
    their throughput ratio."""
    from flopwise.methods.dense import build_model
    from flopwise.methods.stack import MethodStack
    from flopwise.optim.build import build_optimizer
    from flopwise.train.trainer import train_step

    if device.type == "cpu" and config.train.cpu_keep_freed_memory:
        keep_freed_cpu_memory()  # as the run's session will: it makes small models' steps up to 1.4x faster
    torch.manual_seed(0)
    # what the data is does not change the cost
    methods = MethodStack(config.methods, config.train.seed, names=memory_methods_of(config.methods.use))
    model = build_model(model_cfg, methods.configure).to(device)
    optimizer = build_optimizer(model, config.optim, device, methods.shape_optimizer)
    methods.attach(RandomBatches(model_cfg.vocab_size, config.optim.batch_size, model_cfg.seq_len))
    o = config.optim

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, methods, o.grad_accum, o.grad_clip, device, dtype)
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(2):  # allocation, optimizer states, kernel selection
        step()
    times: list[float] = []
    while len(times) < 4 or (sum(times) < min_seconds and len(times) < max_steps):
        times.append(step())
    return min(times)


class ThroughputCache:
    """Seconds per step by probe key on one device and precision, in ``<cache>/throughput.json``
    (written atomically)."""

    def __init__(self, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.path = cache_dir / CACHE_FILE
        self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @classmethod
    def for_config(cls, config: RunConfig) -> ThroughputCache:
        """On the device and precision a run of ``config`` would use, cached beside its data."""
        from flopwise.data.pipeline import cache_root
        from flopwise.runtime import choose_device, choose_dtype

        device = choose_device(config.train.device)
        return cls(cache_root(config.data), device, choose_dtype(config.train.precision, device))

    def step_seconds(self, model_cfg: ModelConfig, config: RunConfig) -> float:
        key = probe_key(model_cfg, config, self.device, self.dtype)
        if key not in self.entries:
            self.entries[key] = measure_step_seconds(model_cfg, config, self.device, self.dtype)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
        return self.entries[key]

    def tokens_per_second(self, model_cfg: ModelConfig, config: RunConfig) -> float:
        o = config.optim
        return o.batch_size * o.grad_accum * model_cfg.seq_len / self.step_seconds(model_cfg, config)
