"""Identical runs, identical results: N runs of one config and seed, each in a process of its own.

Each run is `flopwise train --budget 12steps --seed 1` (the default recipe, every step logged); the bench compares
their loss curves bit for bit, and their final weights by a digest of every tensor.  It reports how many distinct
curves and weights the runs gave, the first step where a curve left the first run's, and the largest difference.

    python bench/determinism.py --runs 50
    python bench/determinism.py --runs 16 --set model.size=tiny --env PYTHONHASHSEED=random

Prints the table and writes JSON (bench/results/determinism.json by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

HERE = Path(__file__).parent


def weights_digest(path: Path) -> str:
    """A digest of every tensor's name, dtype, shape and bytes (the file's metadata left out)."""
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as weights:
        for name in sorted(weights.keys()):
            tensor = weights.get_tensor(name)
            digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def one_run(work: Path, index: int, sets: list[str], env: dict[str, str]) -> dict:
    out = work / f"run{index:03d}"
    command = [sys.executable, "-m", "flopwise", "train", "--budget", "12steps", "--seed", "1", "--out", str(out),
               "--set", "train.log_every=1", *[flag for value in sets for flag in ("--set", value)]]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        raise SystemExit(f"run {index} failed:\n{result.stdout}\n{result.stderr}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [e["loss"] for e in events if e["event"] == "train"]
    return {"curve": curve, "weights": weights_digest(out / "final" / "model.safetensors"),
            "seconds": time.perf_counter() - started}


def summarize(runs: list[dict]) -> dict:
    """Distinct curves and weights, and where and by how much the curves left the first run's."""
    first = runs[0]["curve"]
    diverged = [run for run in runs if run["curve"] != first]
    steps = [next(i for i, (a, b) in enumerate(zip(run["curve"], first)) if a != b) + 1 for run in diverged]
    return {"runs": len(runs), "distinct_curves": len({tuple(run["curve"]) for run in runs}),
            "distinct_weights": len({run["weights"] for run in runs}), "diverged": len(diverged),
            "first_divergent_step": min(steps, default=None),
            "max_difference": max((abs(a - b) for run in diverged for a, b in zip(run["curve"], first)), default=0.0),
            "identical_rate": 1 - len(diverged) / len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], dest="sets", help="a config override, as for train")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every run's environment")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "determinism.json")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for index in range(args.runs):
            runs.append(one_run(Path(work), index, args.sets, env))
            print(f"run {index + 1}/{args.runs}: {runs[-1]['seconds']:.1f}s, curve "
                  f"{'same' if runs[-1]['curve'] == runs[0]['curve'] else 'DIFFERENT'}", flush=True)
    summary = summarize(runs)
    table = Table(title=f"{args.runs} identical runs, each in its own process ({' '.join(args.sets) or 'default'}"
                        f"{', ' + ' '.join(args.env) if args.env else ''})")
    for key in summary:
        table.add_column(key)
    table.add_row(*(str(value) for value in summary.values()))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sets": args.sets, "env": env, **summary,
                                    "curves": [run["curve"] for run in runs]}, indent=1))


if __name__ == "__main__":
    main()
