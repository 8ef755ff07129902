"""Quantization-aware training (flopwise/methods/qat.py) and int4 round-to-nearest (flopwise/model/int4.py):
the rounding against an independent loop and torchao, the straight-through layer, the switch at ``start``,
real runs that fake-quantize their last part and resume bit for bit, and ``flopwise eval --quantize int4``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.errors import FlopwiseError
from flopwise.methods.dense import block_linears
from flopwise.methods.qat import FakeQuantLinear, QuantizationAwareTraining
from flopwise.methods.stack import memory_traits
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.int4 import fake_quantize, straight_through
from tests.helpers import TINY, config_with, losses, resolved_with, run_error, stack_of, train, train_events

START, GROUP, STEPS = 0.5, 16, 24  # fake quantization from step 12 of 24 on


def random_weight(rows: int = 6, columns: int = 96, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with rows of very different scales, an all-zero group and a one-element group."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * torch.logspace(-3, 1, rows).unsqueeze(1)
    weight[1, :32] = 0
    weight[2, 32:64] = 0
    weight[2, 40] = -0.3
    return weight


def loop_fake_quantize(weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized weight, each element's scale) by a plain loop over rows and groups, in float32 arithmetic
    step by step as torchao's formula goes (the group's extreme lies on a tie, +-7.5 steps, which float32
    rounding of w * (1 / scale) decides)."""
    out, scales = np.zeros_like(weight), np.zeros_like(weight)
    one, tiny = np.float32(1), np.finfo(np.float32).tiny
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group):
            values = weight[row, start:start + group]
            scale = max(np.abs(values).max() / np.float32(7.5), tiny)
            out[row, start:start + group] = np.clip(np.round(values * (one / scale)), -8, 7) * scale
            scales[row, start:start + group] = scale
    return out, scales


@pytest.mark.parametrize("group", [8, 32])
def test_fake_quantize_matches_a_loop_over_groups(group):
    weight = random_weight()
    expected, scales = loop_fake_quantize(weight.numpy(), group)
    result = fake_quantize(weight, group)
    assert result.dtype == torch.float32 and result.shape == weight.shape
    np.testing.assert_array_equal(result.numpy(), expected)
    assert torch.equal(result[1, :32], torch.zeros(32))  # an all-zero group: zeros, no 0 / 0
    levels = result.double().numpy() / scales.astype(np.float64)
    assert np.abs(levels - np.round(levels)).max() < 1e-4  # whole steps of the group's scale...
    assert np.round(levels).min() >= -8 and np.round(levels).max() <= 7  # ...from -8 to 7
    for row in result.reshape(-1, group):  # each group, row by row
        assert row.unique().numel() <= 16
    error = np.abs(result.double().numpy() - weight.double().numpy())
    assert np.all(error <= scales.astype(np.float64) / 2 * (1 + 1e-5))  # half a step, up to float32 rounding


def test_fake_quantize_ties_and_ends_follow_torchao():
    """With max |w| = 7.5 the scale is exactly 1: ties round to even, 7.5 is clamped to 7 and -7.5 kept at -8."""
    row = torch.tensor([[7.5, -7.5, 2.5, 1.5, 0.5, -0.5, -3.25, 6.75]])
    assert fake_quantize(row, 8).tolist() == [[7, -8, 2, 2, 0, -0, -3, 7]]


def test_fake_quantize_keeps_the_dtype_and_computes_in_fp32():
    weight = random_weight().bfloat16()
    result = fake_quantize(weight, 32)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, fake_quantize(weight.float(), 32).bfloat16())


def test_fake_quantize_refuses_groups_that_do_not_divide_the_columns():
    with pytest.raises(ValueError, match="groups of 36"):
        fake_quantize(random_weight(), 36)


def test_fake_quantize_is_torchaos_symmetric_int4_bit_for_bit():
    primitives = pytest.importorskip("torchao.quantization.quant_primitives")
    weight = random_weight()
    block = (1, 32)
    scale, zero = primitives.choose_qparams_affine(weight, primitives.MappingType.SYMMETRIC, block, torch.int8,
                                                   quant_min=-8, quant_max=7)
    quantized = primitives.quantize_affine(weight, block, scale, zero, torch.int8, quant_min=-8, quant_max=7)
    expected = primitives.dequantize_affine(quantized, block, scale, zero, torch.int8, quant_min=-8, quant_max=7)
    assert torch.equal(fake_quantize(weight, 32), expected)


def test_straight_through_forwards_the_int4_weight_and_passes_the_gradient_unchanged():
    weight = random_weight().requires_grad_(True)
    quantized = straight_through(weight, 32)
    assert torch.equal(quantized.detach(), fake_quantize(weight, 32))
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    (quantized * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=8, mlp_hidden=64))


def test_fake_quant_linears_hold_the_same_parameters_under_the_same_names():
    model = tiny_model()
    before = dict(model.named_parameters())
    state = model.state_dict()
    stack = stack_of(["qat"], f"methods.qat.group={GROUP}")
    stack.configure(model)
    linears = [linear for _, _, _, linear in block_linears(model)]
    assert len(linears) == 2 * 7 and all(isinstance(linear, FakeQuantLinear) for linear in linears)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[name] is before[name] for name in before)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_the_layer_fake_quantizes_only_when_active_and_training():
    model = tiny_model()
    stack = stack_of(["qat"], f"methods.qat.group={GROUP}")
    stack.configure(model)
    layer = model.layers[0].mlp.down_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    plain = F.linear(x, layer.weight)
    assert torch.equal(layer(x), plain)  # inactive
    stack.on_progress(20, 0.9)
    assert torch.equal(layer(x), F.linear(x, fake_quantize(layer.weight, GROUP)))
    layer.eval()  # evaluation measures the full-precision model, as `flopwise eval` does
    assert torch.equal(layer(x), plain)
    layer.train()
    layer(x).sum().backward()  # straight through: the gradient of a Linear whose weight were the int4 one
    assert torch.equal(layer.weight.grad, torch.ones(3, 32).T @ x)


