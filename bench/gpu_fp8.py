"""FP8 against bf16 on one GPU: training throughput and held-out loss at equal tokens, at 130M parameters.

Each arm is a real budgeted run (flopwise.run) of the same model (1024 wide, 10 blocks, 1024-token context:
130M parameters with the default 4096-token BPE), data, seed, batch and token budget, in bf16 under
torch.compile; the fp8 arms add ``methods.use fp8`` with a torchao recipe (flopwise/methods/fp8.py).  Each
arm runs in its own process, so its compile and its peak memory are its own.  For each it reports the
training throughput (steady: from a fifth of the run on, past the compile; and overall), the peak GPU
memory, the final held-out loss, and the ratios to bf16.

    python bench/gpu_fp8.py                       # bf16, fp8 tensorwise, 1e7 tokens each: sized for ~5 min on an H100
    python bench/gpu_fp8.py --recipes tensorwise rowwise --tokens 2e7
    python bench/gpu_fp8.py --dry-run             # the arms and the model's size, on any machine, without training

Needs an NVIDIA GPU with FP8 (compute capability 8.9 or newer) and torchao (pip install 'flopwise[fp8]');
anywhere else it exits with one line saying why.  Prints the table and writes bench/results/gpu_fp8.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent

SHAPE = ["model.size=large", "model.d_model=1024", "model.n_layers=10", "model.n_heads=16"]
COMMON = ["train.precision=bf16", "train.compile=true", "optim.batch_size=32", "train.eval_every=0",
          "train.checkpoint_every=0", "train.forecast_every=0", "train.eval_tokens=65536"]
STEADY_FROM = 0.2  # budget progress after which throughput is steady (the compile is in the first steps)


def arms(recipes: list[str]) -> dict[str, list[str]]:
    """Each arm's overrides: bf16, then fp8 with each recipe."""
    fp8 = {f"fp8 {recipe}": ["methods.use=[fp8]", f"methods.fp8.recipe={recipe}"] for recipe in recipes}
    return {"bf16": [], **fp8}


def overrides_of(arm: list[str], tokens: float, seed: int, extra: list[str]) -> list[str]:
    return [*COMMON, *SHAPE, f"budget.tokens={tokens:g}", f"train.seed={seed}", *extra, *arm]


