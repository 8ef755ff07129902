"""Data-side methods against uniform sampling at equal budget: which of them buy held-out loss?

For each corpus and seed, every arm trains the same model for the same wall-clock budget and is scored
by its final held-out loss, overall and per domain.  Arms:

- uniform: every training window equally likely (each domain in proportion to its tokens);
- balanced: a static mixture with equal weight per domain (``--set methods.mixture.weights.D=1``);
- online-loss / online-excess: domain weights adapted during the run (flopwise/methods/online_mixture.py); the
  excess rule's reference is the same seed's uniform run (its cost is not counted, as DoReMi does not
  count its reference model's);
- reweight: per-sequence loss reweighting, LinUpper, r = 0.4 (Sow et al. 2025);
- curriculum: easiest windows first by token rarity, linear pacing;
- salt: distillation from a small teacher (model 'tiny', trained with the same seed, hence the same
  tokenizer, before the arm and not counted in the budget, as SALT trains its small model separately).

Corpora: the default (Python stdlib: code and prose) and a mixture built from other text on the machine
(npm's packages and docs, and the Linux kernel's C headers).  Each finished run is recorded at once, so
a rerun skips what is done.  Prints the table and writes bench/results/data_methods.json.

    python bench/data_methods.py --seconds 40 --seeds 0 1 2
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

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-data-bench"))
NPM = "/usr/lib/node_modules/npm"
CORPORA: dict[str, list[str]] = {
    "stdlib": ["--data", "stdlib"],
    "npm+headers": ["--data", f"packages={NPM}/node_modules", "--data", f"docs={NPM}/docs",
                    "--data", "headers=/usr/include/linux", "--include", "*.js", "--include", "*.md",
                    "--include", "*.h"],
}
DOMAINS = {"stdlib": ["code", "prose"], "npm+headers": ["docs", "headers", "packages"]}
ARMS: dict[str, list[str]] = {
    "uniform": [],
    "balanced": [],  # filled per corpus: equal weights
    "online-loss": ["--online-mixture", "loss"],
    "online-excess": ["--online-mixture", "excess"],  # + --reference, per seed
    "reweight": ["--reweight", "linupper"],
    "curriculum": ["--curriculum", "rarity"],
    "salt": [],  # + --teacher, per corpus
}


def train(out: Path, corpus: str, seconds: float, seed: int, extra: list[str], model: str = "small") -> dict[str, Any]:
    """One run through the CLI; returns its final held-out losses."""
    if not (out / "final").is_dir():
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{seconds}s", "--model", model,
                   "--seed", str(seed), "--out", str(out), "--set", "train.forecast_every=0",
                   *CORPORA[corpus], *extra]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "eval"][-1]
    steps = [e for e in events if e["event"] == "train"][-1]
    train_tokens = json.loads((out / "plan.json").read_text())["corpus"]["domain_tokens"]["train"]
    return {"val_loss": final["val_loss"], "domains": final["domains"], "tokens": steps["tokens"],
            "seconds": steps["seconds"], "run": str(out), "domain_train_tokens": train_tokens}


def natural_mix_loss(run: dict[str, Any]) -> float:
    """Per-domain held-out losses weighted by each domain's share of the training tokens: the loss on data
    distributed like the corpus (the evaluation's 'overall' caps each domain's held-out tokens instead)."""
    shares = run["domain_train_tokens"]
    return sum(run["domains"][d] * n for d, n in shares.items()) / sum(shares.values())


def arm_flags(arm: str, corpus: str, seed: int) -> list[str]:
    teacher = WORK / corpus / f"teacher-s{seed}"  # the seed fixes the BPE sample: the same tokenizer
    if arm == "balanced":
        return [flag for domain in DOMAINS[corpus] for flag in ("--set", f"methods.mixture.weights.{domain}=1")]
    if arm == "online-excess":
        return ARMS[arm] + ["--reference", str(WORK / corpus / f"uniform-s{seed}")]
    if arm == "salt":
        train(teacher, corpus, 40.0, seed, ["--set", "model.seq_len=256"], model="tiny")
        return ["--teacher", str(teacher)]
    return ARMS[arm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "data_methods.json")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results["seconds"] = args.seconds
    console = Console()
    for corpus in args.corpora:
        for seed in args.seeds:
            for arm in args.arms:  # uniform first: online-excess uses it as reference
                key = f"{corpus}/{arm}/s{seed}"
                results["runs"][key] = train(WORK / corpus / f"{arm}-s{seed}", corpus, args.seconds, seed,
                                             arm_flags(arm, corpus, seed))
                console.print(f"{key}: {results['runs'][key]['val_loss']:.4f}", highlight=False)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    report(results, console)
    args.out.write_text(json.dumps(results, indent=1))
    console.print(f"written: {args.out}", highlight=False)


def report(results: dict[str, Any], console: Console) -> None:
    """Per corpus and arm: mean held-out loss over seeds (overall as evaluated, and at the corpus's own
    mix), the changes against uniform seed by seed, and each domain's loss."""
    runs = results["runs"]
    summary: dict[str, Any] = {}
    for corpus in DOMAINS:
        table = Table(title=f"{corpus}: final held-out loss, {results['seconds']:g} s budget, mean over seeds")
        for column in ("arm", "seeds", "overall", "vs uniform (per seed)", "natural mix", "vs uniform (per seed)",
                       *DOMAINS[corpus], "tokens"):
            table.add_column(column, justify="right")
        for arm in ARMS:
            keys = sorted(k for k in runs if k.startswith(f"{corpus}/{arm}/"))
            if not keys:
                continue
            seeds = [k.rsplit("/", 1)[1] for k in keys]
            baselines = [runs.get(f"{corpus}/uniform/{s}") for s in seeds]
            changes = [runs[k]["val_loss"] / b["val_loss"] - 1 for k, b in zip(keys, baselines) if b]
            natural = [natural_mix_loss(runs[k]) / natural_mix_loss(b) - 1 for k, b in zip(keys, baselines) if b]
            row = {"overall": statistics.mean(runs[k]["val_loss"] for k in keys),
                   "change": statistics.mean(changes) if changes else None,
                   "change_per_seed": changes,
                   "natural_mix": statistics.mean(natural_mix_loss(runs[k]) for k in keys),
                   "natural_change": statistics.mean(natural) if natural else None,
                   "natural_change_per_seed": natural,
                   "domains": {d: statistics.mean(runs[k]["domains"][d] for k in keys) for d in DOMAINS[corpus]},
                   "tokens": statistics.mean(runs[k]["tokens"] for k in keys)}
            summary[f"{corpus}/{arm}"] = row
            table.add_row(arm, str(len(keys)), f"{row['overall']:.4f}", _changes(changes),
                          f"{row['natural_mix']:.4f}", _changes(natural),
                          *(f"{row['domains'][d]:.4f}" for d in DOMAINS[corpus]), f"{row['tokens'] / 1e6:.2f}M")
        console.print(table)
    results["summary"] = summary


def _changes(changes: list[float]) -> str:
    if not changes:
        return "-"
    return f"{100 * statistics.mean(changes):+.2f}% ({', '.join(f'{100 * c:+.1f}' for c in changes)})"


if __name__ == "__main__":
    main()
