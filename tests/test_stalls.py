"""A seconds budget on a busy machine: stalls must neither start the decay early nor skip it silently.

The schedule reads the progress the budget has really spent (plus one predicted step), and the step time is the
median of the recent steps, so a stall moves the learning rate only by the budget it really spent.  Where a
stall spends what the decay had left, the run finishes the decay within a bounded overrun and says so.  The fake
clock makes each step cost exactly what the test says, on any machine."""

from __future__ import annotations

import json

import pytest

from flopwise.optim.schedules import Schedule
from flopwise.rundir import read_metrics
from flopwise.train.trainer import DecayEnd, DecayTail, StepTimer, eta_seconds
from tests.helpers import TINY, FakeClock, train, train_events

STEP = 0.1  # seconds of every step but the stalled one
BUDGET = 4.0  # 40 steps without a stall
PEAK = 1e-2  # the tiny run's learning rate
SCHEDULE = Schedule()


def stalled_run(tmp_path, text_folder, monkeypatch, stalled_step: int, stall: float) -> tuple[list[dict], dict]:
    """A 4-second run whose ``stalled_step``-th step takes ``stall`` seconds longer; its train events and plan."""
    clock = FakeClock(lambda model: STEP + (stall if clock.steps == stalled_step else 0.0)).install(monkeypatch)
    run = tmp_path / "run"
    assert train("--data", str(text_folder), "--budget", f"{BUDGET}s", "--out", str(run), *TINY,
                 "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0") == 0
    return train_events(run), json.loads((run / "plan.json").read_text()) | {
        "decay_events": [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "decay"]}


def test_the_median_step_time_ignores_a_stall_and_follows_a_lasting_slowdown():
    timer = StepTimer()
    for seconds in (2.0, 0.1, 0.1, 0.1, 5.0, 0.1):  # the first step compiles; one stall
        timer.update(seconds)
    assert timer.estimate == pytest.approx(0.1)
    for _ in range(5):  # the machine stays twice as slow: after half the window the estimate follows
        timer.update(0.2)
    assert timer.estimate == pytest.approx(0.2)
    timer.rescale(1.5)  # a larger shape: predicted from the old one's until it is timed, its first step left out
    assert timer.estimate == pytest.approx(0.3)
    timer.update(9.0)
    assert timer.estimate == pytest.approx(0.3)


def test_a_tail_finishes_the_schedule_within_one_step_or_two_percent_of_the_budget():
    one_step = DecayTail.after(p=1.05, p_lr=0.85, step_share=0.025)  # a step is more than 2%: one step over
    assert (one_step.steps, one_step.limit) == (1, pytest.approx(1.075)) and one_step.p_lr_of(1) == 1.0
    small_steps = DecayTail.after(p=1.0, p_lr=0.9, step_share=0.005)  # 2% of the budget: four steps
    assert small_steps.steps == 4 and small_steps.limit == pytest.approx(1.02)
    assert [small_steps.p_lr_of(k) for k in (1, 2, 3, 4)] == pytest.approx([0.925, 0.95, 0.975, 1.0])


def test_the_eta_is_never_negative():
    assert eta_seconds(wall=30.0, p=0.5, p_at_start=0.2) == pytest.approx(50.0)
    assert eta_seconds(wall=60.0, p=1.04, p_at_start=0.2) == 0.0  # in the decay's tail, past the budget
    assert eta_seconds(wall=1.0, p=0.2, p_at_start=0.2) is None


@pytest.mark.parametrize("cut_at, finished, cut_short", [(0.98, True, False), (0.85, True, True), (0.9, False, True)])
def test_the_decay_end_says_when_it_was_cut_short_and_how_to_finish_it(cut_at, finished, cut_short):
    tail = DecayTail(cut_at, 2, 1.03)
    end = DecayEnd.of(tail, 2, 1.03 if finished else 1.04, 1.0 if finished else 0.95, SCHEDULE)
    assert end.finished is finished and end.cut_short is cut_short
    assert end.squeezed == pytest.approx((1 - cut_at) / SCHEDULE.decay)
    assert end.to_dict()["cut_short"] is cut_short
    text = end.describe()
    assert ("was cut short" in text) is cut_short and ("--resume RUN --budget LARGER" in text) is cut_short
    if not finished:
        assert f"reached {SCHEDULE(0.95):.3g} of the peak learning rate" in text


@pytest.mark.slow
def test_a_stall_early_in_the_run_moves_the_schedule_only_by_the_budget_it_spent(tmp_path, text_folder, monkeypatch):
    # step 12 ends at p = 0.3 after a 1.2 s stall, where 0.1 s was predicted: p jumps from 0.275 to 0.6
    events, plan = stalled_run(tmp_path, text_folder, monkeypatch, stalled_step=12, stall=1.2)
    before = [0.0] + [e["p"] for e in events[:-1]]
    for event, p_before in zip(events, before):
        assert event["lr"] == pytest.approx(PEAK * SCHEDULE(event["p_lr"]))
        if SCHEDULE.warmup <= event["p_lr"] and p_before < 0.7:  # no step before p = 0.7 below half the peak
            assert event["lr"] >= 0.5 * PEAK
    for event in events[1:-1]:  # each step's schedule stands where the budget is after it (the stall's excepted)
        if event["step"] != 12:
            assert event["p_lr"] == pytest.approx(event["p"], abs=1e-9)
    decay = [e for e, p in zip(events, before) if p >= 0.8]  # the last fifth runs the whole decay
    assert len(decay) == 8 and [e["lr"] for e in decay] == sorted((e["lr"] for e in decay), reverse=True)
    assert decay[0]["lr"] > 0.5 * PEAK and decay[-1]["lr"] == 0.0 and decay[-1]["p_lr"] == 1.0
    assert abs(events[-1]["seconds"] - BUDGET) <= STEP / 2
    assert "decay" not in plan and not plan["decay_events"]


@pytest.mark.slow
@pytest.mark.parametrize("stall", [0.8, 0.55], ids=["past-the-budget", "one-step-short-of-it"])
def test_a_stall_that_spends_the_decay_finishes_it_within_the_bound_and_says_so(tmp_path, text_folder, monkeypatch,
                                                                                capsys, stall):
    # step 34 starts at p = 0.825: the stall ends it at p = 1.05, or at 0.995 with one step's budget left
    events, plan = stalled_run(tmp_path, text_folder, monkeypatch, stalled_step=34, stall=stall)
    stalled = next(e for e in events if e["step"] == 34)
    assert stalled["p_lr"] == pytest.approx(0.85)
    assert events[-1]["lr"] == 0.0 and events[-1]["p_lr"] == 1.0  # ends annealed...
    bound = max(STEP / BUDGET, DecayTail.OVERRUN_SHARE)  # ...within one step or 2% past where the stall left it
    assert events[-1]["p"] - max(stalled["p"], 1.0) <= bound + 1e-9
    (event,) = plan["decay_events"]
    assert plan["decay"]["cut_short"] is True and event["cut_short"] is True and event["finished"] is True
    assert event["cut_at"] == pytest.approx(0.85) and event["squeezed"] == pytest.approx(0.75)
    assert event["overrun"] == pytest.approx(events[-1]["p"] - 1.0)
    out = capsys.readouterr().out
    assert "decay: the budget ran out at schedule progress 0.850" in out and "was cut short" in out
