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

Pilots that end before their size's loss has settled after its early drop (flopwise/scaling/regime.py)
follow a steeper law than the runs plans extrapolate to.  When too many do, the scan says how long a
scan of the same sizes would have to be for enough of them to end past it, and `scan --extend` adds
lengths 8t, 16t, ... to the finished scan from the same checkpoints, so the pilots already run are
not run again.

A pilot whose budget ran out in the middle of a step before its decay began (a step that took much
longer than the ones before it, as on a busy machine) ends without that checkpoint: its next length is
then trained from the start, at its full cost, and the shorter pilot's folder is kept beside it.
"""

from __future__ import annotations

import json
import math
import statistics
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
from flopwise.scaling.fitting import MIN_FITTED_RUNS, SCAN_FILE, law_from_records, regime_ends, run_record
from flopwise.scaling.law_file import LAW_FILE, PlanningLaw
from flopwise.scaling.shapes import WIDTHS, family_fields, non_embedding_parameters

LENGTHS = (1, 2, 4)  # pilot lengths in units of the shortest
SIZES = 3
MIN_RATIO, MAX_RATIO = 1.5, 40.0  # 20 tokens per parameter at ~13x and at 0.5x the longest pilot
RUN_OVERHEAD_SECONDS = 8.0  # start-up, final evaluation and saving of one pilot, besides training
SPARE = 0.97  # share of a scan's budget its pilots are planned to fill
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
    extensions: int = 0  # lengths added by `scan --extend`, each twice the one before

    def lengths(self) -> list[float]:
        factors = [*LENGTHS, *(LENGTHS[-1] * 2 ** (k + 1) for k in range(self.extensions))]
        return [self.unit_seconds * k for k in factors]

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": [vars(s) for s in self.sizes], "lengths_seconds": self.lengths()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], decay_start: float) -> ScanDesign:
        lengths = data["lengths_seconds"]
        return cls([PilotSize(**size) for size in data["sizes"]], lengths[0], decay_start,
                   len(lengths) - len(LENGTHS))

    def pilot_seconds(self, seconds: float, extend_from: float | None) -> float:
        """Wall clock of one pilot of ``seconds``: from scratch, or retrained from the checkpoint before
        the decay of the ``extend_from`` pilot."""
        return seconds - (self.decay_start * extend_from if extend_from else 0.0) + RUN_OVERHEAD_SECONDS

    def extension_seconds(self) -> float:
        """Scan budget that one more length (twice the longest) takes for every size, as `scan --extend`
        spends it."""
        longest = self.lengths()[-1]
        return len(self.sizes) * self.pilot_seconds(2 * longest, longest) / SPARE


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
    """The shortest pilot's length when ``sizes`` sizes share ``seconds``, with 1 - SPARE to spare."""
    return (SPARE * seconds - sizes * len(LENGTHS) * RUN_OVERHEAD_SECONDS) / (sizes * cost)


def scan_seconds_past_early_regime(records: list[dict[str, Any]], decay_start: float = 0.8) -> float | None:
    """Wall clock of a scan of the same sizes whose longest lengths all end past each size's early
    regime, enough of them for the law to leave the early runs out (MIN_FITTED_RUNS), at the tokens
    per second the pilots reached; None when no size's regime end is known.

    A longer scan may pick other sizes (they are chosen by tokens per parameter at its longest pilot),
    so this is a floor for the sizes seen, not a promise: the scan's own fit says whether it got there."""
    ends = regime_ends(records)
    if not any(ends.values()):
        return None
    lengths_needed = min(len(LENGTHS), math.ceil(MIN_FITTED_RUNS / len(ends)))
    shortest_needed = LENGTHS[-lengths_needed]
    unit = max(end / (shortest_needed * _tokens_per_second(records, size)) for size, end in ends.items())
    return scan_wall_seconds(unit, len(ends), decay_start)


def scan_wall_seconds(unit_seconds: float, sizes: int, decay_start: float) -> float:
    """The scan budget whose design gives ``sizes`` sizes a shortest pilot of ``unit_seconds`` (the
    inverse of _unit_seconds)."""
    return sizes * (len(LENGTHS) * RUN_OVERHEAD_SECONDS + extension_cost(decay_start) * unit_seconds) / SPARE


