"""`flopwise scan`: spend a small budget on pilot runs and fit the law for this data and device.

Pilots are sizes x lengths.  Each size trains once for the shortest length and is then extended
to the longer ones from its checkpoint before the learning-rate decay, as warmup-stable-decay
allows (Hägele et al. 2024): lengths t, 2t and 4t cost 4.6t instead of 7t, and every length ends
fully annealed, as a run of that budget would.  The 4x span in tokens per size pins the data term
of the law, which a plan for a longer budget extrapolates.  A wider span (t, 3t, 9t) was tried
first: in a 15-minute scan its shortest pilots ran for under 30 s, a few hundred steps or fewer,
where the loss still falls faster and faster with log D, and those points bent the fitted law
towards a flat data term that was 5-9% pessimistic about 5- and 10-minute runs.

Sizes are the family members that would be compute-optimal (about 20 tokens per parameter, as
Hoffmann et al. found) for budgets from half to about 13 times the longest pilot: those whose longest
pilot sees between MIN_RATIO and MAX_RATIO tokens per non-embedding parameter, spread evenly in
log N.  Piloting where the plans will land matters more than a wide span of sizes: a law fitted
far from the plans' sizes extrapolates in N as well as in D.  Lengths run shortest first across
all sizes, so a scan that runs late drops its longest branches, not whole sizes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from flopwise.atomic import write_json_atomic
from flopwise.budget import Budget
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.plan.fitting import SCAN_FILE, law_from_records, run_record
from flopwise.plan.law_file import LAW_FILE, PlanningLaw
from flopwise.plan.shapes import WIDTHS, family_fields, non_embedding_parameters

LENGTHS = (1, 2, 4)  # pilot lengths in units of the shortest
SIZES = 3
MIN_RATIO, MAX_RATIO = 1.5, 40.0  # 20 tokens per parameter at ~13x and at 0.5x the longest pilot
RUN_OVERHEAD_SECONDS = 8.0  # start-up, final evaluation and saving of one pilot, besides training
# pilots evaluate once, at the end (the fit uses final losses only); the pinned checkpoint is kept
PILOT_SETTINGS = {"eval_every": 0.0, "checkpoint_every": 0.0, "log_every": 5}


def extension_cost(decay_start: float) -> float:
    """Training time of one size's pilots in units of the shortest: each extension retrains from the
    previous length's checkpoint before its decay."""
    return LENGTHS[0] + sum(b - decay_start * a for a, b in zip(LENGTHS, LENGTHS[1:]))


@dataclass
class PilotSize:
    d_model: int
    non_embedding: int
    tokens_per_second: float  # the probe's


@dataclass
class ScanDesign:
    sizes: list[PilotSize]
    unit_seconds: float  # the shortest pilot's training budget
    decay_start: float = 0.8

    def lengths(self) -> list[float]:
        return [self.unit_seconds * k for k in LENGTHS]

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": [vars(s) for s in self.sizes], "lengths_seconds": self.lengths()}


def design_scan(scan_seconds: float, model_cfg_for: Callable[[int], ModelConfig],
                tokens_per_second: Callable[[ModelConfig], float], decay_start: float = 0.8,
                widths: tuple[int, ...] = WIDTHS) -> ScanDesign:
    """Sizes and lengths that fill ``scan_seconds`` of wall clock (the probes' time included), for a
    schedule decaying from ``decay_start``."""
    started = time.perf_counter()
    cost = extension_cost(decay_start)
    unit = _unit_seconds(scan_seconds, cost)
    if unit < 5:
        raise FlopwiseError(f"a scan of {scan_seconds:.0f}s leaves {unit:.1f}s for its shortest pilot: give at least "
                            f"{math.ceil(SIZES * (len(LENGTHS) * RUN_OVERHEAD_SECONDS + 5 * cost) / 60)}m")
    longest = unit * LENGTHS[-1]
    eligible: list[PilotSize] = []
    for width in widths:
        cfg = model_cfg_for(width)
        rate, n = tokens_per_second(cfg), non_embedding_parameters(cfg)
        ratio = rate * longest / n
        if ratio < MIN_RATIO:
            break
        if ratio <= MAX_RATIO:
            eligible.append(PilotSize(width, n, rate))
    if len(eligible) < 2:
        raise FlopwiseError(f"a scan of {scan_seconds:.0f}s finds fewer than two model sizes worth piloting on this "
                            "device: give a larger scan budget")
    sizes = _spread(eligible, SIZES)
    left = scan_seconds - (time.perf_counter() - started)  # what probing took is gone
    return ScanDesign(sizes, _unit_seconds(left, cost, len(sizes)), decay_start)


def _unit_seconds(seconds: float, cost: float, sizes: int = SIZES) -> float:
    """The shortest pilot's length when ``sizes`` sizes share ``seconds``, with 3% to spare."""
    return (0.97 * seconds - sizes * len(LENGTHS) * RUN_OVERHEAD_SECONDS) / (sizes * cost)


