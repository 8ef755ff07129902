"""`flopwise report` with in-run task scores: smoothing, Spearman monotonicity, seed groups, panels and table.

Run folders are written here directly (config.toml, plan.json, metrics.jsonl): the report reads nothing else,
and synthetic scores give known answers.  Expected numbers are computed here, not taken from flopwise.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import spearmanr

from flopwise.cli.report import cmd_report, register
from flopwise.config import config_to_toml, load_config
from flopwise.report import HTML_FILE, JSON_FILE, write_report
from flopwise.report.plots import build_figures
from flopwise.report.runs import load_runs
from flopwise.report.series import smooth, smoothing_span
from flopwise.report.tasks import TaskPoint, monotonicity, seed_groups, task_signals

STEPS = 40
MARKS = (0.25, 0.5, 0.75, 1.0)  # evaluation marks, as train.eval_every = 0.25 logs them
TOKENS_PER_STEP = 256


def debiased_ema(values: list[float], span: float) -> list[float]:
    """The bias-corrected EMA in closed form: sum_i (1 - b) b^(t - i) x_i / (1 - b^(t + 1))."""
    b = 1 - 2 / (span + 1)
    return [sum((1 - b) * b ** (t - i) * values[i] for i in range(t + 1)) / (1 - b ** (t + 1))
            for t in range(len(values))]


def task_event(step: int, scores: dict[str, float]) -> dict:
    """A tasks event as the trainer logs it: a choice task's full fields, ``gen*`` names as generation tasks."""
    tasks = {}
    for name, centered in scores.items():
        score = {"centered": centered, "low": centered - 0.05, "high": centered + 0.05, "random": 0.25, "n": 200}
        if name.startswith("gen"):
            score.update(exact_match=centered, random=0.0, metric="exact_match", kind="generate")
        else:
            accuracy = 0.25 + 0.75 * centered
            score.update(acc=accuracy, acc_norm=accuracy, acc_bytes=accuracy, metric="acc_bytes", kind="choice")
        tasks[name] = score
    return {"event": "tasks", "step": step, "p": step / STEPS, "tokens": float(step * TOKENS_PER_STEP),
            "flops": step * 1e6, "seconds": step * 0.01, "eval_seconds": 0.5, "tasks": tasks}


