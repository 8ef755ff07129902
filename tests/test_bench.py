"""Recipes and the time-to-quality benchmark: the baseline recipe's architecture, the search over
budgets and the speedup arithmetic (with a stand-in trainer), and `flopwise bench` end to end."""

from __future__ import annotations

import json
import math

import pytest

import flopwise.benchmark as benchmark
from flopwise.benchmark import RunResult, SeedResult, TimeToQuality, summarize
from flopwise.cli import main
from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.model.flops import count_parameters
from flopwise.model.gpt import GPT
from flopwise.recipes import recipe_values
from tests.helpers import TINY


def test_baseline_recipe_is_nanogpt_gpt2():
    config = load_config(None, [], base=recipe_values("baseline"))
    cfg = config.model.build(vocab_size=100)
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("learned", "layer", "gelu", True, True)
    assert cfg.hidden == 4 * cfg.d_model
    assert (config.optim.name, config.optim.lr, config.optim.beta2) == ("adamw", 1e-3, 0.99)
    assert (config.schedule.name, config.schedule.final_lr_frac) == ("cosine", 0.1)
    assert config.methods.progressive is False  # one shape for the whole run, as nanoGPT trains
    model = GPT(cfg)
    assert model.embed_positions is not None and model.rope is None
    assert count_parameters(cfg)["total"] == model.num_parameters()
    # a config file and --set still apply on top of a recipe
    assert load_config(None, ["optim.lr=5e-4"], base=recipe_values("baseline")).optim.lr == 5e-4
    with pytest.raises(FlopwiseError, match="--recipe 'fast' is unknown"):
        recipe_values("fast")


def fake_trainer(losses: dict[float, float], calls: list[float]):
    def train_once(recipe, seconds, seed, sources, overrides, work):
        calls.append(seconds)
        return RunResult(recipe, seed, seconds, losses[seconds], 0.0, 0.0, 0.0)
    return train_once


def test_search_goes_down_from_t_over_3_until_the_target_is_missed(monkeypatch):
    losses = {120.0: 4.0, 40.0: 3.9, 30.0: 3.95, 24.0: 4.1}
    calls: list[float] = []
    monkeypatch.setattr(benchmark, "train_once", fake_trainer(losses, calls))
    result = TimeToQuality(seconds=120, seeds=(0,)).run(report=lambda line: None)[0]
    assert calls == [120.0, 40.0, 30.0, 24.0]  # baseline, then T/3, T/4 reached, T/5 missed
    assert result.target == 4.0 and result.best_divisor == 4
    # the crossing between T/5 (4.1) and T/4 (3.95), linear in log budget
    budget = math.exp(math.log(24) + (4.1 - 4.0) / (4.1 - 3.95) * (math.log(30) - math.log(24)))
    assert result.interpolated_speedup == pytest.approx(120 / budget)


