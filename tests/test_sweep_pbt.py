"""PBT on run folders: truncation selection, copies that resume exactly with only their learning rates changed,
one trial budget spent per member, and a population that died mid-generation ends as the uninterrupted one."""

from __future__ import annotations

import json
import random

import pytest

from flopwise.budget import Budget
from flopwise.config import CONFIG_FILE, config_to_toml, load_config, load_run_config
from flopwise.errors import FlopwiseError
from flopwise.rundir import read_metrics
from flopwise.sweep import pbt
from flopwise.sweep.driver import SweepPlan, run_sweep
from flopwise.sweep.pbt import PERTURB, SECONDS_MARGIN, marks, population_size, truncation
from tests.helpers import TINY_VALUES

optuna = pytest.importorskip("optuna")

TINY = {**TINY_VALUES, "train.log_every": 1}  # every step logged: curves compared step by step


def test_marks_and_population():
    assert marks(0.25) == [0.25, 0.5, 0.75, 1.0]
    assert marks(0.5) == [0.5, 1.0]
    assert population_size(15 * 60.0, 60.0) == 15 and population_size(899.9, 60.0) == 14
    assert population_size(15 * 60.0, 60.0 * (1 + SECONDS_MARGIN)) == 14  # a seconds total leaves a margin


def test_the_bottom_quarter_copies_the_top_quarter_with_a_perturbed_rate():
    losses = {n: float(loss) for n, loss in enumerate([3.0, 1.0, 4.0, 1.5, 9.0, 2.0, 5.0, 2.5])}
    chosen = truncation(losses, random.Random(0))
    assert set(chosen) == {4, 6}  # the two worst of eight
    assert all(source in (1, 3) and factor in PERTURB for source, factor in chosen.values())
    assert set(truncation({0: 1.0, 1: 2.0}, random.Random(0))) == {1}  # at least one member is replaced


def tiny(text_folder, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("[optim.muon_lr]\nlow = 0.005\nhigh = 0.2\nlog = true\n", encoding="utf-8")
    return load_config(values={"data.sources": [str(text_folder)], **TINY}), space


def losses_and_rates(run_dir):
    events = read_metrics(run_dir / "metrics.jsonl")
    return [(e["step"], e["loss"], e["lr"]) for e in events if e["event"] == "train"]


@pytest.mark.slow
def test_a_copied_member_continues_its_source_exactly_with_its_rates_scaled(text_folder, tmp_path, monkeypatch):
    base, space = tiny(text_folder, tmp_path)
    monkeypatch.setattr(pbt, "PERTURB", (1.0,))  # a copy that changes nothing must end where its source ends
    folder = tmp_path / "same"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt", 0,
                                                     interval=0.5))
    state = json.loads((folder / "pbt.json").read_text())
    copied = {int(n): m["copied"][0]["from"] for n, m in state["members"].items() if m.get("copied")}
    assert len(copied) == 1 and [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    (number, source), = copied.items()
    assert study.trials[number].value == study.trials[source].value
    mine, theirs = (losses_and_rates(folder / "trials" / f"{n:04d}") for n in (number, source))
    assert mine == theirs
    budget = json.loads((folder / "sweep.json").read_text())["budget"]
    assert budget["spent"] == 32 and budget["reserved"] == {}
    assert all(m["spent"] == 8 for m in state["members"].values())
    assert study.trials[number].user_attrs["lineage_steps"] == 8
    assert [segment["to_p"] for segment in state["members"][str(number)]["lineage"]] == [0.5, 1.0]


@pytest.mark.slow
def test_a_scaled_copy_trains_at_the_scaled_rates_from_its_source_checkpoint(text_folder, tmp_path, monkeypatch):
    base, space = tiny(text_folder, tmp_path)
    monkeypatch.setattr(pbt, "PERTURB", (1.2,))
    folder = tmp_path / "scaled"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt", 0,
                                                     interval=0.5))
    state = json.loads((folder / "pbt.json").read_text())
    (number, member), = [(int(n), m) for n, m in state["members"].items() if m.get("copied")]
    source = member["copied"][0]["from"]
    mine, theirs = (losses_and_rates(folder / "trials" / f"{n:04d}") for n in (number, source))
    assert mine[:4] == theirs[:4]  # the source's curve to the mark, copied
    assert all(m[2] == pytest.approx(1.2 * t[2]) for m, t in zip(mine[4:], theirs[4:]))
    config, source_config = (load_run_config(folder / "trials" / f"{n:04d}") for n in (number, source))
    assert config.optim.muon_lr == pytest.approx(1.2 * source_config.optim.muon_lr)
    assert study.trials[number].user_attrs["values"]["optim.muon_lr"] == pytest.approx(config.optim.muon_lr)
    assert "PBT" in (folder / "best.toml").read_text()


