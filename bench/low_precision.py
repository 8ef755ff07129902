"""Low precision at equal tokens on the default corpus: what bf16 weights cost, what their rounding buys,
and what quantization-aware training buys a 4-bit model.

Parts (each run is recorded when it finishes, so a rerun skips what is done):

- ``bf16``: per seed, the default recipe with fp32 weights against bf16 weights (methods.use bf16_weights)
  with stochastic rounding, Kahan compensation and plain round-to-nearest, all for the same tokens, scored
  by the final held-out loss; the gap is relative to the fp32 run of the same seed.
- ``speed``: seconds per step of the same model with fp32 and bf16 weights, under fp32 compute (each Linear
  upcasts its bf16 weight per call) and bf16 compute (train.precision=bf16), the arms alternated over
  ``--repeats`` rounds of short runs on one machine; reported as medians and ratios to fp32 weights.
- ``memory``: the measured peak of one training step (CPU tensor bytes, flopwise/plan/measure.py's
  StorageTracker) with fp32 and bf16 weights, under fp32 and bf16 compute, for the default model and a
  wider one whose weights weigh more, beside the estimator's figure.
- ``qat``: per seed, the fp32 run's held-out loss in full precision and rounded to int4 (``flopwise eval
  --quantize int4``), against a run with QAT from p = ``--qat-start`` rounded the same way; with
  ``--qat-starts`` a sweep of the start on the first seed, to choose the default.

    python bench/low_precision.py --tokens 800k --seeds 0 1 2 --parts bf16 speed memory qat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-low-precision"))
ROUNDINGS = ("stochastic", "kahan", "nearest")
ARMS: dict[str, list[str]] = {"fp32": [], **{f"bf16-{r}": ["--method", "bf16_weights", "--set",
                                                           f"methods.bf16_weights.rounding={r}"] for r in ROUNDINGS}}


def train(out: Path, tokens: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """One run of the default recipe through the CLI (skipped when finished before); its final figures."""
    if not (out / "final").is_dir():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [sys.executable, "-m", "flopwise", "train", "--budget", tokens, "--seed", str(seed), "--out",
                   str(out), "--set", "train.forecast_every=0", *extra]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in events if e["event"] == "train"][-1]
    return {"val_loss": [e for e in events if e["event"] == "eval"][-1]["val_loss"], "tokens": last["tokens"],
            "steps": last["step"], "seconds": last["seconds"], "run": str(out)}


def evaluate(run: Path, quantize: bool) -> float:
    """The run's held-out loss through ``flopwise eval`` (on all its held-out tokens), optionally int4-rounded."""
    name = "eval-int4.json" if quantize else "eval.json"
    if not (run / name).is_file():
        subprocess.run([sys.executable, "-m", "flopwise", "eval", str(run), *(["--quantize", "int4"] if quantize
                                                                              else [])],
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads((run / name).read_text())["loss"]


def bf16_part(tokens: str, seeds: list[int], console: Console) -> dict[str, Any]:
    rows = {arm: {seed: train(WORK / f"{arm}-s{seed}", tokens, seed, extra) for seed in seeds}
            for arm, extra in ARMS.items()}
    table = Table(title=f"bf16 weights against fp32 weights, {tokens} tokens each, default corpus")
    for column in ("arm", *(f"seed {s}" for s in seeds), "mean gap vs fp32", "tokens/s (under load)"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    summary: dict[str, Any] = {}
    for arm, runs in rows.items():
        gaps = [runs[s]["val_loss"] / rows["fp32"][s]["val_loss"] - 1 for s in seeds]
        speed = statistics.mean(runs[s]["tokens"] / runs[s]["seconds"] for s in seeds)
        summary[arm] = {"runs": runs, "gaps": gaps, "mean_gap": statistics.mean(gaps), "tokens_per_second": speed}
        table.add_row(arm, *(f"{runs[s]['val_loss']:.4f}" for s in seeds), f"{100 * statistics.mean(gaps):+.2f}%",
                      f"{speed:,.0f}")
    console.print(table)
    return summary


SPEED_ARMS: dict[str, list[str]] = {
    "fp32 weights, fp32 compute": ["--set", "train.precision=fp32"],
    "bf16 weights, fp32 compute": ["--set", "train.precision=fp32", "--method", "bf16_weights"],
    "fp32 weights, bf16 compute": ["--set", "train.precision=bf16"],
    "bf16 weights, bf16 compute": ["--set", "train.precision=bf16", "--method", "bf16_weights"],
}


def step_seconds(out: Path, extra: list[str], steps: int) -> float:
    """Median training seconds per step of a fresh ``steps``-step run, its first fifth (warm-up) left out."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run([sys.executable, "-m", "flopwise", "train", "--budget", f"{steps}steps", "--out", str(out),
                    "--set", "train.forecast_every=0", "--set", "train.log_every=1", "--set", "train.eval_every=0",
                    *extra], check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [e["seconds"] for e in events if e["event"] == "train"]
    per_step = [b - a for a, b in zip(seconds, seconds[1:])][steps // 5:]
    return statistics.median(per_step)


def speed_part(repeats: int, steps: int, console: Console) -> dict[str, Any]:
    times: dict[str, list[float]] = {arm: [] for arm in SPEED_ARMS}
    for _ in range(repeats):  # arms alternated, so a slow spell of the machine hits all of them
        for arm, extra in SPEED_ARMS.items():
            times[arm].append(step_seconds(WORK / "speed", extra, steps))
    base = statistics.median(times["fp32 weights, fp32 compute"])
    table = Table(title=f"seconds per step, default model, {repeats} alternated rounds of {steps} steps")
    for column in ("arm", "median s/step", "vs fp32 weights, fp32 compute"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, values in times.items():
        table.add_row(arm, f"{statistics.median(values):.4f}", f"{statistics.median(values) / base:.2f}x")
    console.print(table)
    return {arm: {"seconds": values, "median": statistics.median(values),
                  "ratio": statistics.median(values) / base} for arm, values in times.items()}


MEMORY_SHAPES: dict[str, tuple[list[str], int]] = {  # name: (model overrides, micro-batch)
    "default model (batch 8)": ([], 8),
    "512 wide, 8 layers (batch 1)": (["model.d_model=512", "model.n_layers=8", "model.n_heads=8"], 1),
}
MEMORY_ARMS: dict[str, list[str]] = {
    "fp32 weights": [],
    "bf16 weights, stochastic": ["methods.use=[\"bf16_weights\"]"],
    "bf16 weights, kahan": ["methods.use=[\"bf16_weights\"]", "methods.bf16_weights.rounding=kahan"],
}


def memory_part(console: Console) -> dict[str, Any]:
    """One training step of each shape, weight storage and compute dtype (fp32, or bf16 under autocast),
    measured as live CPU tensor bytes, beside the estimator's figure."""
    from flopwise.config import load_config
    from flopwise.methods.choose import estimate_for
    from flopwise.methods.stack import MethodStack
    from flopwise.model.gpt import GPT
    from flopwise.optim.build import build_optimizer
    from flopwise.plan.measure import measure_step

    table = Table(title="peak memory of one training step (CPU tensor bytes, StorageTracker)")
    for column in ("shape", "compute", "weights", "measured peak", "estimated peak", "weights + states",
                   "peak vs fp32 weights"):
        table.add_column(column, justify="left" if column in ("shape", "compute", "weights") else "right")
    results: dict[str, Any] = {}
    for shape, (overrides, batch) in MEMORY_SHAPES.items():
        for compute in ("fp32", "bf16"):
            base = None
            for label, arm in MEMORY_ARMS.items():
                config = load_config(None, [*overrides, *arm])
                cfg = config.model.build(4096)
                torch.manual_seed(0)
                model, stack = GPT(cfg), MethodStack(config.methods, config.train.seed)
                stack.configure(model)
                optimizer = build_optimizer(model, config.optim, torch.device("cpu"), stack.shape_optimizer)
                x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len)) for _ in range(2))
                dtype = torch.bfloat16 if compute == "bf16" else torch.float32
                measured = measure_step(model, optimizer, x, y, config.optim.grad_clip, stack, dtype)
                estimate = estimate_for(cfg, batch, config.methods.use, config.methods, config.optim.name, compute)
                base = base or measured.peak
                results[f"{shape} | {compute} compute | {label}"] = {
                    "measured_peak": measured.peak, "estimated_peak": estimate.peak, "before_step": measured.before}
                table.add_row(shape, compute, label, f"{measured.peak / 2**20:.1f} MiB",
                              f"{estimate.peak / 2**20:.1f} MiB", f"{measured.before / 2**20:.1f} MiB",
                              f"{measured.peak / base:.3f}")
    console.print(table)
    return results