def write_run(folder: Path, seed: int = 0, lr: float = 0.01, tasks: dict[str, list[float]] | None = None,
              steps: int = STEPS) -> Path:
    """A run folder: config.toml as `flopwise train` writes it, train events each step, evals (and tasks events,
    ``tasks[name][k]`` at the k-th mark) at the evaluation marks up to ``steps``."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config_to_toml(load_config(values={"train.seed": seed, "optim.lr": lr})))
    (folder / "plan.json").write_text("{}")
    events = []
    for step in range(1, steps + 1):
        tokens = float(step * TOKENS_PER_STEP)
        events.append({"event": "train", "step": step, "p": step / STEPS, "tokens": tokens, "flops": step * 1e6,
                       "seconds": step * 0.01, "lr": lr, "loss": 5.0 / step**0.3 + 0.1 * (-1) ** step,
                       "throughput": 25600.0})
        if step / STEPS in MARKS:
            mark = MARKS.index(step / STEPS)
            events.append({"event": "eval", "step": step, "p": step / STEPS, "tokens": tokens, "flops": step * 1e6,
                           "seconds": step * 0.01, "val_loss": 5.0 / step**0.3, "val_bpb": 7.0 / step**0.3,
                           "domains": {"text": 5.0 / step**0.3}})
            if tasks:
                events.append(task_event(step, {name: scores[mark] for name, scores in tasks.items()}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    return folder


def points(scores: list[float]) -> list[TaskPoint]:
    return [TaskPoint(float(1000 * (i + 1)), score, None, None) for i, score in enumerate(scores)]


# ---------------------------------------------------------------- smoothing


def test_smoothing_keeps_a_constant_and_follows_a_step_as_the_formula_says():
    assert smooth([2.5] * 12, span=7.0) == pytest.approx([2.5] * 12)  # bias correction: no pull towards 0
    step = [0.0] * 5 + [1.0] * 5
    assert smooth(step, span=3.0) == pytest.approx(debiased_ema(step, 3.0))
    # beta = 0.5: after the step, 1 - 0.5^k of the way up (the 5 zeros' weight, debiased, is ~0.5^k too)
    assert smooth(step, span=3.0)[5] == pytest.approx(0.5 / (1 - 0.5**6))
    assert smooth([4.0, 1.0, 7.0], span=1.0) == [4.0, 1.0, 7.0]  # span 1: no smoothing
    # a gap (a diverged step) is left out of the average: [1, _, 3] averages 1 and 3 only
    assert smooth([1.0, None, math.nan, 3.0], span=3.0) == [1.0, None, None, pytest.approx((0.25 + 1.5) / 0.75)]


def test_smoothing_span_is_a_share_of_the_logged_points():
    assert smoothing_span(1) == smoothing_span(20) == 1.0
    assert smoothing_span(200) == pytest.approx(10.0) and smoothing_span(10_000) == pytest.approx(500.0)


# ---------------------------------------------------------------- monotonicity


def test_monotonicity_is_spearman_of_score_against_tokens():
    assert monotonicity(points([0.0, 0.1, 0.15, 0.4, 0.41])) == pytest.approx(1.0)
    assert monotonicity(points([0.4, 0.3, 0.2, 0.1])) == pytest.approx(-1.0)
    noisy = [0.02, 0.10, 0.05, 0.20, 0.18, 0.30]
    ranks = np.argsort(np.argsort(noisy))  # no ties: Spearman is Pearson on ranks
    expected = np.corrcoef(np.arange(len(noisy)), ranks)[0, 1]
    assert monotonicity(points(noisy)) == pytest.approx(expected)
    assert expected == pytest.approx(1 - 6 * 4 / (6 * 35))  # 1 - 6 sum d^2 / (n (n^2 - 1)), two swaps: sum d^2 = 4
    tied = [0.1, 0.1, 0.3, 0.2, 0.3]
    assert monotonicity(points(tied)) == pytest.approx(spearmanr(range(5), tied).statistic)  # ties: mean ranks


def test_monotonicity_is_undefined_under_three_points_or_for_a_constant_score():
    assert monotonicity(points([0.1, 0.2])) is None
    assert monotonicity(points([0.0, 0.0, 0.0, 0.0])) is None
    assert monotonicity([TaskPoint(5.0, s, None, None) for s in (0.1, 0.2, 0.3)]) is None  # one token count


# ---------------------------------------------------------------- seed groups and the signal table


def test_runs_differing_only_in_seed_are_grouped(tmp_path):
    a = write_run(tmp_path / "a", seed=0)
    b = write_run(tmp_path / "elsewhere" / "b", seed=1)
    other_lr = write_run(tmp_path / "c", seed=0, lr=0.003)
    d = write_run(tmp_path / "d", seed=7)
    groups = seed_groups(load_runs([a, other_lr, b, d]))
    assert [[run.name for run in group] for group in groups] == [["a", "b", "d"], ["c"]]


def test_signal_per_run_and_across_seeds(tmp_path):
    arc = ([0.00, 0.05, 0.10, 0.20], [0.02, 0.01, 0.12, 0.26], [0.10, 0.08, 0.06, 0.04])
    runs = [write_run(tmp_path / "s0", seed=0, tasks={"arc": arc[0], "gen_math": [0.0, 0.0, 0.0, 0.0]}),
            write_run(tmp_path / "s1", seed=1, tasks={"arc": arc[1], "gen_math": [0.0, 0.1, 0.1, 0.2]}),
            write_run(tmp_path / "lr", seed=0, lr=1e-3, tasks={"arc": arc[2]})]
    signals = task_signals(load_runs(runs))
    assert [(s.task, [r.run for r in s.runs]) for s in signals] == [
        ("arc", ["s0", "s1"]), ("arc", ["lr"]), ("gen_math", ["s0", "s1"])]
    seeds, alone, gen = signals
    rho_s1 = 1 - 6 * 2 / (4 * 15)  # ranks of [0.02, 0.01, 0.12, 0.26]: one swap, sum d^2 = 2
    assert [r.rho for r in seeds.runs] == pytest.approx([1.0, rho_s1])
    assert seeds.mean_rho == pytest.approx((1.0 + rho_s1) / 2)
    assert [r.final.centered for r in seeds.runs] == [0.20, 0.26] and seeds.runs[1].final.low == pytest.approx(0.21)
    assert seeds.spread == pytest.approx(math.sqrt(2 * 0.03**2 / 1))  # n - 1 = 1
    assert [r.seed for r in seeds.runs] == [0, 1] and [r.evaluations for r in seeds.runs] == [4, 4]
    assert alone.runs[0].rho == pytest.approx(-1.0) and alone.spread is None  # one seed: no spread
    assert gen.runs[0].rho is None and gen.runs[1].rho == pytest.approx(spearmanr(range(4), [0, .1, .1, .2])[0])
    assert gen.mean_rho == pytest.approx(gen.runs[1].rho)  # the constant score has no rho to average


def test_final_score_is_the_end_of_budget_one_or_the_latest(tmp_path):
    unfinished = write_run(tmp_path / "u", tasks={"arc": [0.1, 0.3, 0.2, 0.5]}, steps=25)  # marks 0.25, 0.5
    [signal] = task_signals(load_runs([unfinished]))
    assert signal.runs[0].final.centered == 0.3 and signal.runs[0].evaluations == 2 and signal.runs[0].rho is None


# ---------------------------------------------------------------- the page, report.json and the terminal


@pytest.fixture
def task_runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs" / "s0", seed=0, tasks={"arc": [0.0, 0.05, 0.1, 0.2], "gen": [0, 0, .1, .1]}),
            write_run(tmp_path / "runs" / "s1", seed=1, tasks={"arc": [0.02, 0.01, 0.12, 0.26]}),
            write_run(tmp_path / "runs" / "plain", seed=0, lr=1e-3)]


def test_task_panels_draw_each_runs_scores_with_chance(task_runs):
    figure = build_figures(load_runs(task_runs))["tasks_vs_tokens"]
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["arc", "gen"]
    for ax, task in zip(panels, ["arc", "gen"]):
        scored = [run for run in task_runs if task_of(run, task)]
        lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert [line.get_label() for line in lines] == [run.name for run in scored]
        for line, run in zip(lines, scored):
            assert list(line.get_xdata()) == [e["tokens"] for e in task_of(run, task)]
            assert list(line.get_ydata()) == [e["tasks"][task]["centered"] for e in task_of(run, task)]
        chance = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(chance) == 1 and list(chance[0].get_ydata()) == [0, 0]
        assert len(ax.collections) == len(scored)  # one interval band per run
        assert ax.get_xscale() == "log"
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["s0", "s1", "chance"]


def task_of(run: Path, task: str) -> list[dict]:
    """The run's tasks events that scored ``task``, read with plain json."""
    events = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [e for e in events if e["event"] == "tasks" and task in e["tasks"]]


