"""Where a run's wall clock went, counted from the start of its process: the start-up before the first step (the
imports and config, the data, the model and optimizer), training, evaluation, checkpoints and the final model.
The run's last line says it, and metrics.jsonl keeps it as a ``wall`` event, so that a budget's overheads are
seen where they are paid.  Torch-free, for the CLI to import before anything heavy."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_IMPORTED = time.perf_counter()
_claimed = False  # whether a run of this process has taken the process's start as its own


def process_seconds() -> float:
    """Seconds since this process started: from the kernel's record of its start where Linux keeps one (so
    Python's own start-up counts, to 10 ms), else since this module was first imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux (no /proc, no CLOCK_BOOTTIME)
        return time.perf_counter() - _IMPORTED


def run_origin() -> float:
    """Where a run's wall clock starts, in ``process_seconds``: the process's start for its first run (the
    command's: its imports are its start-up), the moment of asking for any later one (a sweep's or a test's
    runs in one process)."""
    global _claimed
    first, _claimed = not _claimed, True
    return 0.0 if first else process_seconds()


@dataclass(frozen=True)
class WallClock:
    """Seconds of one run in one process, from its ``run_origin``.  ``imports``: to its session (Python, the
    imports, the arguments and config); ``startup``: to the first step, which also holds ``data`` (reading or
    opening the token cache) and ``build`` (model, optimizer, the device's measured peak); the rest follow it.
    ``training`` is the seconds the budget counted in this process; ``final_evaluation`` the part of
    ``evaluation`` that the final one took (the rest: the evaluations during the run)."""

    imports: float
    data: float
    build: float
    startup: float
    training: float
    evaluation: float
    final_evaluation: float
    checkpoints: float
    final_model: float
    total: float

    @property
    def other(self) -> float:
        """What no part names: the run folder's files, logging, the loop between steps."""
        return self.total - self.startup - self.training - self.evaluation - self.checkpoints - self.final_model

    def describe(self) -> str:
        """'wall clock 17.3s: start-up 3.1s (imports 1.9s, data 0.1s, model 0.8s), training 12.0s, ...'."""
        return (f"wall clock {self.total:.1f}s: start-up {self.startup:.1f}s (imports {self.imports:.1f}s, data "
                f"{self.data:.1f}s, model {self.build:.1f}s), training {self.training:.1f}s, evaluation "
                f"{self.evaluation:.1f}s (final {self.final_evaluation:.1f}s), checkpoints {self.checkpoints:.1f}s, "
                f"final model {self.final_model:.1f}s, other {self.other:.1f}s")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "other": self.other}
