"""Small models that ship: sparse against dense at equal final size, distilled against scratch at an equal budget
that counts the teacher, Minitron's path (prune a trained model's width, then distill) against scratch, and a
size budget's stored artifact against the dense fp32 models that fit.

Each comparison is per seed, as the difference of held-out losses on the same windows with a paired bootstrap 95%
interval over those windows, and over seeds as the mean difference.

    python bench/compress.py --parts sparse distill minitron size --seeds 0 1 2

- ``sparse``: the default model (d_model 128, 4 blocks) pruned to 50% (unstructured, ramped 0.25 -> 0.75 and
  0 -> 0.5; 2:4, ramped 0.25 -> 0.75), against a dense model with the same count of nonzero block weights (2
  blocks: exactly half) and the dense 4-block model, all for the same tokens.
- ``distill``: a d_model 64 x 4 student distilled from a d_model 128 x 4 teacher trained for 4x the tokens,
  against the student from scratch, at one FLOP budget that counts the teacher's forward passes.
- ``minitron``: the teacher width-pruned (prune_width's defaults: 2/3 of the heads, 3/8 of the MLP channels, by
  activation importance) and retrained with and without distilling from itself, against that small shape from
  scratch, at one FLOP budget (the teacher's training not counted).
- ``size``: ``flopwise train --budget 2m,4MB`` as a user runs it, against the dense fp32 shapes that fit 4 MB
  (d_model 96 x 4 blocks, d_model 128 x 2), for the same seconds; and the stored model's loss in the run against
  ``flopwise eval``'s on the same sample.

The first three are plain runs (``methods.progressive=false``, so that growth and schedules do not mix with the
method measured) with load-independent budgets (tokens or FLOPs): a busy machine changes only the time they take.
The size part's seconds budgets are not: run it on a quiet machine.

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
from flopwise.evaluate.heldout import FINAL_EVAL_SCALE, Evaluator
from flopwise.evaluate.load import load_final_model
from flopwise.model.artifact import folder_bytes
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-compress"))
RESAMPLES = 10_000
EVAL_TOKENS = 32_768  # train.eval_tokens: the runs' final evaluation reads FINAL_EVAL_SCALE (4) times this per domain
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
MINITRON_ARMS = ["small shape from scratch", "pruned, retrained", "pruned, distilled (Minitron)"]
SIZE_ARMS: dict[str, list[str]] = {
    "default shape, precision chosen to fit": [],
    "fp32, d_model 96 x 4 blocks": ["model.d_model=96", "artifact.precision=fp32"],
    "fp32, d_model 128 x 2 blocks": ["model.n_layers=2", "artifact.precision=fp32"],
}
SIZE_REFERENCE = "default shape, precision chosen to fit"


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
    blocks = [p for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
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
    return evaluator.window_losses(model, FINAL_EVAL_SCALE * EVAL_TOKENS)  # the run's own final sample


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


def minitron_part(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Minitron's path: the teacher width-pruned (prune_width's defaults) and retrained, with and without
    distilling from itself, against its small shape from scratch, all at one FLOP budget (the teacher's forward
    passes and the pruning's calibration counted; the teacher's own training is not)."""
    big = teacher(args)
    pruned = ["--init-from", str(big / "final"), "--method", "prune_width"]
    probe = train(WORK / "minitron-probe", "10steps", 0, [], *pruned)
    shape = json.loads((probe / "plan.json").read_text())["model"]
    small = [f"model.{key}={shape[key]}" for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_size",
                                                      "mlp_hidden") if shape.get(key) is not None]
    budget = f"{flops_per_token(probe) * 2 * args.tokens:.6g}flops"
    tokenizer = [f"data.tokenizer=\"{big / 'tokenizer.json'}\""]
    runs = {}
    for seed in args.seeds:
        runs["small shape from scratch", seed] = train(WORK / f"minitron-scratch-{seed}", budget, seed,
                                                       [*small, *tokenizer])
        runs["pruned, retrained", seed] = train(WORK / f"minitron-plain-{seed}", budget, seed, [], *pruned)
        runs["pruned, distilled (Minitron)", seed] = train(WORK / f"minitron-distill-{seed}", budget, seed, [],
                                                           *pruned, "--distill-from", str(big))
    compare(rows, runs, MINITRON_ARMS, MINITRON_ARMS[0], args.seeds)
    rows.append({"shape": shape, "budget": budget, "teacher": summary(big)})