def test_fake_quantization_switches_on_at_start_as_a_function_of_p_alone():
    model = tiny_model()
    stack = stack_of(["qat"], "methods.qat.start=0.25", "methods.qat.group=32")
    stack.configure(model)
    layers = [linear for _, _, _, linear in block_linears(model)]
    for step, p, on in ((0, 0.0, False), (4, 0.24, False), (5, 0.25, True), (9, 0.9, True), (2, 0.1, False)):
        stack.on_progress(step, p)  # any order: a resume enters wherever it left off
        assert all(layer.active == on for layer in layers)
        assert stack.log_fields() == ({"qat": 1} if on else {})
    assert stack.state_dict() == {}  # nothing to save for an exact resume


def test_settings_conflicts_and_memory_traits(capsys):
    with pytest.raises(FlopwiseError) as err:
        resolved_with(["qat"], "model.size=tiny", "methods.qat.group=48")
    assert str(err.value).startswith("methods.qat.group=48 does not divide the block Linears' input widths")
    assert "\n" not in str(err.value) and "choose a group that divides 64, e.g. 32" in str(err.value)
    for other in ("lora", "sltrain"):
        with pytest.raises(FlopwiseError, match=f"cannot combine '{other}' and 'qat'"):
            resolved_with(["qat", other])
    assert "fp8" in QuantizationAwareTraining.conflicts  # torchao's Float8Linear replaces the block Linears too
    for bad in ("methods.qat.start=1", "methods.qat.start=-0.1", "methods.qat.group=0"):
        with pytest.raises(FlopwiseError, match=bad.split("=")[0]):
            config_with(["qat"], bad)
    config = config_with(["qat"])
    traits = memory_traits(["qat"], config.methods, config.model.build(257))
    assert traits.fake_quantized_blocks


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory, text_folder):
    """A 24-step run with fake quantization from p = 0.5 in groups of 16; the same run stopped after step 15 and
    resumed; and the same run without qat."""
    root = tmp_path_factory.mktemp("qat")
    args = [*TINY, "--data", str(text_folder), "--budget", f"{STEPS}steps"]
    qat = [*args, "--method", "qat", "--set", f"methods.qat.start={START}", "--set", f"methods.qat.group={GROUP}"]
    assert train(*qat, "--out", str(root / "full")) == 0
    assert train(*qat, "--stop-after", "15steps", "--out", str(root / "part")) == 0
    assert train("--resume", str(root / "part")) == 0
    assert train(*args, "--out", str(root / "plain")) == 0
    return root


@pytest.mark.slow
def test_a_run_fake_quantizes_its_last_part_only(qat_runs):
    events = train_events(qat_runs / "full")
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    assert [e.get("qat") for e in events] == [None] * 11 + [1] * 13  # on from p = 12 / 24 = start
    curve, plain = losses(qat_runs / "full"), losses(qat_runs / "plain")
    assert curve[:11] == plain[:11]  # the very same computation until then...
    assert all(a != b for a, b in zip(curve[11:], plain[11:]))  # ...and step 12's forward already rounds


@pytest.mark.slow
def test_a_run_resumed_with_qat_active_repeats_the_uninterrupted_one_bit_for_bit(qat_runs):
    full, part = qat_runs / "full", qat_runs / "part"
    assert losses(part) == losses(full)
    assert [e.get("qat") for e in train_events(part)] == [e.get("qat") for e in train_events(full)]
    final = load_file(str(full / "final" / "model.safetensors"))
    resumed = load_file(str(part / "final" / "model.safetensors"))
    assert list(final) == list(resumed) and all(torch.equal(final[key], resumed[key]) for key in final)
    assert "model.layers.0.mlp.down_proj.weight" in final  # exported as a plain model


@pytest.mark.slow
def test_eval_quantize_int4_writes_its_own_file_with_the_runs_group(qat_runs, capsys):
    run = qat_runs / "full"
    assert main(["eval", str(run), "--max-tokens", "2048"]) == 0
    plain = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--quantize", "int4", "--max-tokens", "2048"]) == 0
    assert "held-out evaluation of the int4 model (round-to-nearest, groups of 16)" in capsys.readouterr().out
    int4 = json.loads((run / "eval-int4.json").read_text())
    assert json.loads((run / "eval.json").read_text()) == plain  # not written over
    assert int4["quantize"] == "int4" and int4["group"] == GROUP and int4["tokens"] == plain["tokens"]
    assert int4["loss"] != plain["loss"]
    assert main(["eval", str(qat_runs / "plain"), "--quantize", "int4", "--checkpoint", "--max-tokens", "2048"]) == 0
    assert json.loads((qat_runs / "plain" / "eval-int4.json").read_text())["group"] == 32  # no qat: 32


@pytest.mark.slow
def test_eval_quantize_refuses_a_bad_group_in_one_line(qat_runs, capsys):
    run = str(qat_runs / "full")
    err = run_error(capsys, ["eval", run, "--quantize", "int4", "--group", "48"])
    assert "--group 48 does not divide the block Linears' input widths" in err and "e.g. 32" in err
    assert "--group 0 must be a positive number" in run_error(capsys, ["eval", run, "--quantize", "int4",
                                                                       "--group", "0"])
    assert "add --quantize int4" in run_error(capsys, ["eval", run, "--group", "32"])
