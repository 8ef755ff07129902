"""The fp8 method (flopwise/methods/fp8.py) on CPU: which modules become torchao's Float8Linear and that the
state dict does not change, the refusals (a device without FP8, fp32 compute, FSDP, a missing torchao, LoRA
and SLTrain), through the CLI too, and bench/gpu_fp8.py's refusal and dry run."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn
from torchao.float8 import Float8LinearConfig
from torchao.float8.float8_linear import Float8Linear

from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.methods.stack import memory_traits
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT, Linear
from flopwise.resolve import resolve
from tests.helpers import TINY, config_with, load_bench, resolved_with, run_error, stack_of

CPU = World(1, "ddp", torch.device("cpu"))
CUDA = World(1, "ddp", torch.device("cuda", 0))
NO_FP8 = ("methods.use 'fp8' needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9 or newer: L4, RTX 4090, "
          "H100 or later) but this run computes on {}: drop fp8 from methods.use, or train on such a GPU")


def small_model(**shape: object) -> GPT:
    """Attention 32 x 32 (fits FP8), an MLP 40 wide (does not), an untied head with a vocabulary of 64 (fits FP8
    by shape, but is the head) and biases."""
    torch.manual_seed(0)
    values = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 8, "mlp_hidden": 40,
              "tie_embeddings": False, "bias": True} | shape
    return GPT(ModelConfig(**values))


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_only_block_linears_that_fit_fp8_are_converted_and_the_state_dict_is_unchanged(recipe):
    model = small_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    names = [name for name, _ in model.named_parameters()]
    stack_of(["fp8"], f"methods.fp8.recipe={recipe}").configure(model)
    converted = {name: module for name, module in model.named_modules() if isinstance(module, Float8Linear)}
    assert sorted(converted) == sorted(f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert all(m.config == Float8LinearConfig.from_recipe_name(recipe) for m in converted.values())
    for i in range(2):  # 40 is not a multiple of 16: the MLP stays
        mlp = model.layers[i].mlp
        assert all(type(linear) is Linear for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert type(model.lm_head) is Linear and type(model.embed_tokens) is nn.Embedding  # head and embeddings stay
    assert [name for name, _ in model.named_parameters()] == names
    after = model.state_dict()
    assert list(after) == list(before)  # same keys, same order: checkpoints and the HF export do not change
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_the_converted_model_trains_like_the_plain_one():
    """On CPU torch emulates the FP8 matmuls: the loss stays close and every parameter gets a gradient."""
    plain, converted = small_model(mlp_hidden=64), small_model(mlp_hidden=64)
    stack_of(["fp8"]).configure(converted)
    assert sum(isinstance(m, Float8Linear) for m in converted.modules()) == 2 * 7
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    plain_loss = plain(ids[:, :-1], ids[:, 1:])[1]
    loss = converted(ids[:, :-1], ids[:, 1:])[1]
    assert loss.item() == pytest.approx(plain_loss.item(), rel=0.02)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in converted.parameters())


def test_fp8_sets_its_memory_trait():
    config = config_with(["fp8"])
    cfg = small_model().config
    assert memory_traits(["fp8"], config.methods, cfg).fp8_block_matmuls
    assert not memory_traits([], config.methods, cfg).fp8_block_matmuls


def test_a_device_without_fp8_is_refused_in_one_line_naming_it(monkeypatch):
    config = config_with(["fp8"])  # validating the config alone refuses nothing: no device yet
    with pytest.raises(FlopwiseError) as error:
        resolve(config, CPU)
    assert str(error.value) == NO_FP8.format("cpu")
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(FlopwiseError) as error:
        resolve(config, CUDA)
    assert str(error.value) == NO_FP8.format("cuda:0 (NVIDIA A100-SXM4-80GB, compute capability 8.0)")
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    resolve(config, CUDA)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build reports capabilities of its own
    with pytest.raises(FlopwiseError) as error:
        resolve(config, CUDA)
    assert str(error.value) == NO_FP8.format("cuda:0 (NVIDIA H100 80GB HBM3, a ROCm GPU)")


def test_fp32_compute_and_fsdp_are_refused():
    with pytest.raises(FlopwiseError) as error:
        resolved_with(["fp8"], "train.precision=fp32")
    assert str(error.value) == ("methods.use 'fp8' computes everything but its FP8 matmuls in bf16 and cannot run "
                                "with train.precision=fp32: set train.precision=bf16 (or auto), or drop fp8")
    with pytest.raises(FlopwiseError) as error:
        resolve(config_with(["fp8"]), World(2, "fsdp"))
    assert str(error.value) == ("methods.use 'fp8' is not supported with --parallel fsdp (torchao's float8 under "
                                "FSDP2 has not been tested in flopwise): use --parallel ddp, or drop fp8")
    resolve(config_with(["fp8"]), World(2, "ddp"))


@pytest.mark.parametrize("other", ["lora", "sltrain"])
def test_methods_that_replace_the_block_linears_are_refused(other):
    with pytest.raises(FlopwiseError, match=f"cannot combine '{other}' and 'fp8' .*replaces the block Linears"):
        resolved_with(["fp8", other])


def test_a_missing_torchao_is_refused_before_the_run_and_at_conversion(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now fails
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    expected = "methods.use 'fp8' needs the 'torchao' package: pip install 'flopwise[fp8]' (or pip install torchao)"
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(FlopwiseError) as error:
        resolve(config_with(["fp8"]), CUDA)
    assert str(error.value) == expected
    with pytest.raises(FlopwiseError) as error:
        stack_of(["fp8"]).configure(small_model())
    assert str(error.value) == expected


def test_training_with_fp8_on_a_cpu_is_refused_before_anything_is_written(tmp_path, capsys, text_folder):
    out = tmp_path / "run"
    err = run_error(capsys, ["train", "--data", str(text_folder), "--budget", "3steps", "--out", str(out), *TINY,
                             "--set", "methods.use=[fp8]"])
    assert err == "flopwise: error: " + NO_FP8.format("cpu")
    assert not out.exists()


def test_the_gpu_check_refuses_a_machine_without_fp8_and_its_dry_run_is_over_100m(tmp_path, capsys, monkeypatch):
    bench = load_bench("gpu_fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_fp8.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(out)])
    assert str(exit_.value) == "bench/gpu_fp8.py cannot measure fp8 here: " + NO_FP8.format("cpu")
    assert not out.exists()
    bench.main(["--dry-run", "--recipes", "tensorwise", "rowwise"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bf16", "fp8 tensorwise", "fp8 rowwise"]
    assert all(float(re.search(r"([\d.]+)M parameters", line).group(1)) >= 100 for line in lines)
    assert "7 of 7 Linears per block in FP8" in lines[1]


def test_an_unknown_recipe_is_refused_with_the_choices():
    with pytest.raises(FlopwiseError, match="methods.fp8.recipe='blockwise': Input should be 'tensorwise' or "
                                            "'rowwise'") as error:
        config_with(["fp8"], "methods.fp8.recipe=blockwise")
    assert "\n" not in str(error.value)