def size_part(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """``flopwise train --budget 2m,4MB`` as a user runs it (the default recipe and shape, stored in the precision
    that fits), against the dense fp32 models that fit 4 MB, for the same 2 minutes; arms alternate within a
    seed, since a seconds budget depends on the machine's load.  Also checks the stored model against
    ``flopwise eval`` on the same held-out sample."""
    runs = {}
    for seed in args.seeds:
        for index, (arm, sets) in enumerate(SIZE_ARMS.items()):
            out = WORK / f"size-{index}-{seed}"
            if not (out / "final").is_dir():
                subprocess.run(["rm", "-rf", str(out)], check=True)
                flags = [flag for value in sets for flag in ("--set", value)]
                subprocess.run([sys.executable, "-m", "flopwise", "train", "--budget", f"{args.size_budget}",
                                "--seed", str(seed), "--out", str(out), *flags], check=True, capture_output=True)
            runs[arm, seed] = out
    compare(rows, runs, list(SIZE_ARMS), SIZE_REFERENCE, args.seeds)
    for row in rows:
        run = Path(row["run"])
        final = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"][-1]
        sample = FINAL_EVAL_SCALE * load_run_config(run).train.eval_tokens
        subprocess.run([sys.executable, "-m", "flopwise", "eval", str(run), "--max-tokens", str(sample)], check=True,
                       capture_output=True)
        evaluated = json.loads((run / "eval.json").read_text())
        row.update(final_bytes=folder_bytes(run / "final"), precision=final.get("artifact_precision", "fp32"),
                   run_stored_loss=final.get("artifact_loss", final["val_loss"]), eval_loss=evaluated["loss"])


def table(console: Console, title: str, rows: list[dict[str, Any]], arms: list[str], seeds: list[int]) -> None:
    out = Table(title=title)
    for column in ("arm", "val_loss (mean)", "nonzero block weights", "tokens", "per seed: minus reference [95%]",
                   "mean minus reference"):
        out.add_column(column)
    for arm in arms:
        mine = [r for r in rows if r.get("arm") == arm]
        if not mine:
            continue
        diffs = [r["minus_reference"] for r in mine if "minus_reference" in r]
        out.add_row(arm, f"{np.mean([r['val_loss'] for r in mine]):.4f}", f"{mine[0]['nonzero_block_weights']:,}",
                    f"{np.mean([r['tokens'] for r in mine]):,.0f}",
                    "; ".join(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" for d in diffs) or "reference",
                    f"{np.mean([d[0] for d in diffs]):+.4f}" if diffs else "")
    console.print(out)


def size_table(console: Console, rows: list[dict[str, Any]]) -> None:
    out = Table(title="the stored artifacts")
    for column in ("arm", "seed", "precision", "final/ bytes", "stored loss (run)", "flopwise eval", "difference"):
        out.add_column(column)
    for r in rows:
        out.add_row(r["arm"], str(r["seed"]), r["precision"], f"{r['final_bytes']:,}", f"{r['run_stored_loss']:.5f}",
                    f"{r['eval_loss']:.5f}", f"{r['eval_loss'] - r['run_stored_loss']:+.1e}")
    console.print(out)


PARTS = {
    "sparse": (sparse_part, "sparse against dense, {tokens:,} tokens each", list(SPARSE_ARMS)),
    "distill": (distill_part, "distilled against scratch, one FLOP budget with the teacher's counted",
                ["scratch", "distilled"]),
    "minitron": (minitron_part, "Minitron's path against the small shape from scratch, one FLOP budget",
                 MINITRON_ARMS),
    "size": (size_part, "--budget {size}: the stored artifact against dense fp32 models that fit", list(SIZE_ARMS)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=600_000, help="the sparse arms' token budget")
    parser.add_argument("--size-budget", default="2m,4MB", help="the size part's budget")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compress.json")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    console, record = Console(), {"seeds": args.seeds, "tokens": args.tokens}
    for part in args.parts:
        make, title, arms = PARTS[part]
        rows: list[dict[str, Any]] = []
        make(args, rows)
        record[part] = rows
        table(console, title.format(tokens=args.tokens, size=args.size_budget), rows, arms, args.seeds)
        if part == "size":
            size_table(console, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
