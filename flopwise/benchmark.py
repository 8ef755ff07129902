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

DIVISORS = (2, 3, 4, 5, 6, 8, 10)
# Fewer, longer evaluations: the final one decides, and evaluation time is not training time.
_RUN_SETTINGS = {"train.eval_every": 0.0, "train.checkpoint_every": 0.0, "train.eval_tokens": 32768,
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


def train_once(recipe: str, seconds: float, seed: int, sources: list[str], overrides: list[str],
               work: Path) -> RunResult:
    """One budgeted run in this process; returns its final held-out loss."""
    from flopwise.train.display import ProgressDisplay
    from flopwise.train.session import start_new
    from flopwise.train.trainer import LoopState

    values = dict(_RUN_SETTINGS, **{"budget.seconds": seconds, "train.seed": seed, "data.sources": sources})
    config = load_config(None, overrides, values, base=recipe_values(recipe))
    started = time.perf_counter()
    run_dir = work / f"{recipe}-{seed}-{seconds:g}s-{uuid.uuid4().hex[:8]}"
    session = start_new(config, run_dir, ProgressDisplay(Console(quiet=True)))
    session.write_run_files()
    summary = session.run(LoopState())
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

    def run(self, report: Callable[[str], None] = print) -> list[SeedResult]:
        results = []
        with tempfile.TemporaryDirectory(prefix="flopwise-bench-") as tmp:
            for seed in self.seeds:
                base = train_once(self.baseline, self.seconds, seed, self.sources, self.baseline_overrides, Path(tmp))
                report(f"seed {seed}: {self.baseline} {self.seconds:g}s -> {base.val_loss:.4f} (target)")
                result = SeedResult(seed, base.val_loss, base)
                self._search(result, Path(tmp), report)
                results.append(result)
        return results

    def _search(self, result: SeedResult, work: Path, report: Callable[[str], None]) -> None:
        """From T/3 down while the target is reached, or up to T/2 when it is not."""
        order = sorted(self.divisors)
        index = order.index(3) if 3 in order else 0
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
    return {"median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
            "max_speedup": max(speedups), "speedups": speedups,
            "seeds": [{"seed": r.seed, "target": r.target, "speedup": float(r.best_divisor),
                       "baseline": asdict(r.baseline), "candidates": [asdict(c) for c in r.candidates]}
                      for r in results]}