def test_page_and_report_json_show_tasks_only_when_a_run_scored_them(task_runs, tmp_path):
    page = write_report(task_runs, tmp_path / "with").read_text()
    assert 'id="tasks_vs_tokens"' in page and page.count('src="data:image/png;base64,') == 6
    assert '<table class="signal">' in page and "Spearman ρ vs tokens" in page and "std of final over seeds" in page
    assert page.count("<tbody>") == 1 + 2  # the runs table, then arc (s0 + s1) and gen (s0)
    assert '<td rowspan="2">arc</td>' in page and "0.200 [0.150, 0.250]" in page
    data = json.loads((tmp_path / "with" / JSON_FILE).read_text())
    assert data["tasks"]["png"] == "tasks_vs_tokens.png" and (tmp_path / "with" / "tasks_vs_tokens.png").is_file()
    arc = data["tasks"]["panels"]["arc"]
    assert [line["run"] for line in arc] == ["s0", "s1"]
    assert arc[1]["y"] == [0.02, 0.01, 0.12, 0.26]
    assert arc[1]["x"] == [e["tokens"] for e in task_of(task_runs[1], "arc")]
    first = data["tasks"]["signal"][0]
    assert first["task"] == "arc" and first["spread"] == pytest.approx(math.sqrt(2 * 0.03**2))
    assert [run["rho"] for run in first["runs"]] == pytest.approx([1.0, 0.8])

    plain = task_runs[2:]
    page = write_report(plain, tmp_path / "without").read_text()
    assert "tasks_vs_tokens" not in page and 'class="signal"' not in page
    assert page.count('src="data:image/png;base64,') == 5
    assert json.loads((tmp_path / "without" / JSON_FILE).read_text())["tasks"] is None
    assert not (tmp_path / "without" / "tasks_vs_tokens.png").exists()


def test_command_prints_the_signal_table(task_runs, tmp_path):
    parser = argparse.ArgumentParser(prog="flopwise")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "rep"
    console = Console(file=io.StringIO(), width=160, record=True)
    assert cmd_report(parser.parse_args(["report", *map(str, task_runs), "--out", str(out)]), console) == 0
    text = console.export_text()
    assert "task signal quality" in text and "+1.00" in text and "+0.80" in text and "0.042" in text
    assert str(out / "tasks_vs_tokens.png") in text and (out / HTML_FILE).is_file()
    console = Console(file=io.StringIO(), width=160, record=True)
    assert cmd_report(parser.parse_args(["report", str(task_runs[2]), "--out", str(tmp_path / "plain")]), console) == 0
    assert "task signal quality" not in console.export_text() and "tasks_vs_tokens" not in console.export_text()
