"""A sweep in one process: trials run while the total budget funds a whole one, the spending never passes the
total, pruned trials give back what they did not spend, and best.toml runs the best trial again exactly."""

from __future__ import annotations

import json

import pytest

from flopwise.budget import Budget
from flopwise.cli import main
from flopwise.errors import FlopwiseError
from flopwise.rundir import read_metrics
from flopwise.sweep.driver import SweepPlan, check_plan, run_sweep
from flopwise.sweep.trial import spent_by
from tests.helpers import TINY_VALUES as TINY
from tests.helpers import kill_at_first_checkpoint, sweep_setup

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow


@pytest.fixture()
def setup(tmp_path, text_folder):
    return sweep_setup(tmp_path, text_folder)


def test_random_search_runs_whole_trials_to_the_total_and_best_toml_reproduces_the_best(setup, tmp_path):
    base, space = setup
    folder = tmp_path / "sweep"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("24steps"), Budget.parse("6steps"), "random", 1))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    accounting = json.loads((folder / "sweep.json").read_text())["budget"]
    assert accounting["spent"] == 24 and accounting["reserved"] == {}
    again = tmp_path / "again"
    assert main(["train", "--config", str(folder / "best.toml"), "--out", str(again)]) == 0
    final = [e for e in read_metrics(again / "metrics.jsonl") if e["event"] == "eval"][-1]["val_loss"]
    assert final == study.best_value


