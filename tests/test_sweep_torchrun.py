"""A sweep under torchrun (gloo, 2 processes): rank 0 asks Optuna and the pruner, every trial runs on both
processes as DDP, and both stop together where the pruner stops a trial."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flopwise import api
from flopwise.budget import Budget
from flopwise.config import load_config
from flopwise.report.sweep import load_sweep
from flopwise.sweep.trial import trial_config
from tests.helpers import TINY_VALUES as SETTINGS

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow



def test_each_trial_runs_on_both_processes_and_pruning_stops_them_together(tmp_path, text_folder):
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nlow = 1e-3\nhigh = 3e-2\nlog = true\n", encoding="utf-8")
    folder = tmp_path / "sweep"
    overrides = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flopwise",
               "sweep", "--budget", "24steps", "--trial-budget", "8steps", "--space", str(space), "--out", str(folder),
               "--strategy", "asha", "--seed", "1", "--data", str(text_folder), "--set", "train.parallel=ddp",
               *overrides]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_sweep(folder).study
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    for trial in study.trials:
        plan = json.loads((folder / "trials" / f"{trial.number:04d}" / "plan.json").read_text())
        assert plan["world_size"] == 2 and plan["parallel"] == "ddp"
    assert done.stdout.count("best trial") == 1  # only rank 0 prints
    best = study.best_trial
    base = load_config(values={"data.sources": [str(text_folder)], "train.seed": 1, **SETTINGS})  # --seed 1
    alone = api.run(trial_config(base, best.params, Budget.parse("8steps")), tmp_path / "alone")
    assert alone.final_eval["loss"] == pytest.approx(best.value, rel=1e-5)  # DDP follows one process
