"""Small models that ship: sparse against dense at equal final size, distilled against scratch at an equal budget
that counts the teacher, and the Minitron path (prune a trained model, then distill) against scratch.

Every run is a plain run (``methods.progressive=false``, so that growth and schedules do not mix with the method
measured) on the built-in corpus, with a load-independent budget (tokens or FLOPs), so that a busy machine changes
only the time the bench takes.  Each comparison is per seed, as the difference of held-out losses on the same
windows, with a paired bootstrap 95% interval over those windows; and over seeds, as the mean difference.

    python bench/compress.py --parts sparse distill minitron --seeds 0 1 2

``sparse``: the default model (d_model 128, 4 blocks) pruned to 50% (unstructured, ramped 0.25 -> 0.75 and 0 -> 0.5;
2:4, ramped 0.25 -> 0.75) against a dense model with the same count of nonzero block weights (2 blocks: exactly half),
and the dense 4-block model, all for the same tokens.  ``distill``: a d_model 64 x 4 student distilled from a
d_model 128 x 4 teacher trained for 4x the tokens, against the student from scratch, at one FLOP budget that
counts the teacher's forward passes.  ``minitron``: the teacher width-pruned (half the heads and MLP channels, by
activation importance) and distilled from itself, against that small shape from scratch, at one FLOP budget.

Prints the tables and writes JSON (bench/results/compress.json by default).
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
from flopwise.data.pipeline import prepare_data
from flopwise.evaluate.heldout import Evaluator
from flopwise.evaluate.load import load_final_model
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-compress"))
RESAMPLES = 10_000
EVAL_TOKENS = 32_768  # per domain, at the end (the runs' own final evaluation reads 4x this)
PLAIN = ["methods.progressive=false", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=50",
         f"train.eval_tokens={EVAL_TOKENS}"]
STUDENT = ["model.d_model=64", "model.n_layers=4", "model.n_heads=2"]
SPARSE_ARMS: dict[str, list[str]] = {
    "dense 4 blocks": [],
    "dense 2 blocks (equal nonzero)": ["model.n_layers=2"],
    "50% unstructured, 0.25->0.75": ["methods.use=[\"prune\"]"],
    "50% unstructured, 0->0.5": ["methods.use=[\"prune\"]", "methods.prune.start=0.0", "methods.prune.end=0.5"],
    "2:4, 0.25->0.75": ["methods.use=[\"prune\"]", "methods.prune.kind=\"2:4\""],
}
SPARSE_REFERENCE = "dense 2 blocks (equal nonzero)"


def train(out: Path, budget: str, seed: int, sets: list[str], *extra: str) -> Path:
    """``flopwise train`` into ``out`` unless a finished run is there."""
    if not (out / "final").is_dir():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        flags = [flag for value in [*PLAIN, *sets] for flag in ("--set", value)]
        done = subprocess.run([sys.executable, "-m", "flopwise", "train", "--budget", budget, "--seed", str(seed),
                               "--out", str(out), *flags, *extra], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{out.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def summary(run: Path) -> dict[str, Any]:
    """The run's final held-out loss, what it spent, and its model's nonzero block weights."""
    events = read_metrics(run / "metrics.jsonl")
    final = [e for e in events if e["event"] == "eval"][-1]
    spent = [e for e in events if e["event"] == "train"][-1]
    model, _ = load_final_model(run, torch.device("cpu"))
    blocks = [p for name, p in model.named_parameters() if ".blocks." in f".{name}" and p.dim() == 2]
    return {"val_loss": final["val_loss"], "tokens": spent.get("tokens"), "flops": spent.get("flops"),
            "steps": spent.get("step"), "block_weights": sum(p.numel() for p in blocks),
            "nonzero_block_weights": int(sum(int((p != 0).sum()) for p in blocks))}


def window_losses(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's final model on each held-out window (the same windows for every run of one data and tokenizer)."""
    config = load_run_config(run)
    model, tokenizer = load_final_model(run, torch.device("cpu"))
    corpus = prepare_data(config.data, config.train.seed, tokenizer).corpus
    evaluator = Evaluator(corpus, tokenizer.token_bytes(), model.config.seq_len, config.optim.batch_size,
                          torch.device("cpu"), torch.float32)
    return evaluator.window_losses(model, EVAL_TOKENS)