def test_search_goes_up_when_t_over_3_misses(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(benchmark, "train_once", fake_trainer({90.0: 4.0, 30.0: 4.2, 45.0: 4.3}, calls))
    results = TimeToQuality(seconds=90, seeds=(0, 1)).run(report=lambda line: None)
    assert calls == [90.0, 30.0, 45.0] * 2  # T/2 misses too: no speedup
    summary = summarize(results)
    assert summary["median_speedup"] == 1.0 and summary["speedups"] == [1.0, 1.0]


def test_a_later_seed_starts_at_the_previous_seeds_answer(monkeypatch):
    calls: list[float] = []
    losses = {120.0: 4.0, 40.0: 3.8, 30.0: 3.85, 24.0: 3.9, 20.0: 3.95, 15.0: 4.1}
    monkeypatch.setattr(benchmark, "train_once", fake_trainer(losses, calls))
    results = TimeToQuality(seconds=120, seeds=(0, 1)).run(report=lambda line: None)
    assert calls == [120.0, 40.0, 30.0, 24.0, 20.0, 15.0,  # seed 0: T/3 down to T/8, which misses
                     120.0, 20.0, 15.0]  # seed 1 starts at seed 0's answer, T/6
    assert [r.best_divisor for r in results] == [6, 6]


def test_speedup_of_seeds_is_the_median():
    def seed(divisor_reached: int) -> SeedResult:
        base = RunResult("baseline", 0, 60.0, 4.0, 0, 0, 0)
        runs = [RunResult("default", 0, 60.0 / d, 3.9 if d <= divisor_reached else 4.2, 0, 0, 0) for d in (3, 4, 5)]
        return SeedResult(0, 4.0, base, runs)
    assert summarize([seed(3), seed(5), seed(4)])["median_speedup"] == 4.0


@pytest.mark.slow
def test_baseline_recipe_trains_and_exports_with_remote_code(tmp_path, text_folder, capsys):
    run = tmp_path / "gpt2"
    assert main(["train", "--recipe", "baseline", "--data", str(text_folder), "--budget", "10steps",
                 "--out", str(run), *TINY]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["model"]["positions"] == "learned" and plan["model"]["mlp"] == "gelu"
    assert main(["sample", str(run), "--max-tokens", "5"]) == 0
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0  # GPT-2's layout: no stock Llama class
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "flopwise"


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path, text_folder, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "--seconds", "6", "--seeds", "0", "--corpus", str(text_folder), "--out", str(out),
                 "--set", "model.size=tiny", "--set", "data.tokenizer=byte", "--set", "model.seq_len=64"]) == 0
    data = json.loads(out.read_text())
    seed = data["seeds"][0]
    assert seed["baseline"]["seconds_budget"] == 6 and seed["target"] == seed["baseline"]["val_loss"]
    assert seed["candidates"][0]["seconds_budget"] == 2  # the search starts at T/3
    assert data["median_speedup"] == seed["speedup"]
    assert "time to the baseline's held-out loss" in capsys.readouterr().out


def test_progressive_ablation_searches_each_variant_against_each_seeds_target(monkeypatch):
    seen: list[tuple[int, tuple[str, ...], float]] = []

    def train_once(recipe, seconds, seed, sources, overrides, work):
        seen.append((seed, tuple(overrides), seconds))
        grows = any("grow_depth" in value for value in overrides)  # growth reaches the target at T/4, others at T/3
        loss = 4.0 if recipe == "baseline" else (3.9 if seconds >= (30 if grows else 40) else 4.1)
        return RunResult(recipe, seed, seconds, loss, 0.0, 0.0, 0.0)

    monkeypatch.setattr(benchmark, "train_once", train_once)
    bench = TimeToQuality(seconds=120, seeds=(0, 1))
    rows = benchmark.ablate(bench, bench.run(report=lambda line: None), report=lambda line: None, which="progressive")
    assert [(r["variant"], r["seed"]) for r in rows] == [(name, seed) for seed in (0, 1)
                                                        for name in benchmark.ablations("progressive")]
    assert list(benchmark.ablations("progressive")) == ["grow_depth alone", "seq_schedule alone",
                                                        "batch_schedule alone", "all progressive methods",
                                                        "no progressive method"]  # from the registry
    speedups = {r["variant"]: r["speedup"] for r in rows if r["seed"] == 1}
    assert speedups["grow_depth alone"] == 4.0 and speedups["all progressive methods"] == 4.0
    assert speedups["batch_schedule alone"] == 3.0 and speedups["no progressive method"] == 3.0
    assert ((1, ('methods.use=["seq_schedule"]',), 40.0)) in seen


def test_bench_refuses_a_start_the_search_does_not_try(capsys):
    assert main(["bench", "--start", "7", "--seeds", "0"]) == 2
    assert "--start 7 is not a budget the search tries: choose one of 2, 3, 4" in capsys.readouterr().err


def test_speed_ablation_lists_each_piece_alone_and_removed_from_the_default():
    variants = benchmark.ablations("speed")
    everything_off = [value for _, off in benchmark.SPEED_PIECES.values() for value in off]
    for name, (on, off) in benchmark.SPEED_PIECES.items():
        assert variants[f"{name} alone"] == everything_off + on
        load_config(None, variants[f"{name} alone"])  # every override is a valid key and value
        assert (f"no {name}" in variants) == benchmark.in_default_recipe(on)
    assert variants["none of the speed pieces"] == everything_off
    assert benchmark.in_default_recipe(["model.size=small"]) and not benchmark.in_default_recipe(["model.size=tiny"])