@pytest.mark.slow
def test_a_population_that_died_mid_generation_resumes_to_the_uninterrupted_end(text_folder, tmp_path, monkeypatch):
    from flopwise import api
    from flopwise.sweep.driver import resume_sweep

    base, space = tiny(text_folder, tmp_path)
    plan = SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt", 3, interval=0.5)
    whole = run_sweep(tmp_path / "whole", base, space, plan)
    real_resume = api.resume
    calls = []

    def dies_in_the_second_generation(run_dir, *args, **kwargs):
        calls.append(run_dir)
        if len(calls) == 3:
            real_resume(run_dir, *args, stop_after="1steps", **kwargs)
            raise KeyboardInterrupt
        return real_resume(run_dir, *args, **kwargs)

    monkeypatch.setattr(pbt.api, "resume", dies_in_the_second_generation)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path / "crash", base, space, plan)
    monkeypatch.setattr(pbt.api, "resume", real_resume)
    resumed = resume_sweep(tmp_path / "crash")
    assert [(t.value, t.user_attrs["values"]) for t in resumed.trials] == [
        (t.value, t.user_attrs["values"]) for t in whole.trials]
    assert json.loads((tmp_path / "crash" / "sweep.json").read_text())["budget"]["spent"] == 32


def test_pbt_refuses_several_workers_and_a_bad_interval(text_folder, tmp_path):
    base, space = tiny(text_folder, tmp_path)
    with pytest.raises(FlopwiseError, match="lockstep in one process"):
        run_sweep(tmp_path / "w", base, space, SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt"),
                  workers=2)
    with pytest.raises(FlopwiseError, match="--pbt-interval 1"):
        run_sweep(tmp_path / "i", base, space, SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt",
                                                         interval=1.0))


@pytest.mark.slow
def test_a_resumed_run_trains_at_the_rates_its_config_now_gives(text_folder, tmp_path):
    from flopwise import api
    from flopwise.reopen import open_for_resume

    base, _ = tiny(text_folder, tmp_path)
    run_dir = tmp_path / "run"
    api.run(base.replace(**{"budget.steps": 8}), run_dir, stop_after="4steps")
    config = load_run_config(run_dir)
    edited = config.replace(**{"optim.lr": config.optim.lr * 2, "optim.muon_lr": config.optim.muon_lr * 2})
    (run_dir / CONFIG_FILE).write_text(config_to_toml(edited), encoding="utf-8")
    session, _ = open_for_resume(run_dir, None)
    peaks = sorted({group["peak_lr"] for group in session.optimizer.param_groups})
    assert peaks == sorted({edited.optim.lr, edited.optim.muon_lr})


@pytest.mark.slow
def test_a_member_whose_values_fail_leaves_the_population_and_the_rest_go_on(text_folder, tmp_path):
    base, _ = tiny(text_folder, tmp_path)
    space = tmp_path / "heads.toml"
    space.write_text("[model.d_model]\nchoices = [64, 80]\n[model.n_heads]\nchoices = [2, 32]\n",
                     encoding="utf-8")  # each valid alone; 32 heads do not divide 80
    folder = tmp_path / "fails"
    study = run_sweep(folder, base, space, SweepPlan(Budget.parse("32steps"), Budget.parse("8steps"), "pbt", 0,
                                                     interval=0.5))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete and len(failed) + len(complete) == 4
    assert all(t.params == {"model.d_model": 80, "model.n_heads": 32} and "n_heads" in t.user_attrs["error"]
               for t in failed)
    assert json.loads((folder / "sweep.json").read_text())["budget"]["reserved"] == {}