def _tokens_per_second(records: list[dict[str, Any]], size: int) -> float:
    return statistics.median_high(r["tokens_per_second"] for r in records if r["non_embedding"] == size)


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

    @classmethod
    def reopen(cls, config: RunConfig, out: Path, decay_start: float, scan_seconds: float,
               console: Console) -> Scan:
        """A finished scan in ``out``, with its design and pilots, to extend."""
        recorded = json.loads((out / SCAN_FILE).read_text())
        scan = cls(config, out, ScanDesign.from_dict(recorded["design"], decay_start), scan_seconds, console)
        scan.records, scan.skipped = recorded["pilots"], recorded["skipped"]
        return scan

    def run(self, key: str) -> PlanningLaw:
        lengths = self.design.lengths()
        for index, seconds in enumerate(lengths):
            extend_from = lengths[index - 1] if index else None
            for size in self.design.sizes:
                self._pilot(size, seconds, extend_from)
        return self._fit(key)

    def extend(self, key: str) -> PlanningLaw:
        """Add lengths, each twice the longest, while the budget lasts: every size whose longest pilot ran
        continues from the checkpoint before that pilot's decay, as the scan's own lengths do.  A scan whose
        pilots ended in their early regime gets runs past it without repeating the ones it has.

        The extensions keep the warmup the scan gave its longest length, shorter than a run of their own
        length would have: a smaller share of a longer run, which mattered in the early regime
        (pilot_config) and matters less the further past it a pilot ends."""
        while True:
            previous = self.design.lengths()[-1]
            self.design.extensions += 1
            ran = [self._pilot(size, 2 * previous, previous) for size in self.design.sizes]
            if not any(ran):
                self.design.extensions -= 1
                return self._fit(key)

    def _fit(self, key: str) -> PlanningLaw:
        self._write()
        law = law_from_records(self.records, key)
        law.save(self.out / LAW_FILE)
        return law

    def _pilot(self, size: PilotSize, seconds: float, extend_from: float | None) -> bool:
        """Train (or extend) one size to ``seconds`` and record it; False when it was skipped."""
        run_dir = self.out / "runs" / f"d{size.d_model}"
        name = f"d_model {size.d_model} ({size.non_embedding / 1e6:.2f}M), {seconds:.0f}s"
        if extend_from is not None and not self._piloted(size, extend_from):
            self.skipped.append(name)  # its shorter pilot was skipped
            return False
        restart = extend_from is not None and not has_extension_point(run_dir)
        cost = self.design.pilot_seconds(seconds, None if restart else extend_from)
        if time.perf_counter() + cost > self.deadline:
            self.skipped.append(name)
            self.console.print(f"skipped {name}: the scan budget would run out", highlight=False)
            return False
        started = time.perf_counter()
        if restart:
            self.console.print(f"{name}: the {extend_from:.0f}s pilot has no checkpoint from before its decay to "
                               "extend (a step ran past its budget first): training this length from the start",
                               highlight=False)
            run_dir.rename(run_dir.with_name(f"{run_dir.name}-{extend_from:.0f}s"))
        if extend_from is None or restart:
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
        return True

    def _piloted(self, size: PilotSize, seconds: float) -> bool:
        return any(r["d_model"] == size.d_model and math.isclose(r["seconds_budget"], seconds) for r in self.records)

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
    warmup = min(config.schedule.warmup * longest / seconds, config.schedule.build().decay_start / 2)
    return config.replace(**{f"model.{name}": value for name, value in family_fields(d_model).items()},
                          **Budget(seconds=seconds).config_values(), **{"schedule.warmup": warmup},
                          **{f"train.{name}": value for name, value in PILOT_SETTINGS.items()})


def has_extension_point(run_dir: Path) -> bool:
    """Whether a finished pilot has the pinned checkpoint, from before its decay, that a longer one
    continues from.  A seconds budget can run out in the middle of a step before the schedule predicted
    its decay (the trainer pins the checkpoint only then), and the run ends without one."""
    from flopwise.train.checkpoint import list_checkpoints

    return any(info.pinned for info in list_checkpoints(run_dir / "checkpoints"))


def train_pilot(config: RunConfig, d_model: int, seconds: float, run_dir: Path, longest: float) -> None:
    from flopwise.api import run
    from flopwise.train.display import ProgressDisplay

    # extendable: one shape throughout, as the pilot is extended to longer budgets, which progressive schedules
    # (read from the share of the original budget spent) cannot follow, and the law's N is the model trained
    run(pilot_config(config, d_model, seconds, longest), run_dir, display=ProgressDisplay(Console(quiet=True)),
        extendable=True)


def extend_pilot(run_dir: Path, seconds: float) -> None:
    from flopwise.api import resume
    from flopwise.train.display import ProgressDisplay

    resume(run_dir, Budget(seconds=seconds), display=ProgressDisplay(Console(quiet=True)))
