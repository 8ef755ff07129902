"""Time-to-quality, as AlgoPerf measures time-to-result: how much less budget the default recipe
needs to reach the baseline recipe's held-out loss.

For each seed the baseline recipe trains for budget T and its final held-out loss becomes the
target.  The candidate then trains with budgets T/2, T/3, T/4, ... (each a separate budgeted run
that ends annealed), searching from T/3 downwards while it reaches the target and upwards when it
does not.  Speedup = T / (smallest budget that reached the target).  Baseline and candidate runs
alternate per seed so that machine drift cancels, and the median over seeds is reported with
its spread.  Every run goes through the same data, tokenizer, batch and evaluation.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from flopwise.config import load_config
from flopwise.recipes import recipe_values

DIVISORS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
# Fewer, longer evaluations: the final one decides, and evaluation time is not training time.
RUN_SETTINGS = {"train.eval_every": 0.0, "train.checkpoint_every": 0.0, "train.eval_tokens": 32768,
                 "train.log_every": 50}


@dataclass
class RunResult:
    recipe: str
    seed: int
    seconds_budget: float
    val_loss: float
    tokens: float
    flops: float
    wall: float


@dataclass
class SeedResult:
    seed: int
    target: float
    baseline: RunResult
    candidates: list[RunResult] = field(default_factory=list)

    @property
    def best_divisor(self) -> int:
        """The largest divisor d whose run with T/d reached the target (1 if none did)."""
        reached = [round(self.baseline.seconds_budget / c.seconds_budget) for c in self.candidates
                   if c.val_loss <= self.target]
        return max(reached, default=1)

    @property
    def interpolated_speedup(self) -> float | None:
        """T over the budget where the candidate's loss crosses the target, interpolating loss
        linearly in log(budget) between the two tried budgets around it (None if not bracketed)."""
        points = sorted((c.seconds_budget, c.val_loss) for c in self.candidates)
        for (b1, l1), (b2, l2) in zip(points, points[1:]):
            if l2 <= self.target < l1 and l1 > l2:
                frac = (l1 - self.target) / (l1 - l2)
                budget = math.exp(math.log(b1) + frac * (math.log(b2) - math.log(b1)))
                return self.baseline.seconds_budget / budget
        return None


def train_once(recipe: str, seconds: float, seed: int, sources: list[str], overrides: list[str],
               work: Path) -> RunResult:
    """One budgeted run in this process; returns its final held-out loss."""
    from flopwise.api import run
    from flopwise.train.display import ProgressDisplay

    values = dict(RUN_SETTINGS, **{"budget.seconds": seconds, "train.seed": seed, "data.sources": sources})
    config = load_config(None, overrides, values, base=recipe_values(recipe))
    started = time.perf_counter()
    run_dir = work / f"{recipe}-{seed}-{seconds:g}s-{uuid.uuid4().hex[:8]}"
    summary = run(config, run_dir, display=ProgressDisplay(Console(quiet=True)))
    return RunResult(recipe, seed, seconds, summary.final_eval["loss"], summary.meter.tokens, summary.meter.flops,
                     time.perf_counter() - started)


@dataclass
class TimeToQuality:
    """Settings of one benchmark: the baseline budget T, seeds, corpus and recipe overrides."""

    seconds: float = 180.0
    seeds: tuple[int, ...] = (0, 1, 2)
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    baseline: str = "baseline"
    candidate: str = "default"
    baseline_overrides: list[str] = field(default_factory=list)
    candidate_overrides: list[str] = field(default_factory=list)
    divisors: tuple[int, ...] = DIVISORS
    start: int = 3

    def run(self, report: Callable[[str], None] = print) -> list[SeedResult]:
        results = []
        start = self.start
        with tempfile.TemporaryDirectory(prefix="flopwise-bench-") as tmp:
            for seed in self.seeds:
                base = train_once(self.baseline, self.seconds, seed, self.sources, self.baseline_overrides, Path(tmp))
                report(f"seed {seed}: {self.baseline} {self.seconds:g}s -> {base.val_loss:.4f} (target)")
                result = SeedResult(seed, base.val_loss, base)
                self._search(result, Path(tmp), report, start)
                results.append(result)
                start = result.best_divisor if result.best_divisor > 1 else start
        return results

    def _search(self, result: SeedResult, work: Path, report: Callable[[str], None], start: int | None = None) -> None:
        """From T/start (T/3 unless given) down while the target is reached, or up towards T/2 when it is not."""
        order = sorted(self.divisors)
        start = self.start if start is None else start
        index = order.index(start) if start in order else 0
        step = None
        while 0 <= index < len(order):
            divisor = order[index]
            run = train_once(self.candidate, self.seconds / divisor, result.seed, self.sources,
                             self.candidate_overrides, work)
            result.candidates.append(run)
            reached = run.val_loss <= result.target
            report(f"seed {result.seed}: {self.candidate} T/{divisor} -> {run.val_loss:.4f} "
                   f"({'reached' if reached else 'missed'})")
            direction = 1 if reached else -1
            if step is not None and direction != step:
                break  # crossed the target: the answer lies between the last two budgets
            step = direction
            index += direction


def summarize(results: list[SeedResult]) -> dict[str, Any]:
    speedups = [float(r.best_divisor) for r in results]
    interpolated = [r.interpolated_speedup for r in results if r.interpolated_speedup is not None]
    return {"median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
            "max_speedup": max(speedups), "speedups": speedups,
            "median_interpolated_speedup": statistics.median(interpolated) if interpolated else None,
            "seeds": [{"seed": r.seed, "target": r.target, "speedup": float(r.best_divisor),
                       "interpolated_speedup": r.interpolated_speedup, "baseline": asdict(r.baseline),
                       "candidates": [asdict(c) for c in r.candidates]} for r in results]}


# Each piece of the default recipe, removed (or swapped) one at a time.
RECIPE_ABLATIONS: dict[str, list[str]] = {
    "AdamW (lr 3e-3) instead of Muon": ["optim.name=adamw", "optim.lr=3e-3"],
    "no QK-norm": ["model.qk_norm=false"],
    "no zero-init of output projections": ["model.zero_init_out=false"],
    "batch 16 instead of 8": ["optim.batch_size=16"],
    "cosine to 10% instead of WSD": ["schedule.name=cosine", "schedule.final_lr_frac=0.1"],
    "learned positions instead of RoPE": ["model.positions=learned"],
    "GELU MLP instead of SwiGLU": ["model.mlp=gelu"],
    "ReLU² MLP instead of SwiGLU": ["model.mlp=relu2"],
}


# Issue 37's pieces (the speedrun anchors' model options, document windows, weight averaging, Muon variants):
# the overrides that turn each on, and those that turn it off.
SPEED_PIECES: dict[str, tuple[list[str], list[str]]] = {
    "NorMuon": (["optim.name=normuon"], ["optim.name=muon"]),
    "Polar Express coefficients": (["optim.ns_coefficients=polar_express"], ["optim.ns_coefficients=newton_schulz"]),
    "cautious weight decay (Muon's 0.05)": (["optim.muon_weight_decay=0.05", "optim.cautious_weight_decay=true"],
                                            ["optim.muon_weight_decay=0", "optim.cautious_weight_decay=false"]),
    "value embeddings": (["model.value_embeds=true"], ["model.value_embeds=false"]),
    "U-net skips": (["model.unet_skips=true"], ["model.unet_skips=false"]),
    "x0 lambdas": (["model.x0_lambdas=true"], ["model.x0_lambdas=false"]),
    "smear": (["model.smear=true"], ["model.smear=false"]),
    "logit softcap 15": (["model.logit_softcap=15"], ["model.logit_softcap=0"]),
    "bigram hash (5x vocab)": (["model.bigram_hash=20480"], ["model.bigram_hash=0"]),
    "multi-token prediction (2)": (["model.mtp_tokens=2"], ["model.mtp_tokens=0"]),
    "windows at document starts": (["data.windows=doc_start"], ["data.windows=stream"]),
    "attention within documents": (["data.doc_mask=true"], ["data.doc_mask=false"]),
}


def in_default_recipe(overrides: list[str]) -> bool:
    """Whether ``overrides`` leave the default recipe as it is (the piece they turn on is already in it)."""
    return load_config(None, overrides).model_dump() == load_config(None, []).model_dump()


def speed_ablations() -> dict[str, list[str]]:
    """Each of issue 37's pieces alone (on the recipe with every piece off) and, for those in the default
    recipe, removed from it; then the recipe with none of them."""
    everything_off = [value for _, off in SPEED_PIECES.values() for value in off]
    alone = {f"{name} alone": everything_off + on for name, (on, _) in SPEED_PIECES.items()}
    removed = {f"no {name}": off for name, (on, off) in SPEED_PIECES.items() if in_default_recipe(on)}
    return {**alone, **removed, "none of the speed pieces": everything_off}


def progressive_ablations() -> dict[str, list[str]]:
    """Progressive training: each progressive method alone, all together (methods.use replaces the recipe's list),
    and none, from the registry's methods that declare themselves progressive."""
    from flopwise.methods.registry import METHODS

    names = [method.name for method in METHODS if method.progressive]
    quoted = ",".join(f'"{name}"' for name in names)
    return {**{f"{name} alone": [f'methods.use=["{name}"]'] for name in names},
            "all progressive methods": [f"methods.use=[{quoted}]"],
            "no progressive method": ["methods.progressive=false"]}


def ablations(which: str) -> dict[str, list[str]]:
    """The variants of ``which``: the recipe's pieces, issue 37's speed pieces, progressive training's, or all."""
    if which == "speed":
        return speed_ablations()
    return {"recipe": RECIPE_ABLATIONS, "progressive": progressive_ablations(),
            "all": {**RECIPE_ABLATIONS, **speed_ablations(), **progressive_ablations()}}[which]


def ablate(bench: TimeToQuality, targets: list[SeedResult], report: Callable[[str], None] = print,
           which: str = "all") -> list[dict[str, Any]]:
    """The candidate search again with one piece changed, against each seed's target; ``which``: the recipe's
    pieces, progressive training's, or all.  Variants alternate within a seed, as baseline and candidate do, and
    each search starts at the budget where the candidate's own answer for that seed was."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="flopwise-ablate-") as tmp:
        for target in targets:
            for name, overrides in ablations(which).items():
                variant = SeedResult(target.seed, target.target, target.baseline)
                changed = TimeToQuality(**{**asdict(bench), "candidate_overrides": bench.candidate_overrides + overrides})
                report(f"ablation: {name}, seed {target.seed}")
                changed._search(variant, Path(tmp), report, target.best_divisor if target.best_divisor > 1 else None)
                rows.append({"variant": name, "seed": target.seed, "overrides": overrides,
                             "speedup": float(variant.best_divisor),
                             "interpolated_speedup": variant.interpolated_speedup,
                             "candidates": [asdict(c) for c in variant.candidates]})
    return rows
