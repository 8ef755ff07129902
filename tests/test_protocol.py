"""The method protocol's promises: the loop names no method, the Python API runs and resumes a run, and
a run folder written with the keys from before the protocol still loads, evaluates and exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import flopwise
from flopwise.budget import Budget
from flopwise.cli import main
from flopwise.config import config_to_toml, load_run_config, upgrade_legacy_keys
from flopwise.methods.registry import METHODS
from flopwise.methods.section import legacy_keys, legacy_switches
from flopwise.rundir import read_metrics
from flopwise.train.display import ProgressDisplay
from tests.helpers import TINY, losses, train

TRAINER = Path(flopwise.__file__).parent / "train" / "trainer.py"


def test_the_training_loop_names_no_method():
    source = TRAINER.read_text(encoding="utf-8").lower()
    words = {method.name for method in METHODS} | {method.__name__.lower() for method in METHODS}
    words |= {"lisa", "lora", "galore", "sltrain", "salt", "teacher", "mixture", "curriculum", "reweight",
              "steps_in_backward"}
    found = sorted(word for word in words if re.search(rf"\b{re.escape(word)}\b", source))
    assert found == []


@pytest.mark.slow
def test_python_api_runs_and_resumes_like_the_cli(tmp_path, text_folder):
    overrides = [TINY[i + 1] for i, flag in enumerate(TINY) if flag == "--set"]
    config = flopwise.load_config(None, overrides, {"data.sources": [str(text_folder)], "data.tokenizer": "byte",
                                                    "budget.steps": 12})
    quiet = ProgressDisplay.quiet()
    summary = flopwise.run(config, tmp_path / "api", stop_after="5steps", display=quiet)
    assert not summary.finished and summary.meter.steps == 5
    summary = flopwise.resume(tmp_path / "api", display=quiet)
    assert summary.finished and summary.final_eval["loss"] > 0
    cli = tmp_path / "cli"
    assert train("--data", str(text_folder), "--budget", "12steps", *TINY, "--out", str(cli)) == 0
    assert losses(tmp_path / "api") == losses(cli)  # the same run, bit for bit
    extended = flopwise.resume(tmp_path / "api", budget=Budget(steps=24), display=quiet)
    assert extended.finished and extended.meter.steps == 24


def test_legacy_keys_move_to_their_methods():
    old = {"memory": {"limit": None, "methods": ["8bit", "galore"], "state_block": 128, "galore_rank": 16,
                      "lisa_layers": 3},
           "mixture": {"weights": {}, "online": "excess", "reference": "runs/ref", "eta": 0.5},
           "reweight": {"strategy": "none", "temperature": 0.3},
           "salt": {"teacher": None, "kd_weight": 0.5}}
    new = upgrade_legacy_keys(old)
    assert new["methods"]["use"] == ["8bit", "galore", "online_mixture"]
    assert new["methods"]["8bit"] == {"block": 128} and new["methods"]["galore"] == {"rank": 16}
    assert new["methods"]["online_mixture"] == {"rule": "excess", "reference": "runs/ref", "eta": 0.5}
    assert "lisa" not in new["methods"] and "reweight" not in new["methods"]  # methods that were off
    assert new["memory"] == {"limit": None} and not {"mixture", "reweight", "salt"} & set(new)
    assert all(key.count(".") == 1 for key in legacy_keys())


# The keys of config.toml files written before each method owned its section, as the table in flopwise/config.py
# held them until each method declared its own (``legacy_keys``, ``legacy_switch``).
OLD_KEYS = {"memory.methods": "methods.use", "memory.state_block": "methods.8bit.block",
            **{f"memory.galore_{key}": f"methods.galore.{key}" for key in ("rank", "update_gap", "scale")},
            **{f"memory.sltrain_{key}": f"methods.sltrain.{key}"
               for key in ("rank", "delta", "alpha", "refactor_every", "rewarmup")},
            "memory.lisa_layers": "methods.lisa.layers", "memory.lisa_interval": "methods.lisa.interval",
            "memory.lora_rank": "methods.lora.rank", "memory.lora_alpha": "methods.lora.alpha",
            "mixture.weights": "methods.mixture.weights", "mixture.online": "methods.online_mixture.rule",
            **{f"mixture.{key}": f"methods.online_mixture.{key}" for key in ("reference", "eta", "smoothing")},
            **{f"curriculum.{key}": f"methods.curriculum.{key}" for key in ("order", "pacing", "start", "full_at",
                                                                             "scorer")},
            **{f"reweight.{key}": f"methods.reweight.{key}" for key in ("strategy", "temperature", "delta", "burn_in")},
            **{f"salt.{key}": f"methods.salt.{key}" for key in ("teacher", "kd_weight", "kd_until", "temperature",
                                                               "select_pool")}}
OLD_SWITCHES = {"mixture.weights": ("mixture", {}), "mixture.online": ("online_mixture", "none"),
                "curriculum.order": ("curriculum", "none"), "reweight.strategy": ("reweight", "none"),
                "salt.teacher": ("salt", None)}


def test_the_methods_declare_every_legacy_key_the_old_table_held():
    assert legacy_keys() == OLD_KEYS
    assert legacy_switches() == OLD_SWITCHES


@pytest.mark.slow
def test_a_run_folder_with_the_old_keys_still_evaluates_samples_and_exports(tmp_path, text_folder, capsys):
    run = tmp_path / "old"
    assert train("--data", str(text_folder), "--budget", "6steps", *TINY, "--method", "8bit", "--reweight",
                 "--set", "methods.8bit.block=128", "--out", str(run)) == 0
    config = load_run_config(run)
    text = config_to_toml(config)
    old = (re.sub(r'\[methods\]\nuse = \["8bit", "reweight"\]\n(progressive = \w+\n)?', "", text)
           .replace("[memory]\n", '[memory]\nmethods = ["8bit"]\nstate_block = 128\n')
           .replace("[methods.reweight]\nstrategy = \"linupper\"", "[reweight]\nstrategy = \"linupper\""))
    old = re.sub(r"\n\[methods\.[^\]]+\]\n(?:[^\[\n][^\n]*\n)*", "\n", old)  # drop every other method section
    (run / "config.toml").write_text(old)
    assert "[methods" not in old and "state_block" in old
    upgraded = load_run_config(run)
    assert upgraded.methods.use == ["8bit", "reweight"] and upgraded.methods.__getattribute__("8bit").block == 128
    assert upgraded.methods.reweight.temperature == config.methods.reweight.temperature
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "all" in capsys.readouterr().out
    assert main(["sample", str(run), "--max-tokens", "5"]) == 0
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((run / "plan.json").read_text())["memory"]["methods"] == ["8bit"]
    # the training run's last event, its wall clock: eval, sample and export append none
    assert [e["event"] for e in read_metrics(run / "metrics.jsonl")][-1] == "wall"
