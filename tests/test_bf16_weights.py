"""bf16 weights (flopwise/methods/bf16_weights.py, flopwise/optim/rounding.py): the rounding's math against
independent computations, the model computing on bf16-stored matrices, the run's export, refusals, and the
7B estimate the GaLore paper trains on a 24 GB card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flopwise.cli import main
from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.methods.choose import estimate_for
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT, linear
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.optim.rounding import stochastic_round_bf16
from flopwise.resolve import resolve
from tests.helpers import TINY, config_with, load_hf_model, train

GiB = 2**30


def test_stochastic_rounding_lands_on_a_neighbour_with_the_right_odds():
    """Every value rounds to one of its two bf16 neighbours, up with probability (x - low) / (high - low):
    unbiased for either sign; a value bf16 holds exactly stays as it is."""
    generator = torch.Generator().manual_seed(0)
    low, high = 1.0, 1.0 + 2**-7  # neighbouring bf16 numbers
    for fraction in (0.1, 0.5, 0.9):
        x = torch.full((100_000,), low + fraction * (high - low))
        for sign in (1, -1):
            rounded = stochastic_round_bf16(sign * x, generator).float()
            assert set(rounded.abs().unique().tolist()) <= {low, high}
            assert (rounded.abs() == high).float().mean().item() == pytest.approx(fraction, abs=0.01)
    exact = torch.tensor([0.0, 1.0, -3.5, 2**-20, 1e30]).bfloat16().float()
    assert torch.equal(stochastic_round_bf16(exact, generator).float(), exact)


def adamw_on(dtype: torch.dtype, rounding: str, steps: int = 300) -> torch.Tensor:
    """A weight trained by AdamW on a fixed gradient at a tiny learning rate: each step moves it by about
    lr = 1e-4, a fortieth of half a bf16 unit at 1.0.  Returns it in fp32 (with Kahan's compensation)."""
    weight = torch.nn.Parameter(torch.ones(64, 64, dtype=dtype))
    optimizer = FlopwiseOptimizer([{"params": [weight], "update": "adamw", "lr": 1e-4}], rounding=rounding, seed=3)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    state = optimizer.state[weight]
    assert state["exp_avg"].dtype == torch.float32  # states stay fp32 with bf16 weights
    return weight.detach().float() + state.get("compensation", torch.zeros(())).float()


def test_rounding_keeps_the_small_updates_that_round_to_nearest_loses():
    exact = adamw_on(torch.float32, "nearest")
    assert exact.mean().item() == pytest.approx(1 - 300 * 1e-4, rel=1e-4)
    assert torch.equal(adamw_on(torch.bfloat16, "nearest"), torch.ones(64, 64))  # every update lost
    moved = 1 - exact.mean().item()
    # the bf16 compensation keeps 8 bits of each step's rounding error: within 2% of the distance moved
    assert (adamw_on(torch.bfloat16, "kahan") - exact).abs().max().item() < 0.02 * moved
    stochastic = adamw_on(torch.bfloat16, "stochastic")
    assert abs(stochastic.mean().item() - exact.mean().item()) < 0.02 * moved  # right on average


def test_stochastic_rounding_is_the_same_for_the_same_seed_and_counts_updates():
    first, second = adamw_on(torch.bfloat16, "stochastic", 20), adamw_on(torch.bfloat16, "stochastic", 20)
    assert torch.equal(first, second)


def test_a_model_on_bf16_matrices_computes_as_fp32_on_their_values():
    """Under fp32 compute each Linear upcasts its bf16 weight: the logits are those of an fp32 model holding
    the bf16-rounded values.  Norm gains stay fp32."""
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, seq_len=16, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.store_matrices_in(torch.bfloat16)
    reference = GPT(cfg)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(x)[0], reference(x)[0])
    tokens = model.generate(x[:, :4], 6, temperature=0)  # the KV cache takes the compute dtype
    assert torch.equal(tokens, reference.generate(x[:, :4], 6, temperature=0))
    model(x, x)[1].backward()  # gradients: the fp32 model's, in each weight's own dtype
    reference(x, x)[1].backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert param.grad.dtype == param.dtype, name
        torch.testing.assert_close(param.grad.float(), ref.grad.to(param.dtype).float(), rtol=1e-2, atol=1e-7)


def test_backward_keeps_the_stored_bf16_weight_not_an_upcast_copy():
    """Under fp32 compute a bf16 Linear saves its input and its own weight for backward, and upcasts again
    there: no fp32 copy of the weight lives through the step."""
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear(torch.randn(3, 8, requires_grad=True), layer.weight, layer.bias).sum().backward()
    assert [t.dtype for t in saved] == [torch.float32, torch.bfloat16] and saved[1] is layer.weight


@pytest.mark.slow
def test_a_run_with_bf16_weights_exports_bf16_that_transformers_loads(tmp_path, text_folder):
    run = tmp_path / "run"
    assert train(*TINY, "--method", "bf16_weights", "--data", str(text_folder), "--budget", "12steps",
                 "--out", str(run)) == 0
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16" and dtypes["model.norm.weight"] == "F32"
    assert json.loads((run / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    assert hf.dtype == torch.bfloat16  # as config.json says
    exact = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    ours = load_hf_model(run / "final")
    ours.store_matrices_in(torch.bfloat16)
    x = torch.randint(0, ours.config.vocab_size, (1, 20))
    torch.testing.assert_close(exact(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    assert main(["eval", str(run)]) == 0  # evaluates as it trained


@pytest.mark.parametrize("methods,world,phrase", [
    (["bf16_weights", "lora"], None, "cannot combine 'bf16_weights' and 'lora'"),
    (["bf16_weights", "sltrain"], None, "cannot combine 'bf16_weights' and 'sltrain'"),
    (["bf16_weights"], World(2, "fsdp"), "not supported with --parallel fsdp"),
])
def test_refusals_are_one_line(methods, world, phrase):
    with pytest.raises(FlopwiseError, match=phrase) as error:
        resolve(config_with(methods, "optim.name=adamw"), world)
    assert "\n" not in str(error.value)


def test_bad_rounding_is_refused_in_one_line(capsys):
    assert main(["memory", "--set", "methods.use=[\"bf16_weights\"]", "--set",
                 "methods.bf16_weights.rounding=floor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "methods.bf16_weights.rounding" in err[0]


def test_the_galore_papers_7b_setup_fits_24_gib_with_bf16_weights():
    """LLaMA 7B, a 256-token batch, bf16 compute: 8-bit GaLore with per-layer updates (and checkpointing)
    fits a 24 GiB card with bf16 weights, as in Zhao et al. 2024, and not with fp32 weights."""
    config = config_with([], "optim.name=adamw")
    cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, mlp_hidden=11008, seq_len=256,
                      tie_embeddings=False)
    sets = {"fp32": ["galore", "8bit", "checkpointing", "layerwise"]}
    sets["bf16"] = ["bf16_weights", *sets["fp32"]]
    peaks = {name: estimate_for(cfg, 1, methods, config.methods, "adamw", "bf16") for name, methods in sets.items()}
    assert peaks["bf16"].peak < 24 * GiB < peaks["fp32"].peak
    with torch.device("meta"):
        parameters = GPT(cfg).num_parameters()
    assert peaks["bf16"].weights == pytest.approx(2 * parameters, rel=1e-3)  # 2 bytes each, but the norm gains