def test_asha_prunes_and_pruned_trials_give_back_what_they_did_not_spend(setup, tmp_path):
    base, space = setup
    folder = tmp_path / "asha"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("24steps"), Budget.parse("8steps"), "asha", 1))
    spent = {t.number: spent_by(folder / "trials" / f"{t.number:04d}", "steps") for t in study.trials}
    pruned = [t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(spent[n] < 8 for n in pruned)
    accounting = json.loads((folder / "sweep.json").read_text())["budget"]
    assert accounting["spent"] == sum(spent.values()) <= 24
    assert 24 - accounting["spent"] < 8  # it stopped only when no whole trial fitted


@pytest.mark.parametrize(("total", "trial", "strategy", "expected"), [
    ("15m", "100steps", "asha", "same unit"), ("1m", "2m", "asha", "larger than"), ("15m", "1m", "grid", "unknown"),
    ("15m,5M", "1m", "asha", "one limit"),
])
def test_bad_plans_are_refused_in_one_line(total, trial, strategy, expected):
    with pytest.raises(FlopwiseError, match=expected):
        check_plan(SweepPlan(Budget.parse(total), Budget.parse(trial), strategy))


def test_the_command_runs_a_sweep_and_prints_its_trials(tmp_path, text_folder, capsys):
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nlow = 1e-3\nhigh = 3e-2\nlog = true\n", encoding="utf-8")
    args = ["sweep", "--budget", "12steps", "--trial-budget", "6steps", "--space", str(space), "--out",
            str(tmp_path / "s"), "--strategy", "random", "--data", str(text_folder), "--tokenizer", "byte",
            "--set", "model.size=tiny", "--set", "model.seq_len=64", "--set", "optim.batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trial 0 complete: final loss" in out and "trial 1 complete" in out and "best trial" in out
    assert (tmp_path / "s" / "best.toml").is_file() and (tmp_path / "s" / "journal.log").is_file()


def test_without_optuna_the_command_names_the_install(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nlow = 1e-3\nhigh = 3e-2\n", encoding="utf-8")
    assert main(["sweep", "--budget", "12steps", "--trial-budget", "6steps", "--space", str(space)]) == 2
    assert "pip install 'flopwise[sweep]'" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def ended(study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.value, sorted(t.intermediate_values.items())) for t in study.trials]


def test_a_sweep_whose_process_died_mid_trial_resumes_it_and_ends_as_the_uninterrupted_sweep(setup, tmp_path,
                                                                                             monkeypatch):
    from flopwise import api
    from flopwise.sweep import trial as trial_module
    from flopwise.sweep.driver import resume_sweep

    base, space = setup
    plan = SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "asha", 1)
    uninterrupted = run_sweep(tmp_path / "whole", base, space, plan)
    folder = tmp_path / "crash"
    real_run = api.run

    def dies_in_trial_1(config, out, **kwargs):
        if str(out).endswith("0001"):
            real_run(config, out, stop_after="3steps", **kwargs)  # checkpointed at step 3, then the process dies
            raise KeyboardInterrupt
        return real_run(config, out, **kwargs)

    monkeypatch.setattr(trial_module.api, "run", dies_in_trial_1)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(folder, base, space, plan)
    assert json.loads((folder / "sweep.json").read_text())["budget"]["reserved"] == {"1": 8.0}
    monkeypatch.setattr(trial_module.api, "run", real_run)

    study = resume_sweep(folder)
    assert ended(study) == ended(uninterrupted)  # same trials, values, marks and pruning decisions
    spent = json.loads((folder / "sweep.json").read_text())["budget"]
    assert spent == json.loads((tmp_path / "whole" / "sweep.json").read_text())["budget"]
    steps = [e["step"] for e in read_metrics(folder / "trials" / "0001" / "metrics.jsonl") if e["event"] == "train"]
    assert steps == sorted(set(steps))  # continued from its checkpoint, no step run twice


def test_two_workers_share_the_total_and_draw_different_values(setup, tmp_path):
    base, space = setup
    folder = tmp_path / "two"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("24steps"), Budget.parse("6steps"), "random", 0),
                      workers=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert len({t.params["optim.lr"] for t in study.trials}) == 4
    assert sorted(p.name for p in (folder / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    for trial in study.trials:  # each trial ran once, whole, in one worker
        steps = [e["step"] for e in read_metrics(folder / "trials" / f"{trial.number:04d}" / "metrics.jsonl")
                 if e["event"] == "train"]
        assert steps == sorted(set(steps)) and steps[-1] == 6
    assert json.loads((folder / "sweep.json").read_text())["budget"] == {"total": 24.0, "spent": 24.0,
                                                                          "reserved": {}, "overrun": 0.0}


def test_two_machines_share_one_study_and_its_total_through_a_journal_on_a_shared_disk(setup, tmp_path):
    base, space = setup
    shared = tmp_path / "shared" / "study.log"
    shared.parent.mkdir()
    plan = SweepPlan(Budget.parse("12steps"), Budget.parse("6steps"), "random", 0)
    run_sweep(tmp_path / "machine_a", base, space, plan, storage=str(shared))
    study = run_sweep(tmp_path / "machine_b", base, space, plan, storage=str(shared))
    assert [t.number for t in study.trials] == [0, 1]  # one study and one total: the first machine spent it
    assert sorted(p.name for p in (tmp_path / "machine_a" / "trials").iterdir()) == ["0000", "0001"]
    assert not any((tmp_path / "machine_b").glob("trials/*"))
    assert len({t.params["optim.lr"] for t in study.trials}) == 2
    assert not (tmp_path / "machine_a" / "journal.log").exists()


def test_report_of_a_sweep_folder_compares_its_trials_and_shows_the_study(setup, tmp_path, capsys):
    import importlib.util

    base, space = setup
    folder = tmp_path / "rep"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("24steps"), Budget.parse("6steps"), "random", 0))
    capsys.readouterr()
    out_dir = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "0000" in out and "0003" in out  # each trial's run in the runs table
    assert f"best trial {study.best_trial.number}, held-out loss {study.best_value:.4f}" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["runs"]) == 4
    (sweep,) = report["sweeps"]
    assert sweep["best"] == {"trial": study.best_trial.number, "loss": study.best_value}
    assert [t["values"]["optim.lr"] for t in sweep["trials"]] == [t.params["optim.lr"] for t in study.trials]
    page = (out_dir / "report.html").read_text()
    assert "Sweep rep (random)" in page and f"{study.best_value:.4f}" in page
    assert (out_dir / "sweep_history_rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if importlib.util.find_spec("sklearn"):  # Optuna's fANOVA importance needs scikit-learn
        assert (out_dir / "sweep_importance_rep.png").is_file()
    else:
        assert "no parameter importance" in page


def test_a_trials_spending_counts_its_last_evaluation_past_its_last_logged_step(tmp_path):
    events = [{"event": "train", "step": 1, "seconds": 1.7, "tokens": 8192.0},
              {"event": "eval", "step": 5, "seconds": 5.4, "tokens": 40960.0, "val_loss": 7.5},
              {"event": "forecast", "step": 5, "seconds": 9.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert (spent_by(tmp_path, "seconds"), spent_by(tmp_path, "steps"), spent_by(tmp_path, "tokens")) == (5.4, 5, 40960)
    assert spent_by(tmp_path / "never-started", "seconds") == 0.0


def test_kill_9_mid_trial_then_resume_ends_as_the_uninterrupted_sweep(setup, tmp_path, text_folder):
    import subprocess
    import sys

    from flopwise.sweep.driver import resume_sweep

    base, space = setup
    plan = SweepPlan(Budget.parse("90steps"), Budget.parse("30steps"), "asha", 2)
    base = base.replace(**{"train.seed": 2})  # --seed 2 is the sampler's seed and every trial's train.seed
    uninterrupted = run_sweep(tmp_path / "whole", base, space, plan)
    folder = tmp_path / "killed"
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    process = subprocess.Popen([sys.executable, "-m", "flopwise", "sweep", "--budget", "90steps", "--trial-budget",
                                "30steps", "--space", str(space), "--out", str(folder), "--strategy", "asha",
                                "--seed", "2", "--data", str(text_folder), *overrides],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = folder / "trials" / "0001" / "checkpoints"
    kill_at_first_checkpoint(process, checkpoints, "trial 1")
    assert not (folder / "trials" / "0001" / "final").exists()  # killed mid-trial
    study = resume_sweep(folder)
    assert ended(study) == ended(uninterrupted)
    assert json.loads((folder / "sweep.json").read_text())["budget"] == json.loads(
        (tmp_path / "whole" / "sweep.json").read_text())["budget"]
