"""Real (tiny) training runs through the CLI: budgets, schedules, resume, extension."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from flopwise.cli import main
from flopwise.optim.schedules import Schedule
from flopwise.rundir import read_metrics
from tests.helpers import TINY, FakeClock, losses, train, train_events


def test_step_budget_runs_exactly_and_ends_annealed(tmp_path, text_folder):
    run = tmp_path / "r"
    assert train("--data", str(text_folder), "--budget", "30steps", "--out", str(run), *TINY) == 0
    events = train_events(run)
    assert [e["step"] for e in events] == list(range(1, 31))
    assert events[-1]["lr"] == 0.0 and events[-1]["p"] == 1.0
    peak = 1e-2
    schedule = Schedule()
    for event in events:  # each step's LR is the schedule at p = step / 30
        assert event["lr"] == pytest.approx(peak * schedule(event["step"] / 30))
    assert (run / "final" / "model.safetensors").is_file()
    evals = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]
    assert evals and evals[-1]["p"] == 1.0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["tokens_per_step"] == 4 * 64
    assert events[-1]["tokens"] == 30 * 4 * 64


def test_token_and_flop_budgets_stop_at_the_binding_limit(tmp_path, text_folder):
    run = tmp_path / "tok"
    # 4 x 64 = 256 tokens per step: 2600 tokens need 11 steps (the last one may overshoot)
    assert train("--data", str(text_folder), "--budget", "2600tokens,100steps", "--out", str(run), *TINY) == 0
    assert len(train_events(run)) == 11
    flops_per_step = json.loads((run / "plan.json").read_text())["flops_per_step"]
    run2 = tmp_path / "flops"
    assert train("--data", str(text_folder), "--budget", f"{7 * flops_per_step}flops", "--out", str(run2), *TINY) == 0
    assert len(train_events(run2)) == 7


@pytest.mark.slow
def test_same_seed_same_curve_and_other_seed_differs(tmp_path, text_folder):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train("--data", str(text_folder), "--budget", "12steps", "--seed", seed, "--out", str(tmp_path / name),
                     *TINY) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


@pytest.mark.slow
def test_seconds_budget_lands_on_budget_with_final_lr(tmp_path, text_folder, monkeypatch):
    """On a fake clock, so that the steps are the same on any machine, however slow or busy: a slow first
    step (allocation), then steps alternating 90 and 110 ms with one 0.4 s stall, and 50 ms of wall clock
    per loss forecast (every 0.1 of the budget), which the budget must not count."""
    from flopwise.train.forecast import LossForecaster

    def step_seconds(model) -> float:
        step = clock.steps
        return 0.6 if step == 1 else 0.4 if step == 40 else 0.09 if step % 2 else 0.11

    clock = FakeClock(step_seconds).install(monkeypatch)
    forecast, forecasts = LossForecaster.forecast, []

    def slow_forecast(self, tokens, p):
        forecasts.append(p)
        clock.advance(0.05)
        return forecast(self, tokens, p)

    monkeypatch.setattr(LossForecaster, "forecast", slow_forecast)
    run = tmp_path / "sec"
    budget = 8.0
    assert train("--data", str(text_folder), "--budget", f"{budget}s", "--out", str(run), *TINY,
                 "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0") == 0
    events = train_events(run)
    assert events[-1]["lr"] == 0.0
    assert events[-1]["p_lr"] == 1.0
    assert len(events) == clock.steps and abs(events[-1]["seconds"] - budget) < 0.055  # within half a step
    assert [round(p, 1) for p in forecasts] == [round(0.1 * k, 1) for k in range(1, 10)]
    # wall clock also holds the forecasts, which the budget does not count
    assert events[-1]["wall"] - events[-1]["seconds"] == pytest.approx(0.05 * len(forecasts))


@pytest.mark.slow
def test_stop_after_and_resume_equal_the_uninterrupted_run(tmp_path, text_folder):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train("--data", str(text_folder), "--budget", "40steps", "--out", str(full), *TINY) == 0
    assert train("--data", str(text_folder), "--budget", "40steps", "--stop-after", "20steps", "--out", str(part),
                 *TINY) == 0
    assert not (part / "final").exists()
    assert losses(part)[-1][0] == 20
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)  # bit for bit
    assert [e["lr"] for e in train_events(part)] == [e["lr"] for e in train_events(full)]


def start_training_process(args: list[str], out: Path, ready: Callable[[], bool]) -> subprocess.Popen:
    """`python -m flopwise train` in a child process, returned once ``ready()`` holds."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "flopwise", "train", *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path, text_folder):
    args = ["--data", str(text_folder), "--budget", "100steps", *TINY, "--set", "train.checkpoint_every=0.03"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train(*args, "--out", str(full)) == 0
    proc = start_training_process(args, killed, lambda: bool(list((killed / "checkpoints").glob("step_*"))))
    time.sleep(random.Random().uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = len(train_events(killed))
    assert train("--resume", str(killed)) == 0
    assert losses(killed) == losses(full), f"killed after {steps_before} logged steps"


@pytest.mark.slow
def test_ctrl_c_checkpoints_then_resume_equals_uninterrupted(tmp_path, text_folder):
    args = ["--data", str(text_folder), "--budget", "100steps", *TINY, "--set", "train.checkpoint_every=0"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train(*args, "--out", str(full)) == 0
    proc = start_training_process(args, stopped, (stopped / "metrics.jsonl").exists)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "flopwise train --resume" in output
    assert len(list((stopped / "checkpoints").glob("step_*"))) == 1
    assert train("--resume", str(stopped)) == 0
    assert losses(stopped) == losses(full)


@pytest.mark.slow
def test_second_run_tokenizes_nothing(tmp_path, text_folder, capsys):
    args = ["--data", str(text_folder), "--budget", "2steps", "--set", "data.vocab_size=400", *TINY[2:]]
    assert train(*args, "--out", str(tmp_path / "one"), "--set", "data.cache_dir=" + str(tmp_path / "cache")) == 0
    assert "(tokenized," in capsys.readouterr().out
    assert train(*args, "--out", str(tmp_path / "two"), "--set", "data.cache_dir=" + str(tmp_path / "cache")) == 0
    assert "(cached," in capsys.readouterr().out
    assert (tmp_path / "one" / "tokenizer.json").read_text() == (tmp_path / "two" / "tokenizer.json").read_text()
    assert losses(tmp_path / "one") == losses(tmp_path / "two")


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, text_folder):
    args = ["--data", str(text_folder), "--budget", "4steps", *TINY]
    assert train(*args, "--out", str(tmp_path / "eager")) == 0
    assert train(*args, "--compile", "--out", str(tmp_path / "compiled")) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [step for step, _ in compiled] == [1, 2, 3, 4]
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], rel=1e-4)


