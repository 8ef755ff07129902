"""Memory methods at equal tokens: measured memory and held-out loss against plain AdamW.

For the default small model and one about 10x larger, each arm is a real budgeted run (the same
tokens, seed, data and schedule; only the memory methods differ), in its own process so that its
peak resident memory is its own.  For each arm it reports:

- optimizer-state bytes, measured: every tensor the optimizer holds after training (moments,
  8-bit codes and scales, GaLore projections);
- the peak of live tensor memory during one training step, measured (flopwise.plan.measure), next
  to flopwise's estimate for it (flopwise.memory.estimate);
- the process's peak RSS (everything: Python, data, allocator slack);
- the final held-out loss, and ratios to AdamW.

    python bench/memory.py                       # both sizes, all arms (about 35 minutes on 2 cores)
    python bench/memory.py --sizes small --tokens-small 2e5   # quicker look

Prints the table and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent

SIZES: dict[str, list[str]] = {
    "small": [],  # the default recipe's model, 1.3M parameters
    "10x": ["model.d_model=384", "model.n_layers=6", "model.n_heads=6"],  # 12.2M parameters
}
ARMS: dict[str, list[str]] = {
    "adamw": [],
    "8bit adamw": ["8bit"],
    "galore": ["galore"],
    "8bit galore": ["galore", "8bit"],
    "sltrain": ["sltrain"],
    "planner's galore set": ["galore", "8bit", "checkpointing", "layerwise"],  # what --memory picks 4th
}
# Peak LR of each arm, from a sweep on the small model at 0.3M tokens (`--sizes small --tokens-small 3e5
# --arms ARM --lrs ...`; bench/results/memory_lr.json): AdamW's best of 3e-4..1e-2 (also nanoGPT's),
# SLTrain's best of 1e-3..1e-2, GaLore's paper setting 1e-2 with scale 0.25 (3e-2 was 0.5% better).
ARM_LR = {"adamw": 1e-3, "8bit adamw": 1e-3, "galore": 1e-2, "8bit galore": 1e-2, "sltrain": 3e-3,
          "planner's galore set": 1e-2}
COMMON = ["optim.name=adamw", "train.eval_every=0", "train.checkpoint_every=0", "train.eval_tokens=32768"]


def run_arm(size: str, methods: list[str], lr: float, tokens: float, seed: int, extra: list[str]) -> dict[str, Any]:
    """One training run in this process (called in a child process by main)."""
    import torch

    from flopwise.config import load_config
    from flopwise.methods.choose import estimate_for
    from flopwise.plan.measure import measure_training_step
    from flopwise.session import start_new
    from flopwise.train.display import ProgressDisplay
    from flopwise.train.trainer import LoopState

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    overrides = [*COMMON, *SIZES[size], f"optim.lr={lr}", *extra, f"budget.tokens={tokens}", f"train.seed={seed}",
                 f"methods.use={json.dumps(methods)}"]
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory(prefix="flopwise-memory-") as tmp:
        session = start_new(config, Path(tmp) / "run", ProgressDisplay(Console(quiet=True), live=False))
        session.write_run_files()
        summary = session.run(LoopState())
        states = [t for state in session.optimizer.state.values() for t in state.values()
                  if isinstance(t, torch.Tensor)]
        state_bytes = sum(t.numel() * t.element_size() for t in states)
        measured = measure_training_step(session)
    estimate = estimate_for(session.model_cfg, session.resolved.rank_batch, methods, config.methods, config.optim.name)
    return {"size": size, "methods": methods, "lr": lr,
            "parameters": sum(p.numel() for p in session.model.parameters()),
            "tokens": summary.meter.tokens, "seconds": summary.meter.seconds,
            "val_loss": summary.final_eval["loss"], "optimizer_state_bytes": state_bytes,
            "step_peak_measured": measured, "step_peak_estimated": estimate.peak,
            "estimate": estimate.to_dict(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_at_start_bytes": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--tokens-small", type=float, default=8e5)
    parser.add_argument("--tokens-10x", type=float, default=2e5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", nargs="+", type=float, help="run every arm at each of these LRs (an LR sweep)")
    parser.add_argument("--set", action="append", default=[], dest="extra", help="extra config override")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_arm(**job)))
        return
    console = Console(width=200)
    rows = []
    for size in args.sizes:
        tokens = args.tokens_small if size == "small" else args.tokens_10x
        for arm in args.arms:
            for lr in args.lrs or [ARM_LR[arm]]:
                job = {"size": size, "methods": ARMS[arm], "lr": lr, "tokens": tokens, "seed": args.seed,
                       "extra": args.extra}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True,
                                      capture_output=True, text=True)
                row = dict(json.loads(done.stdout.strip().splitlines()[-1]), arm=arm)
                rows.append(row)
                console.print(f"{size:>5} {arm:<12} lr {lr:g}  loss {row['val_loss']:.4f}  states "
                              f"{row['optimizer_state_bytes'] / 2**20:.2f} MiB  step peak "
                              f"{row['step_peak_measured'] / 2**20:.1f} MiB ({row['seconds']:.0f}s)", highlight=False)
    if not args.lrs:
        add_ratios(rows)
    console.print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    console.print(f"written: {args.out}", highlight=False)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each arm against the AdamW arm of its size."""
    for row in rows:
        base = next((r for r in rows if r["size"] == row["size"] and r["arm"] == "adamw"), None)
        if base is None:
            continue
        row["state_ratio"] = row["optimizer_state_bytes"] / base["optimizer_state_bytes"]
        row["peak_ratio"] = row["step_peak_measured"] / base["step_peak_measured"]
        row["loss_gap"] = row["val_loss"] / base["val_loss"] - 1


def table(rows: list[dict[str, Any]]) -> Table:
    mib = 2**20
    t = Table(title="memory methods at equal tokens (ratios to AdamW of the same size)")
    for column in ("model", "arm", "lr", "params", "tokens", "held-out loss", "loss vs AdamW", "optimizer states",
                   "states ratio", "step peak (measured)", "step peak (estimated)", "peak ratio", "peak RSS"):
        t.add_column(column, justify="left" if column in ("model", "arm") else "right")
    for r in rows:
        t.add_row(r["size"], r["arm"], f"{r['lr']:g}", f"{r['parameters'] / 1e6:.2f}M", f"{r['tokens'] / 1e6:.2f}M",
                  f"{r['val_loss']:.4f}", f"{r.get('loss_gap', 0.0):+.2%}",
                  f"{r['optimizer_state_bytes'] / mib:.2f} MiB", f"{r.get('state_ratio', 1.0):.3f}",
                  f"{r['step_peak_measured'] / mib:.1f} MiB", f"{r['step_peak_estimated'] / mib:.1f} MiB",
                  f"{r.get('peak_ratio', 1.0):.3f}", f"{r['peak_rss_bytes'] / mib:.0f} MiB")
    return t


if __name__ == "__main__":
    main()
