"""A budget on the model's size (``--budget 30steps,200kB``): the byte term's parsing and round trips, the bytes
of the exported folder against a real one, the precision a cap chooses, and real runs whose final/ fits the cap,
loads in transformers and scores as `flopwise eval` says."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import flopwise
from flopwise.budget import Budget
from flopwise.config import load_config, load_run_config
from flopwise.data.pipeline import prepare_data
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import FINAL_EVAL_SCALE, Evaluator
from flopwise.evaluate.load import load_run_model
from flopwise.evaluate.run import evaluate_run
from flopwise.model.artifact import folder_bytes
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder
from flopwise.model.int4 import fake_quantize
from flopwise.model.stored import dequantize, quantize
from flopwise.resolve import resolve
from flopwise.rundir import read_metrics
from flopwise.size import plan_size, weights_bytes
from flopwise.train.display import ProgressDisplay
from tests.helpers import TINY, TINY_VALUES, run_error, train

SHAPE = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=2, seq_len=64)


# -- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("4MB", 4e6), ("16MB", 16e6), ("500kB", 5e5), ("2MiB", 2 * 2**20),
                                        ("1GB", 1e9), ("1.5KiB", 1536.0), ("4mb", 4e6), ("300bytes", 300.0)])
def test_a_byte_term_sets_the_size_cap_in_either_order(text, size):
    for budget in (Budget.parse(f"2m,{text}"), Budget.parse(f"{text},2m")):
        assert (budget.seconds, budget.size, budget.tokens) == (120.0, size, None)
        assert Budget.parse(budget.as_flag()) == budget  # the flag round trip
        assert load_config(values=budget.config_values()).budget.build() == budget  # the [budget] round trip


def test_tokens_and_billions_keep_their_meaning_beside_bytes():
    assert Budget.parse("5M") == Budget(tokens=5e6)
    assert Budget.parse("2B") == Budget(tokens=2e9)  # 'B' alone: billions of tokens, never bytes
    assert Budget.parse("5M,5MB") == Budget(tokens=5e6, size=5e6)
    assert Budget.parse("30steps,2MB").describe() == "30 steps, size <= 2.00 MB"


def test_the_size_is_no_spend_limit():
    budget = Budget.parse("30steps,4MB")
    assert budget.set_limits() == {"steps": 30.0}  # progress p never reads the cap


def test_the_config_section_takes_a_size_with_its_unit():
    config = load_config(values={"budget.steps": 30, "budget.size": "2MiB"})
    assert config.budget.build().size == 2 * 2**20
    with pytest.raises(FlopwiseError, match="budget.size"):
        load_config(values={"budget.steps": 30, "budget.size": "3m"})  # minutes are no size


def test_a_size_alone_is_refused_in_one_line(capsys, tmp_path):
    err = run_error(capsys, ["train", "--budget", "4MB", "--out", str(tmp_path / "r"), *TINY])
    assert err == ("flopwise: error: the budget 4.00 MB caps the model's size but sets no limit to spend: add a "
                   "time, FLOP, token or step limit, e.g. --budget 2m,4.00MB")


# -- the bytes -----------------------------------------------------------------------------------------------------

def test_int_storage_reads_back_as_the_int4_rounding_and_within_half_a_step():
    weight = torch.randn(24, 64)
    levels, scale = quantize(weight, "int4", 32)
    assert levels.dtype == torch.uint8 and levels.shape == (24, 32) and scale.shape == (24, 2)
    assert torch.equal(dequantize(levels, scale, "int4"), fake_quantize(weight, 32))
    levels, scale = quantize(weight, "int8", 32)
    step = weight.abs().amax(dim=1) / 127.5  # per row, symmetric over [-128, 127]
    assert levels.dtype == torch.int8 and scale.shape == (24, 1)
    assert torch.allclose(scale.squeeze(1), step)
    assert ((dequantize(levels, scale, "int8") - weight).abs() <= step[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_the_weights_bytes_are_those_of_the_exported_file(tmp_path, precision):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    save_hf_folder(model, byte_tokenizer(), tmp_path / "f", precision=precision, group=32)
    path = tmp_path / "f" / "model.safetensors"
    with safe_open(str(path), "pt") as file:
        data = sum(file.get_tensor(name).nbytes for name in file.keys())
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + data  # no byte outside the header and the tensors
    assert data == weights_bytes(SHAPE, precision, 32)  # exact, from the shape
    plan = plan_size(SHAPE, 1e9, 32)
    assert folder_bytes(tmp_path / "f") <= plan.candidates[precision]  # the estimate bounds the folder


def test_the_highest_precision_that_fits_is_chosen():
    sizes = plan_size(SHAPE, 1e9, 32).candidates
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["int4"]
    assert plan_size(SHAPE, sizes["fp32"], 32).precision == "fp32"
    assert plan_size(SHAPE, sizes["fp32"] - 1, 32).precision == "bf16"
    assert plan_size(SHAPE, sizes["int8"], 32).precision == "int8"
    assert plan_size(SHAPE, sizes["int8"] - 1, 32).precision == "int4"


def test_int4_adds_quantization_aware_training_and_the_plan_says_why():
    shape = resolve(load_config(values={**TINY_VALUES, "budget.steps": 30})).model
    cap = plan_size(shape, 1e9, 32).candidates["int4"]
    resolved = resolve(load_config(values={**TINY_VALUES, "budget.steps": 30, "budget.size": cap}))
    assert resolved.config.artifact.precision == "int4" and "qat" in resolved.methods
    assert resolved.size["precision"] == "int4" and resolved.size["qat_added"]
    assert any(note.startswith("size: final/ stored in int4") for note in resolved.notes)


def test_a_cap_below_the_smallest_model_is_refused_in_one_line(capsys, tmp_path):
    err = run_error(capsys, ["train", "--budget", "30steps,50kB", "--out", str(tmp_path / "r"), *TINY])
    assert "the size budget 50.0 kB is smaller than the smallest model (model.size=tiny at int4" in err
    assert not (tmp_path / "r").exists()


def test_a_model_too_large_even_at_int4_names_a_size_that_fits(capsys, tmp_path):
    args = [a if a != "model.size=tiny" else "model.size=small" for a in TINY]
    err = run_error(capsys, ["train", "--budget", "30steps,250kB", "--out", str(tmp_path / "r"), *args])
    assert "is below this model even at int4" in err and "--set model.size=tiny" in err


# -- real runs -----------------------------------------------------------------------------------------------------

class LoadedAsFlopwise(torch.nn.Module):
    """A transformers model as flopwise's Evaluator scores one (per-token loss of windows)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def per_token_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


