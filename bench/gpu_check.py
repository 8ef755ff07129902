"""The GPU check: one command, at most 8 minutes, that measures on the device it runs on what a CPU
cannot show, and writes it all to one JSON file.

1. bf16 training throughput and MFU of three sizes (the largest over 100M parameters), eager and under
   ``torch.compile``: the trainer's own step on random tokens, against the matmul peak measured in the same
   process and, where flopwise ships a profile of the device, its datasheet peak.
2. The memory estimator (flopwise/memory/estimate.py) against ``torch.cuda.max_memory_allocated`` of the
   eager steps.
3. Bit-exact resume: a 30-step run against one stopped at step 12 and resumed.
4. The default recipe's time-to-quality against the baseline recipe at a short budget (flopwise/benchmark.py).
5. The speedrun model options (docs/model.md), every one on: throughput, MFU and the memory estimate of the
   middle size, and bit-exact resume (multi-token prediction included).

    python bench/gpu_check.py --out bench/results/gpu_check.json
    python bench/gpu_check.py --small          # CPU: the same checks on tiny shapes, fp32, no compile (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from flopwise import api
from flopwise.benchmark import TimeToQuality, summarize
from flopwise.config import load_config
from flopwise.methods.choose import estimate_for
from flopwise.methods.dense import build_model
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.optim.build import build_optimizer
from flopwise.plan.device_profile import PROFILES, DeviceProfile
from flopwise.plan.throughput import RandomBatches
from flopwise.rundir import read_metrics
from flopwise.runtime import device_name, measure_matmul_peak, synchronize
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import train_step

HERE = Path(__file__).parent
DEADLINE_SECONDS = 8 * 60
# (name, d_model, n_layers, n_heads, batch): the largest is 117M parameters with the default 8192 vocabulary
GPU_SIZES = (("d256x6", 256, 6, 4, 32), ("d512x8", 512, 8, 8, 32), ("d1024x8", 1024, 8, 16, 16))
SMALL_SIZES = (("d32x2", 32, 2, 2, 2), ("d64x2", 64, 2, 2, 2), ("d64x4", 64, 4, 2, 2))
# Every speedrun option on: the bigram table with the record's 5 x vocabulary rows, the softcap nanochat's 15
OPTIONS = {"value_embeds": True, "x0_lambdas": True, "unet_skips": True, "smear": True, "logit_softcap": 15.0,
           "bigram_hash": 5 * 8192}
OPTION_SETS = [f"model.{key}={str(value).lower()}" for key, value in {**OPTIONS, "mtp_tokens": 2}.items()]


class Clock:
    """Seconds since the check started; parts that would start after the deadline are skipped, and say so."""

    def __init__(self, deadline: float) -> None:
        self.start, self.deadline = time.perf_counter(), deadline

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.start)


def shipped_profile(device: str) -> DeviceProfile | None:
    """The datasheet profile whose name the device's name holds (the longest: "H100 PCIe" before "H100")."""
    name = device.upper().replace("-", " ")
    matches = [key for key in PROFILES if key.upper().replace("-", " ") in name]
    return PROFILES[max(matches, key=len)] if matches else None


