"""Post-training on the built-in data: what a 2-minute SFT buys over its 3-minute pretrained base, what a 2-minute
DPO buys over the SFT model, and packing against one conversation per window.

Runs, through the CLI, each kept so that a rerun skips it:
  base      flopwise train --budget {pretrain}
  sft       flopwise sft --init-from base --budget {sft}            (packed: the default)
  sft-rows  the same with --no-pack                                  (one conversation per window)
  dpo       flopwise dpo --init-from sft --budget {dpo}
The held-out figures are the runs' own evaluations at step 0 (the starting model) and at the end, on the same
held-out records (built-in data: held out by package and help topic).  The fill columns are the shares of a
batch's positions that are assistant targets and padding, over the first 200 batches of each sampler.

    python bench/posttrain.py --seed 0     # then --seed 1, --seed 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_run_config
from flopwise.data.tokenizer import Tokenizer
from flopwise.evaluate.load import load_final_model
from flopwise.posttrain.data import dpo_split, sft_split
from flopwise.posttrain.preference import pair_batch, side_log_probs
from flopwise.posttrain.sampler import ConversationSampler, fill
from flopwise.rundir import planned_model_config, read_metrics

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-posttrain"))
FILL_BATCHES = 200


def flopwise(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "flopwise", *args], check=True, stdout=subprocess.DEVNULL)


def ensure(out: Path, *args: str) -> Path:
    """Run ``flopwise args --out out`` unless a finished run is there."""
    if not (out / "final").is_dir():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        flopwise(*args, "--out", str(out))
    return out


def evals(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the starting model's evaluation, the final one)."""
    events = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]
    assert events[0]["step"] == 0, run
    return events[0], events[-1]


def spent(run: Path) -> dict[str, Any]:
    last = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"][-1]
    return {"steps": last["step"], "seconds": last["seconds"], "flops": last["flops"]}


def fill_shares(run: Path, pack: bool) -> dict[str, float]:
    config = load_run_config(run)
    cfg = planned_model_config(run)
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    split = sft_split(config.posttrain, tokenizer, cfg.seq_len, config.train.seed)
    sampler = ConversationSampler(split.train, cfg.seq_len, config.optim.batch_size, config.train.seed, pack,
                                  tokenizer.eos_id)
    shares = fill(sampler.next_batch() for _ in range(FILL_BATCHES))
    return {"targets": shares.targets, "padding": shares.padding}


@torch.no_grad()
def likelier_chosen(run: Path, dpo: Path) -> list[bool]:
    """Per held-out pair of the DPO run: does ``run``'s final model find the chosen reply likelier?"""
    model, tokenizer = load_final_model(run, torch.device("cpu"))
    config, cfg = load_run_config(dpo), planned_model_config(dpo)
    pairs = dpo_split(config.posttrain, tokenizer, cfg.seq_len, config.train.seed).heldout
    verdicts: list[bool] = []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        width = max(len(side.ids) for pair in chunk for side in (pair.chosen, pair.rejected)) - 1
        chosen, rejected = side_log_probs(model, pair_batch(chunk, width, tokenizer.eos_id), torch.device("cpu"),
                                          torch.float32)
        verdicts += (chosen > rejected).tolist()
    return verdicts


def paired_difference(before: list[bool], after: list[bool], seed: int, resamples: int = 1000
                      ) -> tuple[float, float, float]:
    """after - before in accuracy over the same pairs, with a paired percentile bootstrap 95% interval."""
    rng = random.Random(seed)
    n = len(before)
    diffs = [after[i] - before[i] for i in range(n)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(diffs) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", default="3m")
    parser.add_argument("--sft", default="2m")
    parser.add_argument("--dpo", default="2m")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: bench/results/posttrain_seed<seed>.json)")
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / f"posttrain_seed{args.seed}.json"
    work = WORK / f"seed{args.seed}"
    seed = ["--seed", str(args.seed)]
    base = ensure(work / "base", "train", "--budget", args.pretrain, *seed)
    sft = ensure(work / "sft", "sft", "--init-from", str(base), "--budget", args.sft, *seed)
    rows = ensure(work / "sft-rows", "sft", "--init-from", str(base), "--budget", args.sft, "--no-pack", *seed)
    dpo = ensure(work / "dpo", "dpo", "--init-from", str(sft), "--budget", args.dpo, *seed)

    result: dict[str, Any] = {"seed": args.seed, "budgets": {"pretrain": args.pretrain, "sft": args.sft,
                                                             "dpo": args.dpo}, "sft": {}, "dpo": {}}
    for name, run, pack in (("packed", sft, True), ("one per window", rows, False)):
        start, end = evals(run)
        result["sft"][name] = {"base_loss": start["val_loss"], "sft_loss": end["val_loss"],
                               "heldout_tokens": end["heldout_tokens"], "base_sources": start["domains"],
                               "sft_sources": end["domains"], "fill": fill_shares(run, pack),
                               "epochs": end["epochs"], **spent(run)}
    start, end = evals(dpo)
    result["dpo"] = {"sft_preference_accuracy": start["preference_accuracy"],
                     "dpo_preference_accuracy": end["preference_accuracy"],
                     "reward_accuracy": end["reward_accuracy"], "reward_margin": end["reward_margin"],
                     "heldout_pairs": end["pairs"], "dpo_loss": end["val_loss"],
                     "train_pairs": json.loads((dpo / "plan.json").read_text())["posttrain"]["train"],
                     "epochs": end["epochs"], **spent(dpo)}
    before, after = likelier_chosen(sft, dpo), likelier_chosen(dpo, dpo)
    assert abs(sum(before) - start["preference_accuracy"] * len(before)) <= 1  # the run's own figure, within a tie
    difference, low, high = paired_difference(before, after, args.seed)
    result["dpo"]["difference"] = {"mean": difference, "low": low, "high": high,
                                   "gained": sum(a and not b for a, b in zip(after, before)),
                                   "lost": sum(b and not a for a, b in zip(after, before))}

    console = Console(width=120)
    table = Table(title=f"SFT on the built-in data (seed {args.seed}): held-out assistant-token loss")
    for column in ("windows", "base", "after SFT", "held-out tokens", "steps", "targets", "padding"):
        table.add_column(column, justify="right")
    for name, r in result["sft"].items():
        table.add_row(name, f"{r['base_loss']:.4f}", f"{r['sft_loss']:.4f}", f"{r['heldout_tokens']:,}",
                      str(r["steps"]), f"{r['fill']['targets']:.1%}", f"{r['fill']['padding']:.1%}")
    console.print(table)
    d = result["dpo"]
    table = Table(title=f"DPO after SFT (seed {args.seed}): held-out preference accuracy")
    for column in ("SFT model", "after DPO", "difference [95%]", "reward accuracy", "reward margin",
                   "held-out pairs", "training pairs", "steps"):
        table.add_column(column, justify="right")
    diff = d["difference"]
    table.add_row(f"{d['sft_preference_accuracy']:.3f}", f"{d['dpo_preference_accuracy']:.3f}",
                  f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]",
                  f"{d['reward_accuracy']:.3f}", f"{d['reward_margin']:+.3f}", str(d["heldout_pairs"]),
                  f"{d['train_pairs']:,}", str(d["steps"]))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
