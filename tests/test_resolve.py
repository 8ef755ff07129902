"""The resolve stage (flopwise/resolve.py): what a config resolves to, once, before any data is read, and each
method's check run once per run."""

from __future__ import annotations

import collections

import pytest

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.methods.registry import METHODS
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder
from flopwise.resolve import resolve
from tests.helpers import TINY, train

DEFAULT_RUN = [arg for arg in TINY if arg != "methods.progressive=false"][:-1]  # TINY with progressive training


@pytest.fixture
def check_calls(monkeypatch) -> collections.Counter:
    """How often each method's ``check`` runs."""
    calls: collections.Counter = collections.Counter()
    for method in METHODS:
        original = method.check

        def counted(cls, config, run, world, original=original, name=method.name):
            calls[name] += 1
            return original(config, run, world)
        monkeypatch.setattr(method, "check", classmethod(counted))
    return calls


@pytest.mark.slow
def test_each_methods_check_runs_once_on_a_default_new_run(tmp_path, text_folder, check_calls):
    assert train(*DEFAULT_RUN, "--data", str(text_folder), "--budget", "4steps", "--out", str(tmp_path / "run")) == 0
    assert dict(check_calls) == {"grow_depth": 1, "seq_schedule": 1, "batch_schedule": 1}
    check_calls.clear()  # a run with a method of its own, and those a memory cap of 3.2 MB chooses
    assert train(*TINY, "--data", str(text_folder), "--budget", "4steps", "--reweight", "--memory", "3.2MB",
                 "--stop-after", "2steps", "--out", str(tmp_path / "own")) == 0
    assert dict(check_calls) == {"8bit": 1, "checkpointing": 1, "reweight": 1}
    check_calls.clear()  # a resume checks the methods against the processes it resumes on, once
    assert train("--resume", str(tmp_path / "own")) == 0
    assert dict(check_calls) == {"8bit": 1, "checkpointing": 1, "reweight": 1}


def test_resolve_adds_implied_default_and_memory_methods_once_and_says_why():
    config = load_config(None, ["data.sources=[\"a=./a:0.3\", \"b=./b:0.7\"]", "memory.limit=497MiB",
                                "model.size=tiny", "optim.batch_size=64"])
    resolved = resolve(config, World())
    assert resolved.methods[:1] == ["8bit"] and "mixture" in resolved.methods  # chosen for the cap; implied
    assert {"grow_depth", "seq_schedule", "batch_schedule"} <= set(resolved.methods)
    assert resolved.notes[0].startswith("progressive: ") and resolved.notes[1].startswith("memory cap ")
    assert resolve(resolved.config, World(), new=False).config == resolved.config  # a resume adds nothing
    assert resolved.config.methods.use == resolved.methods  # what config.toml records


def test_a_bpe_run_resolves_its_vocabulary_bound_until_the_tokenizer_is_trained(tmp_path):
    bpe = resolve(load_config(None, ["data.vocab_size=1000"]))
    assert not bpe.vocab_known and bpe.model.vocab_size == 1000
    byte = resolve(load_config(None, ["data.tokenizer=byte"]))
    assert byte.vocab_known and byte.model.vocab_size == 257
    assert byte.compute_dtype in ("fp32", "bf16") and resolve(load_config(None, ["train.precision=bf16"])
                                                              ).compute_dtype == "bf16"


def test_an_imported_model_gives_the_shape_and_the_tokenizer(tmp_path):
    folder = tmp_path / "hf"
    save_hf_folder(GPT(ModelConfig(vocab_size=257, d_model=48, n_layers=3, n_heads=3, seq_len=64)), byte_tokenizer(),
                   folder)
    resolved = resolve(load_config(None, [f"model.init_from={folder}", "model.seq_len=32"]), World())
    assert (resolved.model.d_model, resolved.model.n_layers, resolved.model.seq_len) == (48, 3, 32)
    assert resolved.config.data.tokenizer == str(folder)  # what config.toml records, so a resume reads it again
    assert "grow_depth" not in resolved.methods and "grow_depth left out" in resolved.notes[0]
    with pytest.raises(FlopwiseError, match="model.d_model cannot be set with --init-from"):
        resolve(load_config(None, [f"model.init_from={folder}", "model.d_model=64"]))
    # a method's check reads the imported shape: a QAT group that does not divide it is refused before any data
    with pytest.raises(FlopwiseError, match="methods.qat.group=32 does not divide .*d_model 48"):
        resolve(load_config(None, [f"model.init_from={folder}", 'methods.use=["qat"]']))


def test_a_stage_that_does_not_exist_and_a_split_batch_are_refused_in_one_line():
    with pytest.raises(FlopwiseError, match="posttrain.stage='rl2' is not a stage: choose one of pretrain, sft, dpo"):
        resolve(load_config(None, ["posttrain.stage=rl2"]))
    with pytest.raises(FlopwiseError, match="optim.batch_size=9 is the global batch and must split evenly over 2"):
        resolve(load_config(None, ["optim.batch_size=9", "methods.progressive=false"]), World(size=2)).rank_batch


def test_the_cli_refuses_conflicting_methods_before_reading_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--budget", "4steps", "--method", "lora",
                 "--method", "galore", "--out", str(tmp_path / "run")]) == 2
    assert "cannot combine 'galore' and 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_memory_shows_the_resolved_shape_and_leaves_the_choice_to_its_table(tmp_path, capsys):
    assert main(["memory", "--model", "tiny", "--memory", "1KiB"]) == 0  # nothing fits: said, not raised
    out = capsys.readouterr().out
    assert "planner: no memory-saving methods fit memory.limit" in out and "vocab 4,096" in out