def run_arm(overrides: list[str]) -> dict[str, Any]:
    """One training run in this process (called in a child process by main)."""
    import flopwise
    from flopwise.rundir import METRICS_FILE, read_metrics
    from flopwise.train.display import ProgressDisplay

    with tempfile.TemporaryDirectory(prefix="flopwise-fp8-") as tmp:
        run_dir = Path(tmp) / "run"
        summary = flopwise.run(flopwise.load_config(None, overrides), run_dir,
                               display=ProgressDisplay(Console(quiet=True), live=False))
        events = [e for e in read_metrics(run_dir / METRICS_FILE) if e["event"] == "train"]
    first = next(e for e in events if e["p"] >= STEADY_FROM)
    last = events[-1]
    return {"parameters": summary.parameters["total"], "tokens": summary.meter.tokens, "steps": last["step"],
            "seconds": summary.meter.seconds, "tokens_per_s": summary.meter.tokens / summary.meter.seconds,
            "steady_tokens_per_s": (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"]),
            "peak_memory_bytes": max(e["memory"] for e in events), "val_loss": summary.final_eval["loss"]}


def refuse_without_fp8(config_overrides: list[str]) -> None:
    """Exit with the fp8 method's own one-line refusal where this machine cannot run it (no FP8 GPU, no torchao)."""
    import torch

    from flopwise.config import load_config
    from flopwise.errors import FlopwiseError
    from flopwise.methods.base import World
    from flopwise.resolve import resolve

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve(load_config(None, config_overrides), World(1, "ddp", device))
    except FlopwiseError as error:
        raise SystemExit(f"bench/gpu_fp8.py cannot measure fp8 here: {error}") from None


def dry_run(plan: dict[str, list[str]], console: Console) -> None:
    """The arms' validated configs and the model's size and FP8 Linears, without training."""
    from flopwise.config import load_config
    from flopwise.methods.fp8 import FP8_MULTIPLE
    from flopwise.model.flops import count_parameters

    for name, overrides in plan.items():
        config = load_config(None, overrides)
        cfg = config.model.build(config.data.vocab_size)  # the BPE's vocabulary at most
        fits = sum(out % FP8_MULTIPLE == 0 and inp % FP8_MULTIPLE == 0 for _, out, inp in cfg.block_linears)
        in_fp8 = fits if "fp8" in config.methods.use else 0
        console.print(f"{name}: {count_parameters(cfg)['total'] / 1e6:.1f}M parameters, d_model {cfg.d_model}, "
                      f"{cfg.n_layers} blocks, {in_fp8} of {len(cfg.block_linears)} Linears per block in FP8, "
                      f"{config.budget.tokens:g} tokens, methods.use {config.methods.use}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e7, help="training tokens of every arm")
    parser.add_argument("--recipes", nargs="+", default=["tensorwise"], choices=["tensorwise", "rowwise"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], dest="extra", metavar="KEY=VALUE",
                        help="extra config override for every arm")
    parser.add_argument("--dry-run", action="store_true", help="print the arms and the model's size, train nothing")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_fp8.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_arm(json.loads(args.child))))
        return
    plan = {name: overrides_of(arm, args.tokens, args.seed, args.extra) for name, arm in arms(args.recipes).items()}
    console = Console(width=200)
    if args.dry_run:
        dry_run(plan, console)
        return
    refuse_without_fp8(plan[f"fp8 {args.recipes[0]}"])
    rows = []
    for name, overrides in plan.items():
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"bench/gpu_fp8.py: the {name} run failed (exit {done.returncode}): {last}")
        row = dict(json.loads(done.stdout.strip().splitlines()[-1]), arm=name)
        rows.append(row)
        console.print(f"{name:<16} loss {row['val_loss']:.4f}  {row['steady_tokens_per_s']:,.0f} tokens/s steady "
                      f"({row['seconds']:.0f}s)", highlight=False)
    add_ratios(rows)
    console.print(table(rows, args.tokens))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "device": gpu_name(),
                                    "rows": rows}, indent=1))
    console.print(f"written: {args.out}", highlight=False)


def gpu_name() -> str:
    """The GPU the arms ran on, for the JSON record."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}), torch {torch.__version__}"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each arm against bf16: throughput ratios, peak memory ratio, relative held-out loss gap."""
    base = rows[0]
    for row in rows:
        row["speedup"] = row["steady_tokens_per_s"] / base["steady_tokens_per_s"]
        row["overall_speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
        row["loss_gap"] = row["val_loss"] / base["val_loss"] - 1


def table(rows: list[dict[str, Any]], tokens: float) -> Table:
    t = Table(title=f"fp8 against bf16 at equal tokens ({tokens:g} each, one GPU)")
    for column in ("arm", "params", "steps", "tokens/s (steady)", "speedup", "tokens/s (overall)",
                   "overall speedup", "peak memory", "memory ratio", "held-out loss", "loss vs bf16"):
        t.add_column(column, justify="left" if column == "arm" else "right")
    for r in rows:
        t.add_row(r["arm"], f"{r['parameters'] / 1e6:.1f}M", str(r["steps"]), f"{r['steady_tokens_per_s']:,.0f}",
                  f"{r['speedup']:.2f}x", f"{r['tokens_per_s']:,.0f}", f"{r['overall_speedup']:.2f}x",
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['memory_ratio']:.2f}", f"{r['val_loss']:.4f}",
                  f"{r['loss_gap']:+.2%}")
    return t


if __name__ == "__main__":
    main()