def _spread(sizes: list[PilotSize], count: int) -> list[PilotSize]:
    """``count`` sizes evenly spaced in log N, the smallest and largest included."""
    if len(sizes) <= count:
        return sizes
    low, high = math.log(sizes[0].non_embedding), math.log(sizes[-1].non_embedding)
    chosen: list[PilotSize] = []
    for k in range(count):
        target = low + (high - low) * k / (count - 1)
        best = min((s for s in sizes if s not in chosen), key=lambda s: abs(math.log(s.non_embedding) - target))
        chosen.append(best)
    return sorted(chosen, key=lambda s: s.non_embedding)


class Scan:
    """Runs a design's pilots into ``out``/runs, records each length's result in ``out``/scan.json,
    and fits the law to them."""

    def __init__(self, config: RunConfig, out: Path, design: ScanDesign, scan_seconds: float,
                 console: Console) -> None:
        self.config = config
        self.out = out
        self.design = design
        self.deadline = time.perf_counter() + scan_seconds
        self.console = console
        self.records: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def run(self, key: str) -> PlanningLaw:
        lengths = self.design.lengths()
        for index, seconds in enumerate(lengths):
            extend_from = lengths[index - 1] if index else None
            for size in self.design.sizes:
                self._pilot(size, seconds, extend_from)
        self._write()
        law = law_from_records(self.records, key)
        law.save(self.out / LAW_FILE)
        return law

    def _pilot(self, size: PilotSize, seconds: float, extend_from: float | None) -> None:
        run_dir = self.out / "runs" / f"d{size.d_model}"
        name = f"d_model {size.d_model} ({size.non_embedding / 1e6:.2f}M), {seconds:.0f}s"
        cost = seconds - (self.design.decay_start * extend_from if extend_from else 0.0) + RUN_OVERHEAD_SECONDS
        if extend_from is not None and not (run_dir / "final").is_dir():
            self.skipped.append(name)  # its shorter pilot was skipped
            return
        if time.perf_counter() + cost > self.deadline:
            self.skipped.append(name)
            self.console.print(f"skipped {name}: the scan budget would run out", highlight=False)
            return
        started = time.perf_counter()
        if extend_from is None:
            train_pilot(self.config, size.d_model, seconds, run_dir, longest=self.design.lengths()[-1])
        else:
            extend_pilot(run_dir, seconds)
        record = run_record(run_dir)
        record.update(seconds_budget=seconds, probe_tokens_per_second=size.tokens_per_second,
                      wall=time.perf_counter() - started, name=f"d{size.d_model}-{seconds:.0f}s")
        self.records.append(record)
        self._write()
        self.console.print(f"pilot {len(self.records)}: {name}: held-out loss {record['val_loss']:.4f} after "
                           f"{record['tokens'] / 1e6:.2f}M tokens ({record['tokens_per_second']:,.0f} tokens/s)",
                           highlight=False)

    def _write(self) -> None:
        write_json_atomic(self.out / SCAN_FILE, {"design": self.design.to_dict(), "pilots": self.records,
                                                 "skipped": self.skipped})


def pilot_config(config: RunConfig, d_model: int, seconds: float, longest: float) -> RunConfig:
    """The config of one size's first pilot, of ``seconds``, warmed up over as many seconds as a run
    of the ``longest`` pilot's length would be.

    Extensions keep the warmup's length in seconds, so without this every length of a size would
    share the shortest pilot's warmup, a quarter of a real run's.  Measured on d_model 96 at 229 s:
    a quarter of the warmup cost 3.6% in held-out loss (3.222 against 3.111), and the extended pilot
    of that size fell 11% short of a run of its length, pulling the law towards smaller models."""
    pilot = config.model_copy(deep=True)
    for name, value in family_fields(d_model).items():
        setattr(pilot.model, name, value)
    pilot.budget = type(config.budget)(seconds=seconds)
    pilot.schedule.warmup = min(config.schedule.warmup * longest / seconds, pilot.schedule.build().decay_start / 2)
    for name, value in PILOT_SETTINGS.items():
        setattr(pilot.train, name, value)
    return pilot


def train_pilot(config: RunConfig, d_model: int, seconds: float, run_dir: Path, longest: float) -> None:
    from flopwise.train.display import ProgressDisplay
    from flopwise.train.session import start_new
    from flopwise.train.trainer import LoopState

    session = start_new(pilot_config(config, d_model, seconds, longest), run_dir,
                        ProgressDisplay(Console(quiet=True)))
    session.write_run_files()
    session.run(LoopState())


def extend_pilot(run_dir: Path, seconds: float) -> None:
    from flopwise.train.display import ProgressDisplay
    from flopwise.train.session import open_for_resume

    session, state = open_for_resume(run_dir, Budget(seconds=seconds), ProgressDisplay(Console(quiet=True)))
    session.run(state)