def paired_interval(run: Path, reference: Path, seed: int) -> tuple[float, float, float]:
    """Held-out loss of ``run`` minus ``reference`` on the same windows, with its paired bootstrap 95% interval."""
    nats, tokens = window_losses(run)
    base_nats, base_tokens = window_losses(reference)
    if not np.array_equal(tokens, base_tokens):
        raise SystemExit(f"{run} and {reference} were scored on different windows")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(nats), size=(RESAMPLES, len(nats)))
    diffs = (nats[draws].sum(1) - base_nats[draws].sum(1)) / tokens[draws].sum(1)
    mean = (nats.sum() - base_nats.sum()) / tokens.sum()
    return float(mean), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def flops_per_token(run: Path) -> float:
    """Training FLOPs per token of a finished run's model, as its meter counted them."""
    s = summary(run)
    return s["flops"] / s["tokens"]


def compare(rows: list[dict[str, Any]], runs: dict[tuple[str, int], Path], arms: list[str], reference: str,
            seeds: list[int]) -> None:
    for seed in seeds:
        for arm in arms:
            run = runs[arm, seed]
            row = {"arm": arm, "seed": seed, "run": str(run), **summary(run)}
            if arm != reference:
                row["minus_reference"] = paired_interval(run, runs[reference, seed], seed)
            rows.append(row)


def sparse_part(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    runs = {}
    for seed in args.seeds:
        for index, (arm, sets) in enumerate(SPARSE_ARMS.items()):
            runs[arm, seed] = train(WORK / f"sparse-{index}-{seed}", f"{args.tokens}tokens", seed, sets)
    compare(rows, runs, list(SPARSE_ARMS), SPARSE_REFERENCE, args.seeds)


def teacher(args: argparse.Namespace) -> Path:
    """The larger run the students learn from: the default shape, 4x the students' tokens, seed 0."""
    return train(WORK / "teacher", f"{4 * args.tokens}tokens", 0, [])


def distill_part(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    big = teacher(args)
    tokenizer = [f"data.tokenizer=\"{big / 'tokenizer.json'}\""]
    probe = train(WORK / "student-probe", "10steps", 0, [*STUDENT, *tokenizer])
    budget = f"{flops_per_token(probe) * 2 * args.tokens:.6g}flops"  # scratch: twice the sparse part's tokens
    runs = {}
    for seed in args.seeds:
        runs["scratch", seed] = train(WORK / f"student-scratch-{seed}", budget, seed, [*STUDENT, *tokenizer])
        runs["distilled", seed] = train(WORK / f"student-distill-{seed}", budget, seed, [*STUDENT, *tokenizer],
                                        "--distill-from", str(big))
    compare(rows, runs, ["scratch", "distilled"], "scratch", args.seeds)


def table(console: Console, title: str, rows: list[dict[str, Any]], arms: list[str], seeds: list[int]) -> None:
    out = Table(title=title)
    for column in ("arm", "val_loss (mean)", "nonzero block weights", "tokens", "per seed: minus reference [95%]",
                   "mean minus reference"):
        out.add_column(column)
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        diffs = [r["minus_reference"] for r in mine if "minus_reference" in r]
        out.add_row(arm, f"{np.mean([r['val_loss'] for r in mine]):.4f}", f"{mine[0]['nonzero_block_weights']:,}",
                    f"{np.mean([r['tokens'] for r in mine]):,.0f}",
                    "; ".join(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" for d in diffs) or "reference",
                    f"{np.mean([d[0] for d in diffs]):+.4f}" if diffs else "")
    console.print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["sparse", "distill"], choices=["sparse", "distill"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=600_000, help="the sparse arms' token budget")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compress.json")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    console, record = Console(), {"seeds": args.seeds, "tokens": args.tokens}
    if "sparse" in args.parts:
        rows: list[dict[str, Any]] = []
        sparse_part(args, rows)
        record["sparse"] = rows
        table(console, f"sparse against dense, {args.tokens:,} tokens each", rows, list(SPARSE_ARMS), args.seeds)
    if "distill" in args.parts:
        rows = []
        distill_part(args, rows)
        record["distill"] = rows
        table(console, "distilled against scratch, one FLOP budget with the teacher's counted", rows,
              ["scratch", "distilled"], args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