@pytest.mark.slow  # two real runs and a transformers load
@pytest.mark.parametrize("cap, precision", [("300kB", "bf16"), ("200kB", "int4")])
def test_a_size_capped_run_ships_a_folder_within_the_cap_that_loads_and_scores_as_eval(tmp_path, cap, precision):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r"
    assert train("--budget", f"30steps,{cap}", "--out", str(run), *TINY) == 0
    limit = Budget.parse(f"1steps,{cap}").size
    final = run / "final"
    assert folder_bytes(final) <= limit
    plan = json.loads((run / "plan.json").read_text())
    assert plan["size"]["precision"] == precision and plan["size"]["cap"] == limit
    assert f"weights stored in {precision}; the folder holds {folder_bytes(final):,} bytes" in (
        final / "README.md").read_text()
    config = load_run_config(run)
    assert config.artifact.precision == precision and ("qat" in config.methods.use) == (precision == "int4")

    tokens = 2048 * FINAL_EVAL_SCALE  # the run's final evaluation's sample
    reported = evaluate_run(run, "cpu", tokens)
    final_event = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval" and e["p"] == 1.0][-1]
    assert final_event["artifact_loss"] == pytest.approx(reported["artifact"]["loss"], abs=1e-4)
    assert reported["loss"] == reported["artifact"]["loss"]  # `eval` scores final/ as stored
    assert reported["as_trained"]["loss"] == final_event["val_loss"] != final_event["artifact_loss"]  # rounded

    loaded = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=precision == "int4",
                                                  dtype=torch.float32)
    model, tokenizer = load_run_model(run, torch.device("cpu"), False)
    corpus = prepare_data(config.data, config.train.seed, tokenizer).corpus
    evaluator = Evaluator(corpus, tokenizer.token_bytes(), model.config.seq_len, config.optim.batch_size,
                          torch.device("cpu"), torch.float32)
    with torch.no_grad():
        as_loaded = evaluator(LoadedAsFlopwise(loaded), tokens)["loss"]
    assert as_loaded == pytest.approx(reported["artifact"]["loss"], abs=1e-4)


