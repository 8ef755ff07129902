"""The planner in real (tiny) runs: the loss forecast in the log and across a resume, stopping
for a target, and scan -> fit -> plan -> train --auto through the CLI."""

from __future__ import annotations

import json

import pytest

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.plan.scan import PilotSize, Scan, ScanDesign
from flopwise.rundir import read_metrics
from flopwise.scaling.law_file import read_law
from flopwise.train.loss_curve import CurvePoint
from tests.helpers import TINY, FakeClock, train, width_step_seconds

pytestmark = pytest.mark.slow  # every test here reads real scans and runs, built once per module


PLANNING = ["--tokenizer", "byte", "--set", "model.seq_len=64", "--set", "optim.batch_size=4",
            "--set", "train.eval_tokens=2048"]
TOKENS_PER_STEP = 4 * 64
# Scans, plans and seconds-budgeted runs here read a fake clock (tests/helpers.py): a step of width d costs
# width_step_seconds, 5e-4 * d s, however fast or busy the machine is, so a 2 s pilot always takes the same
# steps.  The fixture's scan is given probe rates 1.25x what its pilots then achieve.
ACHIEVED = 0.8
PROBE_RATES = {d: TOKENS_PER_STEP / (5e-4 * d) / ACHIEVED for d in (64, 96)}


def forecasts(run) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "forecast"]


