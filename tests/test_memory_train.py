"""Memory methods in real (tiny) training runs through the CLI: they train, resume exactly, export
dense models, and ``--memory`` picks them or refuses clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.methods.registry import MEMORY_METHODS
from flopwise.rundir import read_metrics
from tests.helpers import TINY, losses, train, train_events

# TINY without the shape and tokenizer, which an --init-from model brings
LOOP = ["--set", "model.seq_len=64", "--set", "optim.batch_size=4", "--set", "train.eval_tokens=2048",
        "--set", "train.log_every=1"]

# Short intervals so that each method's periodic action (GaLore's SVD refresh, SLTrain's
# refactorization and re-warmup, LISA's resampling) happens before and after the interruption.
METHOD_SETS: dict[str, tuple[list[str], list[str]]] = {  # name: (methods, further --set overrides)
    "galore-8bit-layerwise": (["galore", "8bit", "layerwise"],
                              ["optim.name=adamw", "methods.galore.update_gap=5", "methods.galore.rank=8"]),
    "sltrain": (["sltrain"], ["optim.name=adamw", "methods.sltrain.refactor_every=8", "methods.sltrain.rewarmup=3"]),
    "lisa-muon-8bit": (["lisa", "8bit"], ["methods.lisa.layers=1", "methods.lisa.interval=5"]),
    "checkpointing": (["checkpointing"], []),
    # bf16 weights: stochastic rounding's draws and Kahan's compensation buffers carry across the interruption
    "bf16-stochastic-muon": (["bf16_weights"], []),
    "bf16-kahan-8bit-adamw": (["bf16_weights", "8bit"], ["optim.name=adamw", "methods.bf16_weights.rounding=kahan"]),
}


def method_args(name: str) -> list[str]:
    methods, overrides = METHOD_SETS[name]
    return [arg for m in methods for arg in ("--method", m)] + [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_SETS))
def test_method_trains_and_resumes_exactly(tmp_path, text_folder, name):
    args = [*TINY, *method_args(name), "--data", str(text_folder), "--budget", "24steps"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    curve = [loss for _, loss in losses(full)]
    assert sum(curve[-4:]) / 4 < curve[0] - 0.3  # it learns
    assert train(*args, "--stop-after", "13steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)  # bit for bit across the interruption
    assert [e["lr"] for e in train_events(part)] == [e["lr"] for e in train_events(full)]
    assert load_config(full / "config.toml").methods.use == sorted(METHOD_SETS[name][0], key=MEMORY_METHODS.index)


@pytest.mark.slow
def test_sltrain_rewarmup_shows_in_the_logged_lr(tmp_path, text_folder):
    run = tmp_path / "sl"
    assert train(*TINY, *method_args("sltrain"), "--data", str(text_folder), "--budget", "24steps",
                 "--set", "schedule.warmup=0.0", "--out", str(run)) == 0
    lr = {e["step"]: e["lr"] for e in train_events(run)}
    peak = 1e-2
    # refactorized after steps 8 and 16: the LR restarts at 0.001 of the schedule's and is back after
    # sltrain_rewarmup=3 steps (Glentis et al. 2025's quick recovery)
    for start in (9, 17):
        assert [lr[s] / peak for s in range(start - 1, start + 3)] == pytest.approx([1, 0.001, 0.5005, 1])


@pytest.mark.slow
def test_sltrain_final_model_is_dense_and_evaluates_the_same(tmp_path, text_folder, capsys):
    run = tmp_path / "sl"
    assert train(*TINY, *method_args("sltrain"), "--data", str(text_folder), "--budget", "16steps",
                 "--out", str(run)) == 0
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    assert not any(name.endswith((".B", ".A", ".values")) for name in weights)
    final_eval = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"][-1]
    assert main(["eval", str(run), "--max-tokens", "8192"]) == 0  # the final evaluation's 4 x eval_tokens
    assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(final_eval["val_loss"], abs=1e-4)
    assert main(["eval", str(run), "--checkpoint"]) == 0  # the factorized checkpoint loads too


@pytest.mark.slow
def test_lora_finetunes_an_imported_model_and_merges_on_export(tmp_path, text_folder):
    base = tmp_path / "base"
    assert train(*TINY, "--data", str(text_folder), "--budget", "10steps", "--out", str(base)) == 0
    tuned = tmp_path / "tuned"
    assert train(*LOOP, "--init-from", str(base / "final"), "--method", "lora",
                 "--set", "methods.lora.rank=2", "--set", "optim.name=adamw", "--data", str(text_folder),
                 "--budget", "12steps", "--out", str(tuned)) == 0
    before = load_file(str(base / "final" / "model.safetensors"))
    after = load_file(str(tuned / "final" / "model.safetensors"))
    assert set(before) == set(after)  # merged: the same plain tensors, no LoRA factors
    for name, weight in before.items():
        delta = after[name] - weight
        if name.endswith("_proj.weight"):  # each block matrix moved by a rank-2 update
            assert delta.abs().max() > 0
            assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 2
        else:  # embeddings and norms stay frozen
            assert torch.equal(delta, torch.zeros_like(delta))


def test_memory_cap_picks_methods_and_says_why(tmp_path, text_folder, capsys):
    from flopwise.methods.choose import estimate_for

    cfg = load_config(None, ["model.size=tiny", "model.seq_len=64", "optim.batch_size=4"])
    model_cfg = cfg.model.build(257)
    full = estimate_for(model_cfg, 4, [], cfg.methods, cfg.optim.name).peak
    int8 = estimate_for(model_cfg, 4, ["8bit"], cfg.methods, cfg.optim.name).peak
    cap = (full + int8) / 2  # full precision does not fit, 8-bit states do
    run = tmp_path / "capped"
    assert train(*TINY, "--data", str(text_folder), "--budget", "6steps", "--memory", str(int(cap)),
                 "--out", str(run)) == 0
    assert load_config(run / "config.toml").methods.use == ["8bit"]  # the resolved config records the choice
    assert "8bit" in capsys.readouterr().out


def test_memory_cap_that_nothing_fits_fails_in_one_line(tmp_path, text_folder, capsys):
    run = tmp_path / "never"
    assert train(*TINY, "--data", str(text_folder), "--budget", "6steps", "--memory", "1KiB",
                 "--out", str(run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory" in err and "1.0 KiB" in err
    assert not run.exists()


def test_layerwise_refuses_gradient_accumulation(tmp_path, text_folder, capsys):
    run = tmp_path / "acc"
    assert train(*TINY, "--data", str(text_folder), "--budget", "6steps", "--method", "layerwise",
                 "--set", "optim.grad_accum=2", "--out", str(run)) == 2
    err = capsys.readouterr().err
    assert "optim.grad_accum=1" in err and not run.exists()


def test_lora_without_a_model_to_adapt_is_refused(tmp_path, text_folder, capsys):
    assert train(*TINY, "--data", str(text_folder), "--budget", "6steps", "--method", "lora",
                 "--out", str(tmp_path / "l")) == 2
    assert "--init-from" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()


def test_galore_with_muon_is_refused(tmp_path, text_folder, capsys):
    assert train(*TINY, "--data", str(text_folder), "--budget", "6steps", "--method", "galore",
                 "--out", str(tmp_path / "g")) == 2
    assert "optim.name=adamw" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("methods, parallel, phrase", [
    (["layerwise"], "ddp", "runs in one process only"),
    (["lisa"], "ddp", "runs in one process only"),
    (["galore"], "fsdp", "not supported with --parallel fsdp"),
    (["8bit"], "fsdp", "not supported with --parallel fsdp"),
])
def test_methods_refused_under_torchrun_name_the_method(methods, parallel, phrase):
    from flopwise.errors import FlopwiseError
    from flopwise.methods.base import World
    from flopwise.resolve import resolve

    config = load_config(None, [f"train.parallel={parallel}", "optim.name=adamw"], {"methods.use": methods})
    resolve(config, World(1, parallel))  # one process: fine
    with pytest.raises(FlopwiseError, match=f"methods.use '{methods[0]}' .*{phrase}"):
        resolve(config, World(2, parallel))
    if parallel == "fsdp":
        resolve(config, World(2, "ddp"))  # DDP keeps whole matrices: fine
