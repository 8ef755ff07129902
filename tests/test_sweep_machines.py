"""Sweeps on several machines sharing one study: together they spend one total budget, and a trial whose
machine died (killed mid-trial) is taken over by another machine after its heartbeat stops, resuming from its
checkpoint where its folder is readable, restarting where it is not, and counted once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flopwise import api
from flopwise.budget import Budget
from flopwise.sweep.driver import SweepPlan, run_sweep
from flopwise.sweep.trial import trial_config
from tests.helpers import TINY_VALUES, kill_at_first_checkpoint, sweep_setup

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow


def sweep_command(folder: Path, space: Path, text_folder: Path, storage: str, total: str, trial: str,
                  *extra: str) -> list[str]:
    overrides = [arg for key, value in TINY_VALUES.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "flopwise", "sweep", "--budget", total, "--trial-budget", trial, "--space",
            str(space), "--out", str(folder), "--strategy", "random", "--seed", "3", "--storage", storage,
            "--data", str(text_folder), *overrides, *extra]


def spent_in(folder: Path) -> float:
    return json.loads((folder / "sweep.json").read_text())["budget"]["spent"]


def test_two_machines_on_one_storage_spend_one_total_between_them(tmp_path, text_folder):
    _, space = sweep_setup(tmp_path, text_folder)
    storage = str(tmp_path / "shared.log")  # a journal file on a disk both machines mount
    machines = [tmp_path / "a", tmp_path / "b"]
    processes = [subprocess.Popen(sweep_command(folder, space, text_folder, storage, "24steps", "6steps"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for folder in machines]
    for process in processes:
        out, err = process.communicate(timeout=400)
        assert process.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="flopwise", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    run = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(run) == 4  # 24 steps fund four 6-step trials in all, not four per machine
    assert sum(t.user_attrs["spent"] for t in study.trials) == 24
    assert all(t.user_attrs["spent"] == 0 for t in study.trials if t not in run)  # a lost race runs nothing
    assert spent_in(machines[0]) + spent_in(machines[1]) == 24  # each machine's own part of the one total
    assert {Path(t.user_attrs["run_dir"]).parent.parent for t in run} <= {m.resolve() for m in machines}


def test_a_machine_with_another_total_is_refused_in_one_line(tmp_path, text_folder):
    _, space = sweep_setup(tmp_path, text_folder)
    storage = str(tmp_path / "shared.log")
    first = subprocess.run(sweep_command(tmp_path / "a", space, text_folder, storage, "6steps", "6steps"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(sweep_command(tmp_path / "b", space, text_folder, storage, "12steps", "6steps"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and not (tmp_path / "b").exists()  # refused before anything is written
    assert second.stderr.strip().splitlines() == [
        "flopwise: error: --budget 12 steps is not the total of the shared study (6 in the same unit, set by the "
        "machine that started it): every machine of a shared sweep gives the same --budget"]


@pytest.mark.parametrize("shared_disk", [True, False])
def test_a_dead_machines_trial_is_taken_over_after_its_heartbeat_stops(tmp_path, text_folder, shared_disk):
    base, space = sweep_setup(tmp_path, text_folder)
    base = base.replace(**{"train.seed": 3})  # --seed 3
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    dead, alive = tmp_path / "dead", tmp_path / "alive"
    process = subprocess.Popen(sweep_command(dead, space, text_folder, storage, "60steps", "30steps",
                                             "--heartbeat", "1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = dead / "trials" / "0000" / "checkpoints"
    kill_at_first_checkpoint(process, checkpoints, "trial 0")  # the machine dies mid-trial
    assert not (dead / "trials" / "0000" / "final").exists()
    if not shared_disk:  # the other machine cannot read the dead one's folder
        shutil.rmtree(dead)
    said: list[str] = []
    study = run_sweep(alive, base, space, SweepPlan(Budget.parse("60steps"), Budget.parse("30steps"), "random", 3),
                      storage, say=said.append, heartbeat=1)
    died = study.trials[0]
    assert died.state == optuna.trial.TrialState.FAIL and "spent" not in died.user_attrs
    (copy,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert copy.state == optuna.trial.TrialState.COMPLETE and copy.params == died.params
    assert any(f"trial {copy.number} takes over" in line for line in said) == shared_disk
    uninterrupted = api.run(trial_config(base, died.params, Budget.parse("30steps")), tmp_path / "uninterrupted")
    assert copy.value == uninterrupted.final_eval["loss"]  # resumed exactly, or run again from the start
    ended = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(ended) == 2 and sum(t.user_attrs["spent"] for t in ended) == 60  # the dead trial counted once
    assert spent_in(alive) == 60
