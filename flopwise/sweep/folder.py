"""The layout of a sweep folder, shared by the sweep itself and by ``flopwise report`` (which must stay cheap
to import: no torch here)."""

from __future__ import annotations

from pathlib import Path

SWEEP_FILE = "sweep.json"  # the plan, where the study lives, and the total budget's accounting
JOURNAL_FILE = "journal.log"  # the Optuna study, unless --storage named another
BEST_FILE = "best.toml"  # the best finished trial's config
TRIALS = "trials"  # one run folder per trial
BASE_FILE, SPACE_FILE = "base.toml", "space.toml"  # the trials' base config and search space, for --resume
LOCK_FILE = "sweep.lock"
STUDY_NAME = "flopwise"


def is_sweep(folder: Path) -> bool:
    return (folder / SWEEP_FILE).is_file() and (folder / TRIALS).is_dir()