def test_the_export_refuses_a_folder_above_the_cap(tmp_path):
    with pytest.raises(FlopwiseError, match="above the size budget of 1,000 bytes: nothing was written"):
        save_hf_folder(GPT(SHAPE), byte_tokenizer(), tmp_path / "f", precision="int4", cap=1000)
    assert not (tmp_path / "f").exists() and not any(tmp_path.iterdir())


@pytest.mark.slow  # three real runs
def test_a_resumed_run_keeps_the_stored_precision(tmp_path):
    """Interrupted and resumed, a size-capped run trains as an uninterrupted one and ships the same bytes."""
    shape = resolve(load_config(values={**TINY_VALUES, "budget.steps": 8})).model
    config = load_config(values={**TINY_VALUES, "budget.steps": 8,
                                 "budget.size": plan_size(shape, 1e9, 32).candidates["bf16"]})
    quiet = ProgressDisplay.quiet()
    flopwise.run(config, tmp_path / "part", stop_after="4steps", display=quiet)
    flopwise.resume(tmp_path / "part", display=quiet)
    flopwise.run(config, tmp_path / "whole", display=quiet)
    parts = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [[e["loss"] for e in events if e["event"] == "train"] for events in (parts, whole)]
    assert losses[0] == losses[1]
    assert (tmp_path / "part" / "final" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "final" / "model.safetensors").read_bytes()
    assert load_run_config(tmp_path / "part").artifact.precision == "bf16"


def test_the_auto_planner_keeps_only_shapes_that_fit_the_cap():
    from flopwise.plan.planner import plan_run
    from flopwise.scaling.law import CHINCHILLA_REFIT
    from flopwise.scaling.law_file import PlanningLaw
    from flopwise.scaling.shapes import family_shape

    config = load_config(values={"budget.flops": 1e17})
    widths = [candidate.d_model for candidate in plan_run(config, 8192, PlanningLaw(CHINCHILLA_REFIT), "d").candidates]
    assert len(widths) >= 3
    cap = plan_size(family_shape(config.model, widths[1], 8192), 1e12, 32).candidates["int4"]
    capped = plan_run(load_config(values={"budget.flops": 1e17, "budget.size": cap}), 8192,
                      PlanningLaw(CHINCHILLA_REFIT), "d")
    assert [candidate.d_model for candidate in capped.candidates] == widths[:2]
    with pytest.raises(FlopwiseError, match="smaller than the smallest model"):
        plan_run(load_config(values={"budget.flops": 1e17, "budget.size": 1000}), 8192,
                 PlanningLaw(CHINCHILLA_REFIT), "d")


def test_an_unknown_stored_precision_is_refused_with_the_choices(tmp_path, capsys):
    err = run_error(capsys, ["train", "--budget", "1steps", "--set", "artifact.precision=int3",
                             "--out", str(tmp_path / "run")])
    assert "artifact.precision='int3'" in err and "'bf16', 'int8' or 'int4'" in err
    assert not (tmp_path / "run").exists()