@pytest.mark.slow
def test_extend_finished_run_restarts_from_before_the_decay(tmp_path, text_folder):
    run = tmp_path / "ext"
    assert train("--data", str(text_folder), "--budget", "40steps", "--out", str(run), *TINY) == 0
    before = train_events(run)
    assert train("--resume", str(run)) == 2  # finished: needs a larger budget
    assert train("--resume", str(run), "--budget", "80steps") == 0
    after = train_events(run)
    assert [e["step"] for e in after] == list(range(1, 81))
    # decay of the 40-step run starts after p = 0.8, i.e. step 32: steps up to there are kept as they were
    assert after[:32] == before[:32]
    peak = 1e-2
    assert all(e["lr"] == peak for e in after[32:64])  # stable again until 0.8 of the new budget
    assert after[-1]["lr"] == 0.0
    assert (run / "final").is_dir()


def test_eval_and_sample_commands(tmp_path, text_folder, capsys):
    run = tmp_path / "done"
    assert train("--data", str(text_folder), "--budget", "20steps", "--out", str(run), *TINY) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "held-out evaluation" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["domains"]["text"]["tokens"] == result["tokens"] > 0
    assert result["bpb"] > 0
    assert main(["sample", str(run), "--prompt", "The ", "--max-tokens", "20", "--top-k", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The ") and len(first.encode()) > len("The ")
    assert main(["sample", str(run), "--prompt", "The ", "--max-tokens", "20", "--top-k", "1"]) == 0
    assert capsys.readouterr().out == first
