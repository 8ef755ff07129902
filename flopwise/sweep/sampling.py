"""The sampler of a sweep's study, seeded afresh before each trial is drawn."""

from __future__ import annotations

import socket
import zlib
from typing import Any

from flopwise.sweep.optuna_dep import require_optuna


def seed_sampler(study: Any, seed: int, strategy: str, shared: bool = False) -> None:
    """TPE (random search for ``random`` and ``pbt``) seeded by the sweep's ``seed`` and the number of the
    trial about to be drawn.  A sampler keeps its random stream in memory, so one seeded once would draw other
    values after ``--resume`` than the uninterrupted sweep, and parallel workers with one seed would draw the
    same values; seeded per trial, a trial's draw depends only on the seed and the study's history.  A
    ``shared`` study (``--storage``: other machines may ask at the same moment, seeing the same history) mixes
    in this host's name, so that machines draw apart."""
    optuna = require_optuna()
    salt = zlib.crc32(socket.gethostname().encode()) if shared else 0
    number = (seed * 100_003 + len(study.get_trials(deepcopy=False)) + salt) % 2**32
    random = strategy in ("random", "pbt")
    study.sampler = optuna.samplers.RandomSampler(seed=number) if random else optuna.samplers.TPESampler(seed=number)
