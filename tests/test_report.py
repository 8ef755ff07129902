"""`flopwise report` on real (tiny) runs: plots, report.json and table match metrics.jsonl; the page opens."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from flopwise.cli import main
from flopwise.cli.report import cmd_report, register
from flopwise.errors import FlopwiseError
from flopwise.report import HTML_FILE, JSON_FILE, write_report
from flopwise.report.plots import build_figures
from flopwise.report.runs import load_runs
from flopwise.report.table import final_table
from flopwise.rundir import read_metrics
from tests.helpers import TINY, headless_chromium, watch_page_problems

# plot name -> (events, x field, y field, x scale): written out here, not taken from flopwise.report.series
EXPECTED_PLOTS = {
    "loss_vs_flops": ("eval", "flops", "val_loss", "log"),
    "loss_vs_seconds": ("eval", "seconds", "val_loss", "linear"),
    "loss_vs_tokens": ("eval", "tokens", "val_loss", "log"),
    "lr_vs_progress": ("train", "p", "lr", "linear"),
    "throughput_vs_progress": ("train", "p", "throughput", "linear"),
}
SMOOTHED_PLOTS = ("loss_vs_flops", "loss_vs_seconds", "loss_vs_tokens")  # + the training loss, smoothed
SMOOTHED_LABEL = "training loss (smoothed)"
def events(run: Path, kind: str) -> list[dict]:
    """metrics.jsonl read here with plain json, independently of flopwise."""
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def smoothed_loss(run: Path) -> list[float]:
    """The run's training loss, smoothed as the report says: a bias-corrected EMA of span 5% of the points
    (at least 1), here in closed form: sum_i (1 - b) b^(t - i) x_i / (1 - b^(t + 1)), b = 1 - 2 / (span + 1)."""
    losses = [e["loss"] for e in events(run, "train")]
    b = 1 - 2 / (max(1.0, 0.05 * len(losses)) + 1)
    return [sum((1 - b) * b ** (t - i) * losses[i] for i in range(t + 1)) / (1 - b ** (t + 1))
            for t in range(len(losses))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_folder) -> list[Path]:
    """Two real runs: 30 steps at the default peak LR, 20 steps at 1e-3."""
    base = tmp_path_factory.mktemp("report_runs")
    a, b = base / "a", base / "b"
    assert main(["train", "--data", str(text_folder), "--budget", "30steps", "--out", str(a), *TINY]) == 0
    assert main(["train", "--data", str(text_folder), "--budget", "20steps", "--set", "optim.lr=1e-3",
                 "--out", str(b), *TINY]) == 0
    return [a, b]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return write_report(runs, tmp_path_factory.mktemp("report") / "out")


def test_report_modules_import_neither_torch_nor_matplotlib_early():
    """Reading runs needs no torch; registering the command loads no matplotlib (fast `flopwise --help`)."""
    code = ("import sys, flopwise.report.runs, flopwise.cli.report; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'matplotlib' not in sys.modules, 'matplotlib'")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_each_plot_has_one_line_per_run_holding_its_metrics(runs):
    figures = build_figures(load_runs(runs))
    assert sorted(figures) == sorted(EXPECTED_PLOTS)
    for name, (kind, x, y, scale) in EXPECTED_PLOTS.items():
        ax = figures[name].axes[0]
        lines = ax.get_lines()
        smoothed = [f"a: {SMOOTHED_LABEL}", f"b: {SMOOTHED_LABEL}"] if name in SMOOTHED_PLOTS else []
        assert [line.get_label() for line in lines] == [*smoothed, "a", "b"], name
        for line, run in zip(lines[len(smoothed):], runs):
            assert list(map(float, line.get_xdata())) == [e[x] for e in events(run, kind)], (name, run.name)
            assert list(map(float, line.get_ydata())) == [e[y] for e in events(run, kind)], (name, run.name)
        for line, held_out, run in zip(lines[:len(smoothed)], lines[len(smoothed):], runs):
            assert list(map(float, line.get_xdata())) == [e[x] for e in events(run, "train")], (name, run.name)
            assert list(map(float, line.get_ydata())) == pytest.approx(smoothed_loss(run)), (name, run.name)
            assert line.get_color() == held_out.get_color() and line.get_linewidth() < held_out.get_linewidth()
        assert ax.get_xscale() == scale
        legend = ["a", "b", SMOOTHED_LABEL] if smoothed else ["a", "b"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == legend
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_report_json_holds_the_metrics_behind_every_plot(runs, report):
    out = report.parent
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [HTML_FILE, JSON_FILE, *[f"{name}.png" for name in EXPECTED_PLOTS]])  # no temporary files left
    for name in EXPECTED_PLOTS:
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    data = json.loads((out / JSON_FILE).read_text())
    assert sorted(data["plots"]) == sorted(EXPECTED_PLOTS)
    for name, (kind, x, y, scale) in EXPECTED_PLOTS.items():
        plot = data["plots"][name]
        assert plot["png"] == f"{name}.png" and plot["x_scale"] == scale
        assert [line["run"] for line in plot["lines"]] == ["a", "b"]
        for line, run in zip(plot["lines"], runs):
            assert line["x"] == [e[x] for e in events(run, kind)]
            assert line["y"] == [e[y] for e in events(run, kind)]
        assert ("smoothed" in plot) == (name in SMOOTHED_PLOTS)
        for line, run in zip(plot.get("smoothed", {}).get("lines", []), runs):
            assert line["run"] == run.name and line["x"] == [e[x] for e in events(run, "train")]
            assert line["y"] == pytest.approx(smoothed_loss(run))
    assert data["tasks"] is None  # no run scored tasks during training


def test_final_figures_are_the_last_evaluation_and_the_meter_totals(runs, report):
    data = json.loads((report.parent / JSON_FILE).read_text())
    loaded = load_runs(runs)
    table = final_table(loaded)
    column = {header: index for index, header in enumerate(table.headers)}
    for run, steps, entry, row in zip(runs, (30, 20), data["runs"], table.rows):
        last_eval, last_train = events(run, "eval")[-1], events(run, "train")[-1]
        plan = json.loads((run / "plan.json").read_text())
        assert last_eval["p"] == 1.0
        final = entry["final"]
        assert entry["name"] == run.name and entry["finished"] is True
        assert final["loss"] == last_eval["val_loss"] and final["bpb"] == last_eval["val_bpb"]
        assert final["domains"] == last_eval["domains"]
        assert final["steps"] == steps and final["tokens"] == steps * 4 * 64 == last_train["tokens"]
        assert final["flops"] == last_train["flops"] == steps * plan["flops_per_step"]
        assert final["seconds"] == last_train["seconds"]
        assert final["throughput"] == pytest.approx(last_train["tokens"] / last_train["seconds"])
        assert final["parameters"] == plan["parameters"]["total"]
        assert row[column["held-out loss"]] == f"{last_eval['val_loss']:.4f}"
        assert row[column["bits/byte"]] == f"{last_eval['val_bpb']:.4f}"
        assert row[column["status"]] == "finished"
        for domain, loss in last_eval["domains"].items():
            assert row[column[f"{domain} loss"]] == f"{loss:.4f}"
    assert [entry["final"]["peak_lr"] for entry in data["runs"]] == [1e-2, 1e-3]


def test_command_prints_the_table_and_the_files_written(runs, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser(prog="flopwise")
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["report", "x"]).out == Path("report")
    out = tmp_path / "rep"
    args = parser.parse_args(["report", *map(str, runs), "--out", str(out)])
    console = Console(file=io.StringIO(), width=100, record=True)
    assert cmd_report(args, console) == 0
    text = console.export_text()
    for run in runs:
        assert f"{events(run, 'eval')[-1]['val_loss']:.4f}" in text
    assert "…" not in text  # no number cut short in an 100-column terminal
    assert str(out / HTML_FILE) in text and str(out / JSON_FILE) in text
    assert (out / HTML_FILE).is_file()
    help_text = io.StringIO()
    monkeypatch.setattr(sys, "stdout", help_text)
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--help"])
    assert "flopwise report runs/a runs/b" in help_text.getvalue() and "./report" in help_text.getvalue()


def copy_run(source: Path, target: Path, up_to_step: int | None = None) -> Path:
    """A run folder's readable files; with ``up_to_step``, metrics cut there and no final/ (unfinished)."""
    target.mkdir(parents=True)
    for name in ("config.toml", "plan.json"):
        shutil.copy(source / name, target / name)
    kept = [line for line in (source / "metrics.jsonl").read_text().splitlines()
            if up_to_step is None or json.loads(line)["step"] <= up_to_step]
    (target / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    if up_to_step is None:
        (target / "final").mkdir()
    return target


def test_unfinished_runs_equal_names_and_odd_names(runs, tmp_path):
    finished = copy_run(runs[0], tmp_path / "one" / "run")
    unfinished = copy_run(runs[0], tmp_path / "two" / "run", up_to_step=15)
    odd = copy_run(runs[1], tmp_path / '<i>&"b')
    with (odd / "metrics.jsonl").open("a") as handle:  # a diverged evaluation: NaN loss
        handle.write(json.dumps({**events(runs[1], "eval")[-1], "val_loss": math.nan}) + "\n")
    html_path = write_report([finished, unfinished, odd, finished], tmp_path / "out")
    loaded = load_runs([finished, unfinished, odd])
    assert [run.name for run in loaded] == ["one/run", "two/run", '<i>&"b']
    table = final_table(loaded)
    status = table.headers.index("status")
    assert [row[status] for row in table.rows] == ["finished", "unfinished, p=0.50", "finished"]
    assert loaded[1].final.loss == events(unfinished, "eval")[-1]["val_loss"]
    assert loaded[1].final.steps == 15
    data = json.loads((tmp_path / "out" / JSON_FILE).read_text(),
                      parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert [run["name"] for run in data["runs"]] == ["one/run", "two/run", '<i>&"b']  # given twice, listed once
    assert data["runs"][2]["final"]["loss"] is None
    page = html_path.read_text()
    assert "&lt;i&gt;&amp;&quot;b" in page and '<i>&"b' not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == len(EXPECTED_PLOTS)


def test_folders_that_are_not_runs_name_the_folder_and_write_nothing(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_metrics = copy_run(runs[0], tmp_path / "no_metrics")
    (no_metrics / "metrics.jsonl").unlink()
    only_eval = copy_run(runs[0], tmp_path / "only_eval")
    (only_eval / "metrics.jsonl").write_text(json.dumps(events(runs[0], "eval")[0]) + "\n")
    no_plan = copy_run(runs[0], tmp_path / "no_plan")
    (no_plan / "plan.json").unlink()
    cases = [(tmp_path / "missing", "is not a folder"), (empty, "is not a flopwise run folder"),
             (no_metrics, "no training metrics"), (only_eval, "no training metrics"), (no_plan, "no plan.json")]
    out = tmp_path / "out"
    for folder, expected in cases:
        with pytest.raises(FlopwiseError) as error:
            write_report([runs[0], folder], out)
        message = str(error.value)
        assert expected in message and str(folder) in message and "\n" not in message
        assert not out.exists()
    with pytest.raises(FlopwiseError, match="no run folders"):
        write_report([], out)


def test_read_metrics_skips_damaged_lines_naming_them_and_a_cut_last_line_quietly(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"event": "train", "step": 1}\n'
                     b'\xff\xfe{"event": "train", "step": 2}\n'  # not UTF-8
                     b'{"event": "train", "st\n'  # broken JSON
                     b'\n'  # an empty line is no event, and no damage
                     b'[1, 2]\n'  # JSON, but no event
                     b'{"event": "eval", "step": 3}\n'
                     b'{"event": "train", "step": 4, "lo')  # cut short by a crash: expected
    assert read_metrics(path) == [{"event": "train", "step": 1}, {"event": "eval", "step": 3}]
    assert capsys.readouterr().err == (f"flopwise: warning: '{path}' lines 2, 3, 5: not a JSON event in UTF-8 "
                                       "(the file is damaged): skipped\n")
    path.write_bytes(b"\n".join([b"\xff"] * 5) + b"\n")
    assert read_metrics(path) == []
    assert "lines 1, 2, 3 and 2 more: not a JSON event" in capsys.readouterr().err
    path.write_bytes(b'{"event": "train", "step": 1}\n{"event": "tr')
    assert read_metrics(path) == [{"event": "train", "step": 1}] and capsys.readouterr().err == ""


def test_report_reads_a_metrics_file_with_a_damaged_line(runs, tmp_path, capsys):
    damaged = copy_run(runs[0], tmp_path / "damaged")
    lines = (damaged / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (damaged / "metrics.jsonl").write_bytes(b"".join([*lines[:2], b"\xff\xfe\x00 garbage\n", *lines[2:]]))
    capsys.readouterr()
    assert main(["report", str(damaged), "--out", str(tmp_path / "out")]) == 0
    assert (f"flopwise: warning: '{damaged / 'metrics.jsonl'}' line 3: not a JSON event in UTF-8"
            in capsys.readouterr().err)
    loaded = load_runs([damaged])[0]
    assert loaded.trains == events(runs[0], "train") and loaded.evals == events(runs[0], "eval")


def test_report_page_loads_in_headless_chromium_without_errors(report):
    problems: list[str] = []
    with headless_chromium() as browser:
        page = browser.new_page()
        watch_page_problems(page, problems)
        page.goto(report.resolve().as_uri(), wait_until="load")
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        rows = page.locator("table.runs tbody tr").all_inner_texts()
    assert problems == []
    assert len(images) == len(EXPECTED_PLOTS) and all(done and width > 0 for done, width in images)
    assert len(rows) == 2 and rows[0].split()[0] == "a" and rows[1].split()[0] == "b"
