"""Plans that need no probe (FLOP and token budgets, device profiles) and the losses a plan may state:
none from the prior, none at or above the data's unigram baseline.  Through the command where the
acceptance names it; nothing here trains or times anything."""

from __future__ import annotations

import json

import pytest

from flopwise.budget import Budget
from flopwise.cli import main
from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.model.flops import flops_per_token
from flopwise.plan.device_profile import PROFILES, load_profile
from flopwise.plan.planner import Speed, plan_run
from flopwise.scaling.law import CHINCHILLA_REFIT, ScalingLaw
from flopwise.scaling.law_file import PlanningLaw
from flopwise.scaling.shapes import family_shape
from tests.helpers import run_error
from tests.test_scaling import TABLE3


@pytest.fixture
def no_probe(monkeypatch):
    """Fail the test if anything times a step or builds a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a probe ran")

    monkeypatch.setattr("flopwise.plan.throughput.measure_step_seconds", refuse)
    monkeypatch.setattr("flopwise.runtime.measure_matmul_peak", refuse)
    monkeypatch.setattr("flopwise.model.gpt.GPT.__init__", refuse)


@pytest.mark.parametrize("params, flops, tokens", TABLE3[:3])
def test_a_flop_budget_plans_chinchillas_rows_without_a_probe(params, flops, tokens, no_probe, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--budget", f"{flops:g}flops", "--out", str(out)]) == 0
    chosen = json.loads(out.read_text())["chosen"]
    assert chosen["non_embedding"] == pytest.approx(params, rel=0.20)
    assert chosen["tokens"] == pytest.approx(tokens, rel=0.20)
    assert chosen["predicted_loss"] is None and chosen["step_seconds"] is None
    printed = capsys.readouterr().out
    assert "throughput: not needed" in printed and "compute-optimal allocation" in printed
    assert "predicted final held-out loss" not in printed


def test_a_token_budget_is_planned_as_the_compute_it_is_optimal_for():
    config = load_config(values={"budget.tokens": 20.2e9})
    plan = plan_run(config, 8192, PlanningLaw(CHINCHILLA_REFIT), "d")
    flops = CHINCHILLA_REFIT.compute_for_tokens(20.2e9)
    assert plan.budget["flops"] == pytest.approx(flops) and plan.budget["tokens"] == 20.2e9
    assert plan.chosen.non_embedding == pytest.approx(1e9, rel=0.20) and plan.chosen.tokens <= 20.2e9
    assert "a token budget alone does not bound the size" in plan.assumptions[0]


def test_a_fresh_seconds_plan_states_the_allocation_and_no_loss(monkeypatch, capsys):
    """`flopwise plan --budget 10m` with no scan: the prior sizes the run and predicts nothing."""
    monkeypatch.setattr("flopwise.plan.throughput.measure_step_seconds",
                        lambda cfg, config, device, dtype, **kw: 1e-3 + flops_per_token(cfg) * 2048 / 5e10)
    monkeypatch.setattr("flopwise.runtime.measure_matmul_peak", lambda *args, **kwargs: 1e11)
    assert main(["plan", "--budget", "10m"]) == 0
    printed = capsys.readouterr().out
    assert "loss: prior: no loss is predicted" in printed and "no loss predicted (prior" in printed
    assert "predicted loss" not in printed and "predicted final held-out loss" not in printed
    assert "throughput: measured" in printed and "tokens/N" in printed


def fitted(law: ScalingLaw, unigram: float) -> PlanningLaw:
    runs = [{"non_embedding": n, "tokens": 1e7, "unigram_loss": unigram} for n in (3e5, 8e5, 1.3e6)]
    return PlanningLaw(law, runs=runs)


def test_a_fitted_law_states_no_loss_at_or_above_the_unigram_baseline():
    config = load_config(values={"budget.flops": 1e13})
    below = plan_run(config, 4096, fitted(ScalingLaw(2.0, 8.0, 90.0, 0.35, 0.35, "t"), unigram=6.7), "d")
    assert below.loss_basis == "fitted" and below.chosen.predicted_loss == pytest.approx(below.chosen.law_loss)
    assert below.unigram_loss == 6.7 and "unigram baseline is 6.7000" in below.assumptions[0]
    above = plan_run(config, 4096, fitted(ScalingLaw(7.0, 8.0, 90.0, 0.35, 0.35, "t"), unigram=6.7), "d")
    assert above.chosen.predicted_loss is None and above.chosen.law_loss > 6.7 and above.interval is None
    assert "is not below the data's unigram baseline 6.70, so it is no prediction" in above.assumptions[0]


def test_a_device_profile_plans_seconds_from_declared_peaks(no_probe, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--budget", "2h", "--device-profile", "h100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("device profile 'h100': bf16 peak 989 TFLOP/s dense (declared by the vendor, not measured: NVIDIA H100 "
            "SXM5 datasheet), 80 GiB; assumed MFU 40%") in printed
    assert "memory: cap 80.00 GiB (the device profile's memory)" in printed
    plan = json.loads(out.read_text())
    chosen, config = plan["chosen"], load_config()
    shape = family_shape(config.model, chosen["d_model"], config.data.vocab_size)
    assert chosen["tokens"] == pytest.approx(7200 * 989e12 * 0.4 / flops_per_token(shape))
    assert plan["device"] == "h100"


def test_a_profile_file_replaces_the_peaks_and_bad_ones_are_refused(tmp_path):
    own = tmp_path / "cluster.toml"
    own.write_text('name = "our-a100"\nmfu = 0.25\nsource = "measured on our nodes"\ndeclared = false\n'
                   "[peak_flops]\nbf16 = 2e14\n")
    profile = load_profile(str(own))
    assert profile.mfu == 0.25 and profile.peak_for("bf16") == 2e14
    config = load_config(values={"budget.seconds": 3600})
    plan = plan_run(config, 8192, PlanningLaw(CHINCHILLA_REFIT), "here", Speed(profile=profile))
    assert "(measured: measured on our nodes)" in plan.assumptions[2] and "assumed MFU 25%" in plan.assumptions[2]
    with pytest.raises(FlopwiseError, match="declares no fp32 peak"):
        plan_run(load_config(values={"budget.seconds": 3600, "train.precision": "fp32"}), 8192,
                 PlanningLaw(CHINCHILLA_REFIT), "here", Speed(profile=profile))
    bad = tmp_path / "bad.toml"
    bad.write_text("[peak_flops]\nbf16 = -1\n")
    with pytest.raises(FlopwiseError, match=r"device profile '.*bad.toml': peak_flops: .*bf16 = -1"):
        load_profile(str(bad))
    bad.write_text("mfu = 2\n[peak_flops]\nbf16 = 1e14\n")
    with pytest.raises(FlopwiseError, match=r"bad.toml': mfu: Input should be less than or equal to 1"):
        load_profile(str(bad))
    with pytest.raises(FlopwiseError, match="neither a shipped profile"):
        load_profile("h1000")


def test_every_shipped_profile_is_labelled_declared_with_a_bf16_peak():
    for profile in PROFILES.values():
        assert profile.declared and "datasheet" in profile.source and profile.peak_for("bf16") > 1e14


def test_plan_errors_for_profiles_are_one_line(capsys):
    assert main(["plan", "--budget", "1h", "--device-profile", "tpu9"]) != 0
    err = capsys.readouterr().err
    assert "'tpu9' is neither a shipped profile (h100, h100-pcie, h200, a100, l4, mi300x)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, device, peak", [
    ([], "mi300x, the fastest device flopwise has a profile for", 2614.9e12),
    (["--device-profile", "l4"], "l4", 121e12),  # bf16, as a run on it computes
])
def test_plan_refuses_a_budget_no_device_could_spend_as_train_does(extra, device, peak, no_probe, capsys):
    """The check `train` refuses such a budget with, on the device the plan is for: the profile's, else the
    fastest there is a profile for (a FLOP plan is for any device), at its best speed."""
    years = 1e40 / peak / (365 * 86400)
    assert run_error(capsys, ["plan", "--budget", "1e40flops", *extra]) == (
        f"flopwise: error: the budget 1.00e+40 FLOPs would take at least {years:.3g} years on {device} ({peak:.3g} "
        "FLOP/s at best): give a smaller budget, or add a time limit to it (--budget <yours>,24h ends at whichever "
        "is reached first)")


def test_a_budget_from_the_config_is_suggested_as_a_budget_flag(no_probe, capsys):
    assert main(["plan", "--set", "budget.flops=1.21e20flops", "--set", "budget.steps=5e5steps"]) == 0
    suggested = capsys.readouterr().out.strip().splitlines()[-1]
    assert suggested == "run it: flopwise train --budget 1.21e+20flops,500000.0steps --auto"
    assert Budget.parse(suggested.split()[5]) == Budget(flops=1.21e20, steps=5e5)