def test_forecasts_are_logged_and_repeat_exactly_after_a_resume(tmp_path, text_folder):
    args = [*TINY, "--data", str(text_folder), "--budget", "120steps"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    logged = forecasts(full)
    assert [round(e["p"], 2) for e in logged] == [round(0.1 * k, 2) for k in range(1, 10)]  # every 0.1 of the budget
    for event in logged:
        assert event["low"] <= event["predicted_loss"] <= event["high"]
    assert train(*args, "--stop-after", "53steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert forecasts(part) == logged  # rebuilt from metrics.jsonl: the same points, the same forecasts


def test_a_run_stops_when_the_forecast_cannot_reach_the_target(tmp_path, text_folder, capsys):
    run = tmp_path / "hopeless"
    assert train(*TINY, "--data", str(text_folder), "--budget", "200steps", "--target-loss", "0.05",
                 "--out", str(run)) == 0
    out = capsys.readouterr().out
    assert "cannot reach train.target_loss 0.05" in out and "--resume" in out
    steps = [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    assert steps[-1] < 200 and not (run / "final").exists()
    assert list((run / "checkpoints").iterdir())  # resumable, as after an interruption
    assert load_config(run / "config.toml").train.target_loss == 0.05


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory, text_folder):
    """A real scan of two sizes x three lengths (one run per size, extended twice)."""
    from rich.console import Console

    from flopwise.cli import build_parser
    from flopwise.cli.flags import config_from_args

    out = tmp_path_factory.mktemp("scan")
    args = build_parser().parse_args(["scan", "--budget", "60s", "--data", str(text_folder), *PLANNING])
    config = config_from_args(args)
    design = ScanDesign([PilotSize(d, 0, rate) for d, rate in PROBE_RATES.items()], unit_seconds=2.0)
    with pytest.MonkeyPatch.context() as patch:
        FakeClock(width_step_seconds).install(patch)
        Scan(config, out, design, 600, Console(quiet=True)).run("test-key")
    return out


def test_scan_extends_each_size_and_records_every_length(scan_folder):
    pilots = json.loads((scan_folder / "scan.json").read_text())["pilots"]
    assert [(p["d_model"], p["seconds_budget"]) for p in pilots] == [(64, 2.0), (96, 2.0), (64, 4.0), (96, 4.0),
                                                                    (64, 8.0), (96, 8.0)]
    for d_model in (64, 96):
        step = 5e-4 * d_model  # the fake clock's seconds per step
        mine = [p for p in pilots if p["d_model"] == d_model]
        for pilot in mine:  # each length lands on its budget to within a step: continued, not cut short
            assert pilot["tokens"] == pytest.approx(pilot["seconds_budget"] / step * TOKENS_PER_STEP,
                                                    abs=TOKENS_PER_STEP)
            assert pilot["tokens_per_second"] == pytest.approx(TOKENS_PER_STEP / step)
        losses = [p["val_loss"] for p in mine]
        assert losses[-1] < losses[0]
    assert sorted(run.name for run in (scan_folder / "runs").iterdir()) == ["d64", "d96"]  # none trained again
    law = read_law(scan_folder)
    assert len(law.runs) == 6 and len(law.bootstrap) > 100 and not law.is_prior
    assert law.throughput_ratio == pytest.approx(ACHIEVED)  # achieved tokens/s against the given probe rates


def test_a_pilot_that_ended_without_its_pinned_checkpoint_is_trained_again_at_the_next_length(
        tmp_path, text_folder, monkeypatch):
    """A step that runs past a short pilot's budget before its decay ends it without the checkpoint a longer
    pilot continues from (here a 0.6 s stall at step 20 of a 1 s pilot, as on a busy machine): the scan
    trains the next length from the start instead of failing."""
    from rich.console import Console

    from flopwise.cli import build_parser
    from flopwise.cli.flags import config_from_args
    from flopwise.plan.scan import has_extension_point

    clock = FakeClock(lambda model: 0.6 if clock.steps == 20 else width_step_seconds(model)).install(monkeypatch)
    config = config_from_args(build_parser().parse_args(["scan", "--budget", "60s", "--data", str(text_folder),
                                                         *PLANNING]))
    size = PilotSize(64, 0, PROBE_RATES[64])
    console = Console(record=True, width=400)
    scan = Scan(config, tmp_path / "scan", ScanDesign([size], unit_seconds=1.0), 600, console)
    runs = tmp_path / "scan" / "runs"
    assert scan._pilot(size, 1.0, None)
    # the stall spent the budget before the decay: one step of tail ends the schedule, with no checkpoint before it
    assert clock.steps == 21 and not has_extension_point(runs / "d64")
    assert scan._pilot(size, 2.0, 1.0)
    assert clock.steps - 21 == pytest.approx(2.0 / 0.032, abs=1)  # all 2 s of steps: trained from the start
    assert [p["name"] for p in scan.records] == ["d64-1s", "d64-2s"] and not scan.skipped
    assert scan.records[1]["tokens"] == pytest.approx(2.0 / 0.032 * TOKENS_PER_STEP, abs=TOKENS_PER_STEP)
    assert has_extension_point(runs / "d64") and (runs / "d64-1s" / "final").is_dir()  # the shorter one kept
    assert "the 1s pilot has no checkpoint from before its decay" in console.export_text()


def test_fit_plan_and_auto_train_use_the_scans_law(scan_folder, tmp_path, text_folder, capsys, monkeypatch):
    FakeClock(width_step_seconds).install(monkeypatch)  # the probes and the 8 s run: the same steps on any machine
    assert main(["fit", str(scan_folder), "--out", str(tmp_path / "law.json"), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "fitted on 6 runs" in out and "bootstrap" in out
    assert main(["plan", "--budget", "8s", "--law", str(tmp_path / "law.json"), "--data", str(text_folder),
                 *PLANNING, "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "predicted final held-out loss" in out and "assumptions:" in out and "throughput: measured" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    run = tmp_path / "auto"
    assert train("--budget", "8s", "--auto", "--law", str(tmp_path / "law.json"), "--data", str(text_folder),
                 *PLANNING, "--out", str(run)) == 0
    out = capsys.readouterr().out
    auto = json.loads((run / "plan.json").read_text())["auto_plan"]
    assert auto["chosen"]["d_model"] == json.loads((run / "plan.json").read_text())["model"]["d_model"]
    assert auto["chosen"]["d_model"] == plan["chosen"]["d_model"]  # the same plan: probes are cached
    assert "planned:" in out and "achieved:" in out
    assert "would train d_model" not in out  # --auto trains the plan: nothing to suggest
    plain = tmp_path / "plain"
    assert train("--budget", "8s", "--law", str(tmp_path / "law.json"), "--data", str(text_folder), *PLANNING,
                 "--set", "train.eval_every=0", "--out", str(plain)) == 0
    lines = capsys.readouterr().out.splitlines()
    chosen = plan["chosen"]
    assert lines[0].startswith(f"the law fitted for this data and device ({tmp_path / 'law.json'}) would train "
                               f"d_model {chosen['d_model']} x {chosen['n_layers']}")
    assert "add --auto to train the plan instead" in lines[1] or "this run's default shape is that plan" in lines[1]
    logged = forecasts(run)  # the planned size is within the law's range: its forecasts lean on the law too
    assert logged and all(0.0 < e["law_weight"] < 1.0 and e["law_loss"] > 0 for e in logged)
    assert all(e["predicted_loss"] == pytest.approx((1 - e["law_weight"]) * e["curve_loss"]
                                                    + e["law_weight"] * e["law_loss"]) for e in logged)


def test_plan_without_a_scan_says_its_law_is_a_prior(tmp_path, text_folder, capsys):
    assert main(["plan", "--budget", "20s", "--data", str(text_folder), *PLANNING]) == 0
    out = capsys.readouterr().out
    assert "prior from other data" in out and "Besiroglu" in out
    assert "loss: prior: no loss is predicted" in out and "predicted final held-out loss" not in out


@pytest.mark.parametrize("args, message", [
    (["plan", "--budget", "500steps"], "does not bound the model size"),
    (["scan", "--budget", "5M"], "give the scan's wall-clock time only"),
    (["scan", "--budget", "30s"], "give at least"),
    (["train", "--budget", "10s", "--auto", "--set", "model.d_model=128"], "model.d_model is set, but --auto"),
    (["fit", "nowhere"], "neither a flopwise run folder nor a scan folder"),
])
def test_planning_errors_are_one_clear_line(args, message, capsys, text_folder):
    assert main([*args, "--data", str(text_folder), *PLANNING] if args[0] != "fit" else args) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_fit_reads_run_folders_and_says_when_they_cannot_pin_a_law(scan_folder, tmp_path, capsys):
    runs = sorted((scan_folder / "runs").iterdir())  # two sizes, each extended to its longest length
    assert main(["fit", *map(str, runs)]) != 0
    assert "2 runs cannot pin 5 free parameters: give at least 6 runs" in capsys.readouterr().err
    assert main(["fit", str(runs[0])]) != 0
    assert "span 1 model size(s) and 1 token count(s)" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text("")
    assert main(["fit", str(unfinished)]) != 0
    assert "has not finished" in capsys.readouterr().err


def test_fit_fills_in_where_an_older_scans_curves_were_steepest(tmp_path, text_folder):
    """Scans written before pilots recorded it: each pilot is a prefix of its size's run folder, so the
    value is that folder's curve up to the pilot's tokens; a recorded value is kept. The run is
    step-budgeted, so how long its curve is does not depend on the machine's speed."""
    from flopwise.scaling.fitting import collect_records
    from flopwise.scaling.regime import MIN_WINDOW_POINTS, steepest_tokens

    scan = tmp_path / "old-scan"
    run = scan / "runs" / "d64"  # TINY's width
    assert train(*TINY, "--data", str(text_folder), "--budget", "160steps", "--out", str(run)) == 0
    points = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    ends = [points[MIN_WINDOW_POINTS - 2]["tokens"], points[len(points) // 2]["tokens"], points[-1]["tokens"]]
    pilots = [{"name": f"d64-{k}", "d_model": 64, "tokens": tokens} for k, tokens in enumerate(ends)]
    pilots.append({"name": "kept", "d_model": 64, "tokens": ends[-1], "steepest_tokens": 123.0})
    pilots.append({"name": "no-folder", "d_model": 96, "tokens": ends[-1]})
    (scan / "scan.json").write_text(json.dumps({"pilots": pilots}))

    schedule = load_config(run / "config.toml").schedule.build()
    expected = [steepest_tokens([CurvePoint(e["tokens"], e["loss"], e["p_lr"]) for e in points if e["tokens"] <= end],
                                schedule) for end in ends]
    assert expected[0] is None and expected[-1] is not None  # the shortest prefix is too short for a window
    filled = {p["name"]: p.get("steepest_tokens", "absent") for p in collect_records([scan])}
    assert filled == {"d64-0": expected[0], "d64-1": expected[1], "d64-2": expected[2], "kept": 123.0,
                      "no-folder": "absent"}


def scan_args(*extra: str, text_folder) -> list[str]:
    return ["scan", *extra, "--data", str(text_folder), *PLANNING]


def test_extend_adds_a_doubled_length_to_a_finished_scan_and_refits(scan_folder, tmp_path, text_folder, capsys,
                                                                   monkeypatch):
    """`scan --extend` continues each size from before its longest pilot's decay to twice that length, while
    the budget lasts, and refits on all pilots: the 2/4/8 s scan gets 16 s pilots; 32 s ones do not fit."""
    import shutil

    from flopwise.cli import build_parser
    from flopwise.cli.flags import config_from_args
    from flopwise.plan.throughput import ThroughputCache
    from flopwise.runtime import device_name
    from flopwise.scaling.law_file import cached_law_path, setup_key

    FakeClock(width_step_seconds).install(monkeypatch)  # the 40 s budget buys the same pilots on any machine
    scan = tmp_path / "scan"
    shutil.copytree(scan_folder, scan)
    config = config_from_args(build_parser().parse_args(scan_args("--budget", "40s", text_folder=text_folder)))
    throughput = ThroughputCache.for_config(config)
    key = setup_key(config, device_name(throughput.device))
    law = json.loads((scan / "law.json").read_text())
    (scan / "law.json").write_text(json.dumps(dict(law, key=key)))  # the fixture's scan was fitted under a test key
    before = json.loads((scan / "scan.json").read_text())

    assert main(scan_args("--extend", str(scan), "--budget", "40s", text_folder=text_folder)) == 0
    out = capsys.readouterr().out
    assert f"extending scan {scan}: lengths twice its longest (8s)" in out
    after = json.loads((scan / "scan.json").read_text())
    assert after["pilots"][:6] == before["pilots"]  # nothing rerun
    assert [(p["d_model"], p["seconds_budget"]) for p in after["pilots"][6:]] == [(64, 16.0), (96, 16.0)]
    assert after["design"]["lengths_seconds"] == [2.0, 4.0, 8.0, 16.0]
    # the next doubling did not fit: 2 x (16 - 0.8 * 8) s trained, then 32 - 0.8 * 16 + 8 s more is over 40 s
    assert [name.split(" (")[0] for name in after["skipped"] if name.endswith(", 32s")] == ["d_model 64", "d_model 96"]
    for d_model in (64, 96):
        eight, sixteen = (p for p in after["pilots"] if p["d_model"] == d_model and p["seconds_budget"] >= 8)
        assert sixteen["tokens"] == pytest.approx(2 * eight["tokens"], abs=2 * TOKENS_PER_STEP)  # to its budget
        assert load_config(scan / "runs" / f"d{d_model}" / "config.toml").budget.seconds == 16.0
    refitted = read_law(scan)
    assert {r["name"] for r in refitted.runs + refitted.early} == {p["name"] for p in after["pilots"]}
    assert read_law(cached_law_path(throughput.cache_dir, key)).to_dict() == refitted.to_dict()


@pytest.mark.parametrize("target, message", [
    ("nowhere", "no finished scan there (scan.json and law.json)"),
    ("fixture", "that scan was run with other data, recipe or device"),
])
def test_extend_refuses_what_is_not_a_scan_of_this_setup(scan_folder, target, message, text_folder, capsys):
    folder = scan_folder if target == "fixture" else target  # the fixture's law carries a test key
    before = (scan_folder / "scan.json").read_text()
    assert main(scan_args("--extend", str(folder), "--budget", "40s", text_folder=text_folder)) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (scan_folder / "scan.json").read_text() == before
