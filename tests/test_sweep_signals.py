"""The rung-signal comparison reads each finished trial's marks and forecasts and correlates them with the
final losses; checked on hand-made metrics whose ranks are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flopwise.sweep.signals import rank_agreement, trial_signals


def write_trial(folder: Path, final: float, mid_loss: float, mid_forecast: float | None, finished: bool = True) -> None:
    folder.mkdir(parents=True)
    events = [{"event": "forecast", "step": 2, "p": 0.2, "predicted_loss": mid_forecast}] if mid_forecast else []
    events += [{"event": "eval", "step": 5, "p": 0.5, "val_loss": mid_loss},
               {"event": "eval", "step": 10, "p": 1.0, "val_loss": final}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if finished:
        (folder / "final").mkdir()


def test_forecasts_that_rank_like_the_finals_and_losses_that_rank_backwards(tmp_path):
    finals = [3.0, 3.2, 3.4, 3.6]
    for i, final in enumerate(finals):
        write_trial(tmp_path / f"{i:04d}", final, mid_loss=5.0 - i, mid_forecast=final + 0.1)
    write_trial(tmp_path / "0009", 2.0, 9.0, 2.1, finished=False)  # unfinished: left out
    rows = rank_agreement(tmp_path)
    assert rows == [{"p": 0.5, "trials": 4, "loss_rho": pytest.approx(-1.0), "forecast_trials": 4,
                     "forecast_rho": pytest.approx(1.0), "loss_rho_same": pytest.approx(-1.0)}]


def test_the_loss_is_ranked_over_every_finished_trial_and_the_forecast_over_those_that_had_one(tmp_path):
    finals = [3.0, 3.2, 3.4, 3.6, 3.8]
    for i, final in enumerate(finals):  # losses rank like the finals; only the last three have a forecast
        write_trial(tmp_path / f"{i:04d}", final, mid_loss=4.0 + i, mid_forecast=final - i if i >= 2 else None)
    (row,) = rank_agreement(tmp_path)
    assert row["trials"] == 5 and row["loss_rho"] == pytest.approx(1.0)
    assert row["forecast_trials"] == 3 and row["forecast_rho"] == pytest.approx(-1.0)
    assert row["loss_rho_same"] == pytest.approx(1.0)


def test_a_mark_before_any_forecast_has_none(tmp_path):
    write_trial(tmp_path / "t", 3.0, 4.0, None)
    final, marks = trial_signals(tmp_path / "t")
    assert final == 3.0 and marks == [{"p": 0.5, "loss": 4.0, "forecast": None}]


def test_a_constant_signal_has_no_rank_correlation(tmp_path):
    for i, final in enumerate([3.0, 3.2, 3.4]):
        write_trial(tmp_path / f"{i:04d}", final, mid_loss=4.0 + i, mid_forecast=2.5)  # one forecast for all
    (row,) = rank_agreement(tmp_path)
    assert row["forecast_trials"] == 3 and row["forecast_rho"] is None and row["loss_rho"] == pytest.approx(1.0)
