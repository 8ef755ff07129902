"""Hugging Face in and out: transformers loads flopwise's export with equal logits and greedy
generations, and flopwise continues pretraining a Llama-family folder built here from a LlamaConfig."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import resolve_hf_source, save_hf_folder
from tests.helpers import load_hf_model, run_error, train_bpe_run

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; nothing may reach the network

TEXT = "def greet(name):\n    return f'Hello, {name}!'  # The quick brown fox."


def perturbed(model: GPT) -> GPT:
    """Norm gains moved off 1, so a mix-up of norms would show in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def assert_same_as_transformers(model: GPT, folder: Path, ids: list[int]) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = x[:, :6]
    greedy_ours = model.generate(prompt, 24, temperature=0)
    greedy_theirs = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                pad_token_id=model.config.vocab_size - 1)
    assert greedy_ours.tolist() == greedy_theirs.tolist()


@pytest.mark.parametrize("shape,architecture", [
    ({}, "LlamaForCausalLM"),
    ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ({"qk_norm": True, "head_size": 12, "n_kv_heads": 1}, "Qwen3ForCausalLM"),
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, shape, architecture):
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=48, n_layers=2, n_heads=4, seq_len=64, **shape)
    model = perturbed(GPT(cfg))
    save_hf_folder(model, tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    assert_same_as_transformers(model, tmp_path / "hf", tokenizer.encode_batch([TEXT])[0][:64])
    reloaded = load_hf_model(tmp_path / "hf", seq_len=64)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, text_folder) -> Path:
    """A real run with a BPE tokenizer trained on the test texts."""
    return train_bpe_run(tmp_path_factory.mktemp("hf") / "run", text_folder, "model.qk_norm=true")


def test_exported_run_matches_in_transformers_with_its_tokenizer(trained_run, tmp_path):
    from flopwise.evaluate.load import load_final_model

    assert main(["export", str(trained_run), "--to", str(tmp_path / "out")]) == 0
    model, tokenizer = load_final_model(trained_run, torch.device("cpu"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode_batch([TEXT])[0]
    assert hf_tokenizer.decode(ids) == TEXT == tokenizer.decode(ids)
    assert hf_tokenizer.eos_token == "<|endoftext|>"
    assert_same_as_transformers(model, tmp_path / "out", ids[:64])
    # the run's own final/ folder is the same export
    assert load_file(str(trained_run / "final" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "out" / "model.safetensors")).keys()


def test_export_refuses_a_nonempty_target(trained_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", str(trained_run), "--to", str(tmp_path / "full")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def llama_folder(path: Path, **overrides) -> Path:
    """A small random LlamaForCausalLM and a byte-level tokenizer saved the way transformers saves them."""
    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id, **overrides)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=None, tokenizer_object=tokenizer._tokenizer,
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def test_init_from_continues_pretraining_and_round_trips(tmp_path, text_folder):
    source = llama_folder(tmp_path / "llama")
    imported = load_hf_model(source, seq_len=64)
    save_hf_folder(imported, byte_tokenizer(), tmp_path / "again")
    original = load_file(str(source / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)

    run = tmp_path / "run"  # a near-zero learning rate: the exported weights must be the imported ones
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "2steps", "--out",
                 str(run), "--set", "model.seq_len=64", "--set", "optim.batch_size=2", "--set", "optim.lr=1e-12",
                 "--set", "optim.muon_lr=1e-12",
                 "--set", "train.eval_tokens=512"]) == 0
    trained = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.allclose(trained[k], original[k], atol=1e-9) for k in original)
    assert json.loads((run / "plan.json").read_text())["model"]["max_positions"] == 128
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.max_position_embeddings == 128

    onward = tmp_path / "onward"  # a finished run's folder stands for its final/, as sft's --init-from reads it
    assert main(["train", "--init-from", str(run), "--data", str(text_folder), "--budget", "1steps", "--out",
                 str(onward), "--set", "model.seq_len=64", "--set", "optim.batch_size=2", "--set", "optim.lr=1e-12",
                 "--set", "optim.muon_lr=1e-12", "--set", "train.eval_tokens=512"]) == 0
    continued = load_file(str(onward / "final" / "model.safetensors"))
    assert all(torch.allclose(continued[k], trained[k], atol=1e-9) for k in trained)

    learning = tmp_path / "learning"  # and with a real learning rate it learns from the imported start
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "15steps", "--out",
                 str(learning), "--set", "model.seq_len=64", "--set", "optim.batch_size=4",
                 "--set", "train.eval_tokens=512", "--set", "train.log_every=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (learning / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "train"]
    assert losses[0] == pytest.approx(float(torch.log(torch.tensor(257.0))), abs=0.3)  # random Llama init
    assert losses[-1] < losses[0] - 0.5


def test_init_from_a_hub_cache_snapshot(tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the local hub cache, offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    llama_folder(snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_hf_source("tiny-org/tiny-llama") == snapshot
    with pytest.raises(FlopwiseError, match="as a hub id neither the Hugging Face hub nor its cache has it"):
        resolve_hf_source("tiny-org/absent")


@pytest.mark.parametrize("change,message", [
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling='linear' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_architectures_are_refused_by_name(tmp_path, text_folder, capsys, change, message):
    source = llama_folder(tmp_path / "m")
    config = json.loads((source / "config.json").read_text())
    config.update(change)
    if "rope_parameters" in config and "rope_scaling" in change:
        config["rope_parameters"] = dict(change["rope_scaling"], rope_theta=10000.0)
    (source / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' own save progress
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "2steps",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_init_from_refuses_pickles_and_shape_overrides(tmp_path, text_folder, capsys):
    source = llama_folder(tmp_path / "m")
    capsys.readouterr()
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "2steps",
                 "--set", "model.d_model=64", "--out", str(tmp_path / "r")]) == 2
    assert "model.d_model cannot be set with --init-from" in capsys.readouterr().err
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "2steps",
                 "--out", str(tmp_path / "r")]) == 2
    assert "never pickled .bin files" in capsys.readouterr().err


def test_init_from_a_run_without_a_final_model_is_one_line(tmp_path, text_folder, capsys):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.toml").write_text("", encoding="utf-8")
    err = run_error(capsys, ["train", "--init-from", str(tmp_path / "unfinished"), "--data", str(text_folder),
                             "--budget", "2steps", "--out", str(tmp_path / "run")])
    assert "is a run without a final model: finish it first" in err


def test_init_from_a_truncated_weights_file_is_one_line(tmp_path, text_folder, capsys):
    source = llama_folder(tmp_path / "m")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["train", "--init-from", str(source), "--data", str(text_folder), "--budget", "2steps",
                 "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (f"flopwise: error: '{weights}' is damaged (incomplete metadata, file not fully "
                                       "covered): copy or download the model folder again\n")
    assert not (tmp_path / "r").exists()
