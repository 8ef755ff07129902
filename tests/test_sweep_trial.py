"""A sweep trial is a real run that reports its evaluation marks to Optuna: a pruner stops it there with a
checkpoint (and a resume finishes it as the uninterrupted run would), an unpruned trial returns its final
held-out loss."""

from __future__ import annotations

import pytest

from flopwise import api
from flopwise.budget import Budget
from flopwise.rundir import read_metrics
from flopwise.sweep.space import read_space
from flopwise.sweep.trial import progress_step, run_trial
from flopwise.train.display import ProgressDisplay
from tests.helpers import sweep_setup

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow


@pytest.fixture()
def setup(tmp_path, text_folder):
    base, space_file = sweep_setup(tmp_path, text_folder, lr_high=1e-2)
    return base, read_space(space_file), tmp_path / "trials"


def test_a_pruned_trial_stops_at_its_first_mark_with_a_checkpoint_and_resumes_exactly(setup):
    base, space, folder = setup
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # every loss is above 0
    study.optimize(lambda t: run_trial(t, base, space, Budget.parse("8steps"), folder), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [progress_step(1 / 8)]  # the first mark: after step 1
    run = folder / "0000"
    assert not (run / "final").exists() and (run / "checkpoints").is_dir()
    summary = api.resume(run, display=ProgressDisplay.quiet())
    assert summary.finished and summary.meter.steps == 8


def test_an_unpruned_trial_returns_its_final_heldout_loss(setup):
    base, space, folder = setup
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: run_trial(t, base, space, Budget.parse("6steps"), folder), n_trials=2)
    for trial in study.trials:
        events = read_metrics(folder / f"{trial.number:04d}" / "metrics.jsonl")
        final = [e for e in events if e["event"] == "eval"][-1]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == final["val_loss"]
        assert 1e-3 <= trial.params["optim.lr"] <= 1e-2
        assert sorted(trial.intermediate_values) == sorted({progress_step(e["p"]) for e in events
                                                            if e["event"] == "eval" and e["p"] < 1})
