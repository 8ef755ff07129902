"""RL after SFT on the built-in verifiable tasks: does a 3-minute `flopwise rl` raise the held-out pass@1 of the model
a 3-minute pretrain and a 2-minute SFT made, and what do the allocation rule and the KL term buy at equal budget?

Runs, through the CLI, each kept so that a rerun skips it (under $FLOPWISE_BENCH_WORK, default /tmp/flopwise-rl):
  base        flopwise train --budget {pretrain}
  sft         flopwise sft --init-from base --budget {sft}
  rl          flopwise rl --init-from sft --budget {rl}                   (the defaults)
  rl-<arm>    the same with one choice changed (--arms: uniform, kl, ...)
Each RL run is scored here on the same held-out prompts as the SFT model, prompt by prompt (greedy: passed or
not; sampled: the share of 4 completions at rl.temperature that passed), so each gain has a paired bootstrap
95% interval (10,000 resamples of the prompts).  Prints a table and writes
bench/results/rl_seed<S>.json.

    python bench/rl.py --seed 0 --arms uniform kl    # the gain, and the measured choices
    python bench/rl.py --seed 1 --arms uniform
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_run_config
from flopwise.evaluate.load import load_final_model
from flopwise.posttrain.chat import reply_end_ids
from flopwise.rl.evaluate import SAMPLES, RLEvaluator
from flopwise.rl.objective import render_prompts
from flopwise.rl.rewards import Rewarder
from flopwise.rl.tasks import task_split
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-rl"))
ARMS = {"uniform": ["--set", "rl.allocation=uniform"], "refill": ["--set", "rl.allocation=refill"],
        "kl": ["--set", "rl.kl_beta=0.05"],
        "updates2": ["--set", "rl.updates=2"], "noscale": ["--set", "rl.scale=false"]}
RESAMPLES = 10_000


def ensure(out: Path, *args: str) -> Path:
    """Run ``flopwise args --out out`` unless a finished run is there."""
    if not (out / "final").is_dir():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run([sys.executable, "-m", "flopwise", *args, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def scores(run: Path, reference: Path) -> dict[str, list[float]]:
    """The run's final model on each held-out prompt of ``reference`` (an RL run: its tasks and settings): passed
    greedy (1/0), and the share of its sampled completions that passed."""
    config = load_run_config(reference)
    model, tokenizer = load_final_model(run, torch.device("cpu"))
    _, heldout, sources = task_split(config.posttrain, config.train.seed)
    prompts, _ = render_prompts(tokenizer, heldout, sources, model.config.context, config.rl.max_response)
    evaluator = RLEvaluator(prompts, sources, tokenizer, Rewarder(), reply_end_ids(tokenizer), config.rl.max_response,
                            config.rl.temperature, torch.device("cpu"))
    result = evaluator(model)
    return {"greedy": [float(r > 0) for r in result["greedy_rewards"]], "sampled": result["sampled_passes"]}


def paired_interval(after: list[float], before: list[float], seed: int) -> tuple[float, float, float]:
    """The mean gain in pass@1 and its paired bootstrap 95% interval over prompts."""
    passed = np.array(after) - np.array(before)
    rng = np.random.default_rng(seed)
    means = passed[rng.integers(0, len(passed), size=(RESAMPLES, len(passed)))].mean(axis=1)
    return float(passed.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def rl_summary(run: Path) -> dict[str, Any]:
    events = read_metrics(run / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    return {"steps": trains[-1]["step"], "seconds": trains[-1]["seconds"], "flops": trains[-1]["flops"],
            "rollout_seconds": evals[-1].get("rollout_seconds"), "start": evals[0], "end": evals[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", default="3m")
    parser.add_argument("--sft", default="2m")
    parser.add_argument("--rl", default="3m")
    parser.add_argument("--arms", nargs="*", default=[], choices=sorted(ARMS))
    args = parser.parse_args()
    work = WORK / f"seed{args.seed}"
    seed = ["--seed", str(args.seed)]
    base = ensure(work / "base", "train", "--budget", args.pretrain, *seed)
    sft = ensure(work / "sft", "sft", "--init-from", str(base), "--budget", args.sft, *seed)
    runs = {"rl": ensure(work / "rl", "rl", "--init-from", str(sft), "--budget", args.rl, *seed)}
    for arm in args.arms:
        runs[f"rl-{arm}"] = ensure(work / f"rl-{arm}", "rl", "--init-from", str(sft), "--budget", args.rl, *seed,
                                   *ARMS[arm])
    before = scores(sft, runs["rl"])
    rows: dict[str, Any] = {"sft": {f"pass_{kind}": float(np.mean(before[kind])) for kind in before}}
    for name, run in runs.items():
        after = scores(run, runs["rl"])
        rows[name] = rl_summary(run)
        for kind in after:
            gain, low, high = paired_interval(after[kind], before[kind], args.seed)
            rows[name].update({f"pass_{kind}": float(np.mean(after[kind])), f"gain_{kind}": gain,
                               f"gain_{kind}_low": low, f"gain_{kind}_high": high})
    table = Table(title=f"rl after sft, seed {args.seed}: held-out pass@1, {len(before['greedy'])} prompts "
                        f"(sampled: {SAMPLES} completions each)")
    for column in ("model", "greedy pass@1", "gain [95% CI]", "sampled pass@1", "gain [95% CI]", "steps",
                   "rollout share of training"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        cells = []
        for kind in ("greedy", "sampled"):
            cells.append(f"{row[f'pass_{kind}']:.3f}")
            cells.append("" if name == "sft" else f"{row[f'gain_{kind}']:+.3f} [{row[f'gain_{kind}_low']:+.3f}, "
                                                    f"{row[f'gain_{kind}_high']:+.3f}]")
        extra = ["", ""] if name == "sft" else [str(row["steps"]), f"{row['rollout_seconds'] / row['seconds']:.0%}"]
        table.add_row(name, *cells, *extra)
    Console().print(table)
    out = HERE / "results" / f"rl_seed{args.seed}.json"
    out.write_text(json.dumps({"seed": args.seed, "budgets": {"pretrain": args.pretrain, "sft": args.sft,
                                                              "rl": args.rl}, "rows": rows}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