def throughput(name: str, cfg: ModelConfig, batch: int, compiled: bool, device: torch.device, dtype: torch.dtype,
               steps: int, peak: float, datasheet: float | None) -> dict[str, Any]:
    """Tokens/s and MFU of the default recipe's optimizer step (Muon + AdamW) at ``batch`` x seq_len."""
    config = load_config(None, [f"optim.batch_size={batch}"])
    torch.manual_seed(0)
    methods = MethodStack(config.methods, config.train.seed)
    model = build_model(cfg, methods.configure).to(device)
    optimizer = build_optimizer(model, config.optim, device, methods.shape_optimizer)
    methods.attach(RandomBatches(cfg.vocab_size, batch, cfg.seq_len))
    step_model = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        train_step(step_model, optimizer, methods, 1, config.optim.grad_clip, device, dtype)
        synchronize(device)
        return time.perf_counter() - start

    warmup_start = time.perf_counter()
    for _ in range(2):  # compilation, allocation, kernel selection
        step()
    warmup = time.perf_counter() - warmup_start
    seconds = sorted(step() for _ in range(steps))[steps // 2]  # the median step
    tokens = batch * cfg.seq_len
    flops = flops_per_token(cfg) * tokens
    row = {"size": name, "parameters": count_parameters(cfg)["total"], "batch": batch, "seq_len": cfg.seq_len,
           "compiled": compiled, "warmup_seconds": warmup, "step_seconds": seconds, "tokens_per_s": tokens / seconds,
           "mfu_measured_peak": flops / seconds / peak,
           "mfu_datasheet": flops / seconds / datasheet if datasheet else None}
    if device.type == "cuda" and not compiled:
        estimate = estimate_for(cfg, batch, [], config.methods, config.optim.name,
                                "bf16" if dtype == torch.bfloat16 else "fp32")
        measured = torch.cuda.max_memory_allocated(device)
        row.update(memory_estimate=estimate.peak, memory_measured=measured, memory_ratio=estimate.peak / measured)
    del model, optimizer, step_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def resume_check(work: Path, overrides: list[str]) -> dict[str, Any]:
    """A 30-step run, and the same run stopped after 12 steps and resumed: identical losses, bit for bit."""
    config = load_config(None, ["budget.steps=30", "train.eval_every=0.5", "train.log_every=1", *overrides])
    quiet = ProgressDisplay(Console(quiet=True), live=False)
    api.run(config, work / "full", display=quiet)
    api.run(config, work / "part", stop_after="12steps", display=quiet)
    api.resume(work / "part", display=quiet)
    curves = [[e["loss"] for e in read_metrics(work / run / "metrics.jsonl") if e["event"] == "train"]
              for run in ("full", "part")]
    differing = [i + 1 for i, (a, b) in enumerate(zip(*curves)) if a != b]
    return {"steps": len(curves[0]), "identical": curves[0] == curves[1], "first_differing_step": differing[:1] or None,
            "max_abs_difference": max((abs(a - b) for a, b in zip(*curves)), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes, fp32, no compile: the CPU version")
    parser.add_argument("--ttq-seconds", type=float, default=None, help="baseline budget T of the time-to-quality "
                        "check (default 60 on a GPU, 3 with --small)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = parser.parse_args()
    console = Console()
    say: Callable[[str], None] = lambda line: console.print(line, highlight=False)  # noqa: E731
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("bench/gpu_check.py: no CUDA device here; run it where one is, or pass --small for the "
                         "CPU version")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and not args.small else torch.float32
    clock = Clock(DEADLINE_SECONDS)
    profile = shipped_profile(torch.cuda.get_device_name(device)) if cuda else None
    datasheet = profile.peak_flops.get("bf16" if dtype == torch.bfloat16 else "fp32") if profile else None
    with tempfile.TemporaryDirectory() as tmp:
        peak = measure_matmul_peak(device, dtype, Path(tmp))
    result: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
                              "small": args.small, "matmul_peak_flops": peak, "datasheet_peak_flops": datasheet,
                              "datasheet_profile": profile.name if profile else None, "skipped": []}
    sizes = SMALL_SIZES if args.small else GPU_SIZES
    seq_len = 32 if args.small else 1024
    rows = []
    for name, d_model, n_layers, n_heads, batch in sizes:
        cfg = ModelConfig(vocab_size=8192, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len)
        for compiled in ((False,) if args.small else (False, True)):
            if clock.left() < 60:
                result["skipped"].append(f"throughput {name} compiled={compiled}: out of time")
                continue
            rows.append(throughput(name, cfg, batch, compiled, device, dtype, 3 if args.small else 20, peak, datasheet))
            r = rows[-1]
            say(f"{name} ({r['parameters'] / 1e6:.1f}M) compile={compiled}: {r['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {r['mfu_measured_peak']:.1%} of the measured peak"
                + (f", {r['mfu_datasheet']:.1%} of the datasheet" if r["mfu_datasheet"] else "")
                + (f"; memory estimate/measured {r['memory_ratio']:.2f}" if "memory_ratio" in r else ""))
    result["throughput"] = rows
    result["options"] = {"throughput": []}
    name, d_model, n_layers, n_heads, batch = sizes[1]
    cfg = ModelConfig(vocab_size=8192, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len, **OPTIONS)
    for compiled in ((False,) if args.small else (False, True)):
        if clock.left() < 120:
            result["skipped"].append(f"options throughput {name} compiled={compiled}: out of time")
            continue
        row = throughput(f"{name}+options", cfg, batch, compiled, device, dtype, 3 if args.small else 20, peak,
                         datasheet)
        result["options"]["throughput"].append(row)
        say(f"{name} with every option compile={compiled}: {row['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{row['mfu_measured_peak']:.1%}" + (f"; memory estimate/measured {row['memory_ratio']:.2f}"
                                                 if "memory_ratio" in row else ""))
    small = ["model.size=tiny", "model.seq_len=32", "optim.batch_size=2", "train.eval_tokens=1024"] if args.small else []
    if clock.left() > 90:
        with tempfile.TemporaryDirectory() as tmp:
            result["resume"] = resume_check(Path(tmp), small)
        say(f"resume: identical={result['resume']['identical']} over {result['resume']['steps']} steps")
    else:
        result["skipped"].append("resume: out of time")
    if clock.left() > 90:
        with tempfile.TemporaryDirectory() as tmp:
            result["options"]["resume"] = resume_check(Path(tmp), [*small, *OPTION_SETS])
        say(f"resume with every option: identical={result['options']['resume']['identical']}")
    else:
        result["skipped"].append("options resume: out of time")
    ttq_seconds = args.ttq_seconds or (3.0 if args.small else 60.0)
    if clock.left() > ttq_seconds * 2.5 + 30:
        bench = TimeToQuality(seconds=ttq_seconds, seeds=(0,), baseline_overrides=small, candidate_overrides=small,
                              divisors=(2, 3, 4))
        result["time_to_quality"] = summarize(bench.run(say))
    else:
        result["skipped"].append("time-to-quality: out of time")
    result["wall_seconds"] = time.perf_counter() - clock.start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    say(f"written: {args.out} ({result['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
