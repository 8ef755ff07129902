"""Training throughput and MFU of named model sizes on this machine.

MFU is model FLOPs per second (6N + attention per token, forward and backward) divided by the
best fp32 (or bf16 where fast) square-matmul rate measured in the same process.  Steps run on
the built-in corpus through flopwise's own trainer step, after a few warm-up steps.

    python bench/throughput.py --sizes tiny small base --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config
from flopwise.runtime import choose_device, choose_dtype, measure_matmul_peak
from flopwise.session import start_new
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import Trainer


def measure(size: str, steps: int, warmup: int, overrides: list[str], peak: float) -> dict:
    # one shape: the model size's own throughput, without progressive training's smaller early steps
    config = load_config(None, [f"model.size={size}", "budget.steps=1000000", "methods.progressive=false", *overrides])
    session = start_new(config, Path("/nonexistent"), ProgressDisplay(live=False))
    settings = dataclasses.replace(session.loop_settings(), eval_every=0, checkpoint_every=0)
    trainer = Trainer(session.compiled, session.optimizer, session.sampler, settings, Path("/nonexistent"),
                      session.device, session.dtype, session.methods, session.display)
    for step in range(warmup):
        trainer.train_step(step, 0.5)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.train_step(step, 0.5)
    seconds = (time.perf_counter() - start) / steps
    return {"size": size, "parameters": session.model.num_parameters(), "tokens_per_step": session.tokens_per_step,
            "seconds_per_step": seconds, "tokens_per_s": session.tokens_per_step / seconds,
            "model_flops_per_s": session.flops_per_step / seconds, "matmul_peak_flops": peak,
            "mfu": session.flops_per_step / seconds / peak, "device": session.device.type,
            "dtype": str(session.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = parser.parse_args()
    device = choose_device("auto")
    peak = measure_matmul_peak(device, choose_dtype("auto", device))
    rows = [measure(size, args.steps, args.warmup, args.overrides, peak) for size in args.sizes]
    table = Table(title=f"training throughput ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    for column in ("size", "params", "tokens/step", "s/step", "tokens/s", "GFLOP/s", "peak GFLOP/s", "MFU"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["size"], f"{r['parameters']:,}", f"{r['tokens_per_step']:,}", f"{r['seconds_per_step']:.3f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['model_flops_per_s'] / 1e9:.1f}",
                      f"{r['matmul_peak_flops'] / 1e9:.1f}", f"{100 * r['mfu']:.1f}%")
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
                                   indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
