"""A sweep's state files when something damaged them: a corrupt sweep.json or bytes that are not records in the
journal stop `sweep --resume` and `report` in one line naming the file; a journal whose last record a crash
cut off is read without it and never appended onto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flopwise.budget import Budget
from flopwise.config import config_to_toml, load_config
from flopwise.sweep.driver import SweepPlan, resume_sweep, run_sweep, study_storage
from tests.helpers import TINY_VALUES, run_error, sweep_setup

optuna = pytest.importorskip("optuna")

SETTINGS = {"total": {"steps": 8}, "trial": {"steps": 4}, "strategy": "random", "seed": 0, "signal": "loss",
            "interval": 0.25, "storage": None, "workers": 1,
            "budget": {"total": 8.0, "spent": 0.0, "reserved": {}, "overrun": 0.0}}


def journal_with_trials(folder: Path, values: list[float]) -> Path:
    """A sweep folder whose journal holds one finished trial per value (written by Optuna itself)."""
    (folder / "trials").mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    (folder / "base.toml").write_text(config_to_toml(load_config(values=TINY_VALUES)), encoding="utf-8")
    (folder / "space.toml").write_text("[optim.lr]\nlow = 1e-3\nhigh = 1e-2\nlog = true\n", encoding="utf-8")
    study = optuna.create_study(study_name="flopwise", storage=study_storage(folder, None))
    for value in values:
        trial = study.ask()
        trial.suggest_float("optim.lr", 1e-3, 1e-2, log=True)
        study.tell(trial, value)
    return folder / "journal.log"


def reloaded_values(journal: Path) -> list[float]:
    """The finished trials' values as plain Optuna reads the file (which raises on an undecodable record)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return [t.value for t in optuna.load_study(study_name="flopwise", storage=storage).trials]


@pytest.mark.parametrize("damage", ["not json", "missing key", "wrong type"])
def test_a_damaged_sweep_json_stops_resume_and_report_in_one_line(tmp_path, capsys, damage):
    folder = tmp_path / "sweep"
    journal_with_trials(folder, [3.0])
    text = {"not json": '{"total": {"steps', "missing key": json.dumps({k: v for k, v in SETTINGS.items()
                                                                       if k != "trial"}),
            "wrong type": json.dumps({**SETTINGS, "budget": {**SETTINGS["budget"], "reserved": {"x": 1}}})}[damage]
    (folder / "sweep.json").write_text(text, encoding="utf-8")
    for args in (["sweep", "--resume", str(folder)], ["report", str(folder), "--out", str(tmp_path / "report")]):
        err = run_error(capsys, args)
        assert f"'{folder / 'sweep.json'}' is damaged (" in err
        assert err.endswith("restore it from a backup, or start the sweep again with another --out")


@pytest.mark.parametrize("where", ["middle", "end"])
def test_random_bytes_in_the_journal_stop_resume_and_report_in_one_line(tmp_path, capsys, where):
    folder = tmp_path / "sweep"
    journal = journal_with_trials(folder, [3.0, 2.0])
    lines = journal.read_bytes().splitlines(keepends=True)
    garbage = bytes(range(128, 256)) + b"\x00\n"
    at = 2 if where == "middle" else len(lines)
    journal.write_bytes(b"".join(lines[:at]) + garbage + b"".join(lines[at:]))
    for args in (["sweep", "--resume", str(folder)], ["report", str(folder), "--out", str(tmp_path / "report")]):
        err = run_error(capsys, args)
        assert err == (f"flopwise: error: '{journal}' line {at + 1} is not an Optuna journal record (the file is "
                       "damaged): restore it from a backup, or start the sweep again with another --out (and "
                       "--storage)")


def test_bytes_after_the_last_record_that_no_record_starts_with_are_damage_not_a_crash(tmp_path, capsys):
    folder = tmp_path / "sweep"
    journal = journal_with_trials(folder, [3.0])
    lines = len(journal.read_bytes().splitlines())
    journal.write_bytes(journal.read_bytes() + b"\xff\xfe garbage")
    err = run_error(capsys, ["report", str(folder), "--out", str(tmp_path / "report")])
    assert f"'{journal}' line {lines + 1} is not an Optuna journal record" in err


@pytest.mark.parametrize("cut", [1, 20, 60])
def test_a_cut_last_record_is_dropped_before_the_next_append_never_appended_onto(tmp_path, capsys, cut):
    folder = tmp_path / "sweep"
    journal = journal_with_trials(folder, [3.0, 2.0])
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-cut])  # the last record (trial 1 told 2.0) cut: it never happened
    study = optuna.load_study(study_name="flopwise", storage=study_storage(folder, None))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    study.tell(study.trials[1].number, 1.5)  # the next append
    assert f"'{journal}' ended inside a record (a crash mid-write): dropped its" in capsys.readouterr().err
    assert reloaded_values(journal) == [3.0, 1.5]
    assert journal.read_bytes().startswith(whole[:whole.rindex(b"\n", 0, len(whole) - 1) + 1])


@pytest.mark.slow
def test_resume_after_a_crash_cut_the_last_journal_record_finishes_the_sweep(tmp_path, text_folder):
    base, space = sweep_setup(tmp_path, text_folder)
    folder = tmp_path / "sweep"
    whole = run_sweep(folder, base, space, SweepPlan(Budget.parse("8steps"), Budget.parse("4steps"), "random", 0))
    journal = folder / "journal.log"
    crashed = tmp_path / "crashed"
    shutil.copytree(folder, crashed)
    # The crash came while trial 1 was told: its record is cut, and sweep.json still reserves its budget.
    text = journal.read_bytes()
    (crashed / "journal.log").write_bytes(text[:-30])
    settings = json.loads((folder / "sweep.json").read_text())
    settings["budget"].update(spent=4.0, reserved={"1": 4.0})
    (crashed / "sweep.json").write_text(json.dumps(settings))
    study = resume_sweep(crashed)
    assert [(t.state, t.value) for t in study.trials] == [(t.state, t.value) for t in whole.trials]
    assert reloaded_values(crashed / "journal.log") == [t.value for t in whole.trials]
    assert json.loads((crashed / "sweep.json").read_text())["budget"]["spent"] == 8