def qat_part(tokens: str, seeds: list[int], start: float, starts: list[float], console: Console) -> dict[str, Any]:
    sweep = {}
    for candidate in starts:  # first seed only: which start keeps the int4 model closest to full precision
        run = WORK / f"qat{candidate:g}-s{seeds[0]}"
        train(run, tokens, seeds[0], ["--method", "qat", "--set", f"methods.qat.start={candidate}"])
        sweep[candidate] = {"full": evaluate(run, False), "int4": evaluate(run, True)}
    rows = {}
    for seed in seeds:
        plain = WORK / f"fp32-s{seed}"
        train(plain, tokens, seed, [])
        qat = WORK / f"qat{start:g}-s{seed}"
        train(qat, tokens, seed, ["--method", "qat", "--set", f"methods.qat.start={start}"])
        rows[seed] = {"full_precision": evaluate(plain, False), "int4_without_qat": evaluate(plain, True),
                      "qat_full_precision": evaluate(qat, False), "int4_with_qat": evaluate(qat, True)}
    table = Table(title=f"int4 round-to-nearest after {tokens} tokens, QAT from p = {start:g}")
    columns = ("seed", "full precision", "int4 without QAT", "int4 with QAT", "QAT model, full precision",
               "gap without", "gap with")
    for column in columns:
        table.add_column(column, justify="right")
    for seed, r in rows.items():
        table.add_row(str(seed), *(f"{r[k]:.4f}" for k in ("full_precision", "int4_without_qat", "int4_with_qat",
                                                           "qat_full_precision")),
                      f"{r['int4_without_qat'] - r['full_precision']:+.4f}",
                      f"{r['int4_with_qat'] - r['full_precision']:+.4f}")
    console.print(table)
    if sweep:
        start_table = Table(title=f"QAT start, seed {seeds[0]}")
        for column in ("start p", "full precision", "int4", "int4 - full precision of the fp32 run"):
            start_table.add_column(column, justify="right")
        base = rows[seeds[0]]["full_precision"]
        for candidate, r in sweep.items():
            start_table.add_row(f"{candidate:g}", f"{r['full']:.4f}", f"{r['int4']:.4f}", f"{r['int4'] - base:+.4f}")
        console.print(start_table)
    return {"start": start, "seeds": rows, "start_sweep": sweep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="800k", help="the token budget of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=("bf16", "speed", "memory", "qat"),
                        default=["bf16", "speed", "memory", "qat"])
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of the speed part")
    parser.add_argument("--steps", type=int, default=60, help="steps of each speed run")
    parser.add_argument("--qat-start", type=float, default=0.8, help="QAT's start p for the per-seed comparison")
    parser.add_argument("--qat-starts", type=float, nargs="*", default=[], help="starts to sweep on the first seed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "low_precision.json")
    args = parser.parse_args()
    console = Console(width=160)
    WORK.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update(tokens=args.tokens, machine=f"{os.cpu_count()} cores, torch {torch.__version__}")
    if "bf16" in args.parts:
        results["bf16"] = bf16_part(args.tokens, args.seeds, console)
    if "speed" in args.parts:
        results["speed"] = speed_part(args.repeats, args.steps, console)
    if "memory" in args.parts:
        results["memory"] = memory_part(console)
    if "qat" in args.parts:
        results["qat"] = qat_part(args.tokens, args.seeds, args.qat_start, args.qat_starts, console)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
