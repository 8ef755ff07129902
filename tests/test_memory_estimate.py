"""The memory estimator (flopwise/memory/estimate.py) against measurement, autograd, hand counts and the
GaLore paper; the planner's order and refusal; the ``flopwise memory`` table."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
import torch
from rich.console import Console

from flopwise.budget import format_bytes
from flopwise.cli.memory import cmd_memory, register
from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.methods.choose import CANDIDATES, choose_methods, estimate_for
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.plan.measure import measure_step, rss_step_peak
from tests.helpers import config_with

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 32}
# Every speedrun option of the model (docs/model.md) on
OPTIONS = {"value_embeds": True, "x0_lambdas": True, "unet_skips": True, "smear": True, "logit_softcap": 15.0,
           "bigram_hash": 97}



def build(shape: dict, methods: list[str], optim: str = "adamw", vocab: int = 300, extra: tuple[str, ...] = ()):
    """A model with its methods applied and its optimizer, as flopwise train builds them."""
    overrides = [f"model.{key}={value}" for key, value in shape.items()]
    overrides += [f"optim.name={optim}", f"methods.use={json.dumps(methods)}", *extra]
    config = load_config(None, overrides)
    cfg = config.model.build(vocab)
    torch.manual_seed(0)
    model = GPT(cfg)
    stack = MethodStack(config.methods, config.train.seed)
    stack.configure(model)
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"), stack.shape_optimizer)
    return config, cfg, model, optimizer, stack


# (shape, methods, optimizer, micro-batch, vocab, compute dtype, extra config)
CASES = {
    "adamw": (SMALL, [], "adamw", 2, 300, "fp32", ()),
    "muon": (SMALL, [], "muon", 2, 300, "fp32", ()),
    "deep-narrow-untied": ({"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 64, "tie_embeddings": False},
                           [], "adamw", 3, 500, "fp32", ()),
    "wide-gqa-large-vocab": ({"d_model": 96, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "seq_len": 48,
                              "qk_norm": False}, [], "muon", 1, 2000, "fp32", ()),
    "gpt2-style": ({**SMALL, "mlp": "gelu", "norm": "layer", "bias": True, "positions": "learned",
                    "qk_norm": False}, [], "adamw", 2, 300, "fp32", ()),
    "relu2-long": ({**SMALL, "mlp": "relu2", "seq_len": 128}, [], "muon", 2, 300, "fp32", ()),
    "8bit": (SMALL, ["8bit"], "adamw", 2, 300, "fp32", ()),
    "muon-8bit": (SMALL, ["8bit"], "muon", 2, 300, "fp32", ()),
    "checkpointing": (SMALL, ["checkpointing"], "adamw", 4, 300, "fp32", ()),
    "8bit-checkpointing": (SMALL, ["8bit", "checkpointing"], "muon", 2, 300, "fp32", ()),
    # galore_update_gap=1: the measured step refreshes the projection (SVD), the costliest kind of step
    "galore": (SMALL, ["galore"], "adamw", 2, 300, "fp32", ("methods.galore.update_gap=1",)),
    "galore-8bit-ckpt-layerwise": (SMALL, ["galore", "8bit", "checkpointing", "layerwise"], "adamw", 2, 1000,
                                   "fp32", ("methods.galore.update_gap=1",)),
    "layerwise-untied": ({**SMALL, "tie_embeddings": False}, ["layerwise"], "adamw", 2, 2000, "fp32", ()),
    "muon-8bit-layerwise": (SMALL, ["8bit", "layerwise"], "muon", 2, 2000, "fp32", ()),
    "sltrain": (SMALL, ["sltrain"], "adamw", 2, 300, "fp32", ()),
    "sltrain-8bit-ckpt": (SMALL, ["sltrain", "8bit", "checkpointing"], "adamw", 2, 300, "fp32", ()),
    "lisa": ({**SMALL, "n_layers": 3}, ["lisa", "8bit"], "muon", 2, 300, "fp32", ("methods.lisa.layers=1",)),
    "lora": (SMALL, ["lora"], "adamw", 2, 300, "fp32", ()),
    "bf16-autocast": (SMALL, [], "adamw", 2, 300, "bf16", ()),
    "bf16-checkpointing-lora": (SMALL, ["checkpointing", "lora"], "adamw", 2, 300, "bf16", ()),
    # bf16 weights: computing in bf16, or upcast per Linear in fp32; Kahan's buffers, 8-bit states, GaLore
    "bf16-weights": (SMALL, ["bf16_weights"], "adamw", 2, 300, "bf16", ()),
    "bf16-weights-fp32-compute-muon": (SMALL, ["bf16_weights"], "muon", 2, 300, "fp32", ()),
    "bf16-weights-kahan-8bit": (SMALL, ["bf16_weights", "8bit"], "adamw", 2, 300, "bf16",
                                ("methods.bf16_weights.rounding=kahan",)),
    "bf16-weights-galore-8bit-ckpt-layerwise": (SMALL, ["bf16_weights", "galore", "8bit", "checkpointing",
                                                        "layerwise"], "adamw", 2, 1000, "bf16",
                                                ("methods.galore.update_gap=1",)),
    # QAT's fake quantization on (p past its start): each block Linear reads a new, rounded weight
    "qat": (SMALL, ["qat"], "muon", 2, 300, "fp32", ("methods.qat.group=16",)),
    "qat-bf16-weights-8bit": (SMALL, ["qat", "bf16_weights", "8bit"], "adamw", 2, 300, "bf16",
                              ("methods.qat.group=16",)),
    # the speedrun options: their tables, gates and scalars, and what their ops keep for backward
    "options": ({**SMALL, **OPTIONS}, [], "adamw", 2, 300, "fp32", ()),
    "options-muon-odd-depth-untied": ({**SMALL, **OPTIONS, "n_layers": 3, "tie_embeddings": False}, [], "muon", 2,
                                      2000, "fp32", ()),
    "options-bf16-8bit-ckpt": ({**SMALL, **OPTIONS}, ["8bit", "checkpointing"], "muon", 2, 300, "bf16", ()),
    "options-layerwise-big-bigram": ({**SMALL, **OPTIONS, "bigram_hash": 5000}, ["layerwise"], "adamw", 2, 3000,
                                     "fp32", ()),
    "options-galore": ({**SMALL, **OPTIONS}, ["galore"], "adamw", 2, 300, "fp32", ("methods.galore.update_gap=1",)),
    "options-qat-bf16-weights": ({**SMALL, **OPTIONS}, ["qat", "bf16_weights"], "muon", 2, 300, "bf16",
                                 ("methods.qat.group=16",)),
    "options-lora": ({**SMALL, **OPTIONS}, ["lora"], "adamw", 2, 300, "bf16", ()),
    "options-sltrain": ({**SMALL, **OPTIONS, "n_layers": 3}, ["sltrain"], "adamw", 2, 300, "fp32", ()),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_matches_measured_peak(name):
    shape, methods, optim, batch, vocab, dtype, extra = CASES[name]
    config, cfg, model, optimizer, methods_built = build(shape, methods, optim, vocab, extra)
    methods_built.on_progress(0, 1.0)  # late in the run: QAT quantizes
    x, y = (torch.randint(0, vocab, (batch, cfg.seq_len)) for _ in range(2))
    measured = measure_step(model, optimizer, x, y, config.optim.grad_clip, methods_built, DTYPES[dtype])
    estimate = estimate_for(cfg, batch, methods, config.methods, optim, dtype)
    # what exists before the step is counted exactly: weights, states, projections, buffers, the batch
    assert measured.before == (estimate.weights + estimate.optimizer_states + estimate.projections
                               + estimate.buffers)
    assert estimate.peak == pytest.approx(measured.peak, rel=0.15), (
        f"{name}: estimated {estimate.peak:,} ({estimate.peak_at}) vs measured {measured.peak:,} {measured.phases}")


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in a forward, besides weights, buffers, the
    batch and the log-softmax (the estimate counts that with the logits)."""
    known = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers(), x, y)}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in known:
            seen.setdefault(storage._cdata, storage.nbytes())
        return tensor

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), cast:
        model(x, y)
    return sum(seen.values()) - x.numel() * model.config.vocab_size * 4


@pytest.mark.parametrize("shape,methods,autocast", [
    (SMALL, [], False),
    ({**SMALL, "n_kv_heads": 2, "qk_norm": False, "tie_embeddings": False}, [], False),
    ({**SMALL, "mlp": "gelu", "norm": "layer", "bias": True, "positions": "learned", "qk_norm": False}, [], False),
    ({**SMALL, "mlp": "relu2"}, [], False),
    (SMALL, [], True),
    ({**SMALL, "qk_norm": False}, [], True),
    ({**SMALL, "n_layers": 3}, ["checkpointing"], False),
    ({**SMALL, "n_layers": 3}, ["sltrain"], True),
    ({**SMALL, "n_layers": 3}, ["lora"], True),
    ({**SMALL, "n_layers": 3}, ["lisa"], False),
    (SMALL, ["bf16_weights"], True),
    (SMALL, ["qat"], False),
    (SMALL, ["qat"], True),
    ({**SMALL, "tie_embeddings": False}, ["bf16_weights"], False),
    ({**SMALL, **OPTIONS}, [], False),
    ({**SMALL, **OPTIONS, "n_layers": 3, "n_kv_heads": 2, "qk_norm": False}, [], True),
    ({**SMALL, **OPTIONS, "n_layers": 3}, ["checkpointing"], False),
    ({**SMALL, **OPTIONS, "n_layers": 3}, ["lora"], True),
    ({**SMALL, **OPTIONS}, ["bf16_weights"], True),
    ({**SMALL, **OPTIONS}, ["bf16_weights"], False),
])
def test_activation_count_is_what_autograd_saves(shape, methods, autocast):
    """Op by op, deduplicated by storage, as saved_tensors_hooks sees it (only the loss's 4-byte
    scalar weight is left out)."""
    config, cfg, model, optimizer, methods_built = build(shape, methods, extra=("methods.lisa.layers=1",
                                                                                 "methods.qat.group=16"))
    methods_built.before_step(0, model, optimizer)  # LISA freezes its inactive blocks here
    methods_built.on_progress(0, 1.0)  # QAT quantizes
    x, y = (torch.randint(0, cfg.vocab_size, (2, cfg.seq_len)) for _ in range(2))
    expected = estimate_for(cfg, 2, methods, config.methods, "adamw", "bf16" if autocast else "fp32").activations
    assert saved_for_backward(model, x, y, autocast) == expected + 4


def test_byte_counts_by_hand():
    """A 1-block model small enough to count on paper (N = 2 x 8 tokens, hidden 64, vocab 100, tied)."""
    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, seq_len=8)
    memory = config_with([], "methods.galore.rank=4").methods
    params = 100 * 16 + 2 * 16 + 4 * 16 * 16 + 3 * 16 * 64 + 16  # embedding, norms, attention, MLP, final norm
    assert params == 5744
    adamw = estimate_for(cfg, 2, [], memory, "adamw")
    assert adamw.weights == adamw.gradients == 4 * params
    assert adamw.optimizer_states == 11 * 4 + 2 * 4 * params  # 11 tensors: a step counter each, two moments
    # 8-bit: a byte per element and an fp32 absmax per 256 elements, per moment
    blocks = {1600: 7, 16: 1, 256: 1, 1024: 4}
    counts = {1600: 1, 16: 3, 256: 4, 1024: 3}
    int8 = sum(counts[n] * (4 + 2 * (n + 4 * blocks[n])) for n in counts)
    assert estimate_for(cfg, 2, ["8bit"], memory, "adamw").optimizer_states == int8 == 11740
    # Muon: one fp32 momentum for the 7 block matrices; AdamW for the embedding and the 3 gains
    assert estimate_for(cfg, 2, [], memory, "muon").optimizer_states == 4 * 4096 + 4 * 4 + 8 * 1648
    # GaLore rank 4: moments of 4 x the longer side, projections of the shorter side x 4
    galore = estimate_for(cfg, 2, ["galore"], memory, "muon")
    assert galore.optimizer == "adamw"
    assert galore.optimizer_states == 4 * (4 + 2 * 4 * 64) + 3 * (4 + 2 * 4 * 256) + 4 * 4 + 8 * 1648
    assert galore.projections == 4 * (4 * 16 * 4 + 3 * 16 * 4)
    # activations: norms (input, rstd, normalized), q/k/v input, q k v output log-sum-exp, MLP's four
    n = 16
    block = 2 * n * (16 + 1 + 16) * 4 + 2 * n * 16 * 4 + n * (4 * (4 * 16) + 4 * 2) + n * 64 * 4 * 4
    head = n * (16 + 1 + 16) * 4 + n * 16 * 4
    assert adamw.activations == block + head == 30016
    assert adamw.logits == n * 100 * 4 * 3  # log-softmax, and two gradients of its size (logits are freed)
    assert adamw.buffers == 2 * 8 * 8 * 4 + 2 * n * 8  # RoPE cos and sin, inputs and targets
    # checkpointing keeps one fp32 residual per block instead
    assert estimate_for(cfg, 2, ["checkpointing"], memory, "adamw").activations == n * 16 * 4 + head


def test_galore_paper_llama_1b_memory():
    """GaLore (Zhao et al. 2024), pre-training LLaMA 1B in BF16, rank 512 (their Table 2 and its
    memory breakdown): weights 2.60G, Adam's states 5.20G, GaLore's 1.78G; G is 1e9 bytes.  Their
    1B config (configs/llama_1b.json): hidden 2048, intermediate 5461, 24 layers, 32 heads, vocab
    32000, untied head.  The paper's GaLore figure is the low-rank moments (and Adam's for the
    embedding and head) without the projection matrices: with them, even in bf16, it would be
    2.08G, 17% over."""
    cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, mlp_hidden=5461, seq_len=256,
                      tie_embeddings=False)
    memory = config_with([], "methods.galore.rank=512").methods
    full = estimate_for(cfg, 1, [], memory, "adamw", dtype="bf16", param_dtype="bf16")
    galore = estimate_for(cfg, 1, ["galore"], memory, "adamw", dtype="bf16", param_dtype="bf16")
    assert full.weights / 1e9 == pytest.approx(2.60, rel=0.05)
    assert full.optimizer_states / 1e9 == pytest.approx(5.20, rel=0.05)
    assert galore.weights == full.weights
    assert galore.optimizer_states / 1e9 == pytest.approx(1.78, rel=0.05)
    projections_in_bf16 = galore.projections / 2  # flopwise keeps them in fp32
    assert (galore.optimizer_states + projections_in_bf16) / 1e9 > 1.78 * 1.15


def tiny_config():
    return load_config(None, ["model.size=tiny", "model.seq_len=64", "optim.batch_size=4"]).model.build(257)


def test_planner_takes_the_first_candidate_that_fits():
    """Candidates are tried cheapest in quality first, so the choice under a cap is the first whose peak fits
    it (a later one may need more than an earlier: bf16 weights save more here than GaLore's set)."""
    cfg = ModelConfig(vocab_size=4096, d_model=512, n_layers=8, n_heads=8, seq_len=256)
    memory = config_with().methods
    peaks = [estimate_for(cfg, 8, candidate, memory, "muon").peak for candidate in CANDIDATES]
    assert len(set(peaks)) == len(peaks) and peaks[0] == max(peaks)  # each set differs; none is the costliest
    for peak in peaks:
        for cap in (peak, peak + 1):
            index = next(i for i, needed in enumerate(peaks) if needed <= cap)
            choice = choose_methods(cfg, 8, memory, "muon", cap)
            assert choice.methods == CANDIDATES[index] and choice.estimate.peak == peaks[index]
            assert format_bytes(peaks[index]) in choice.explanation
            for tried in peaks[:index]:  # every candidate tried before is named with what it needed
                assert format_bytes(tried) in choice.explanation
    galore_only = CANDIDATES.index(("galore", "8bit", "checkpointing", "layerwise"))
    galore = choose_methods(cfg, 8, memory, "muon", min(peaks[:galore_only + 1]) - 1)
    assert "galore" in galore.methods and galore.optimizer == "adamw"
    assert "switches from muon to adamw" in galore.explanation and "bf16_weights stores" in galore.explanation
    assert "layerwise" not in choose_methods(cfg, 8, memory, "muon", peaks[2] - 1, grad_accum=2).methods


def test_planner_refuses_in_one_line_when_nothing_fits():
    cfg = tiny_config()
    sections = config_with().methods
    smallest = min(estimate_for(cfg, 4, c, sections, "muon").peak for c in CANDIDATES)
    with pytest.raises(FlopwiseError) as error:
        choose_methods(cfg, 4, sections, "muon", 1024)
    message = str(error.value)
    assert "\n" not in message and "memory.limit 1.0 KiB" in message
    assert format_bytes(smallest) in message and "smaller model" in message and "seq_len" in message


def test_memory_command_prints_the_table_and_the_choice():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", "--model", "tiny", "--batch", "2", "--memory", "2GiB",
                              "--set", "data.tokenizer=byte", "--set", "train.precision=fp32",
                              "--set", 'methods.use=["lisa"]'])
    out = io.StringIO()
    assert cmd_memory(args, Console(file=out, width=300)) == 0
    text = out.getvalue()
    for row in ("8bit, checkpointing", "galore, 8bit, checkpointing, layerwise", "lisa (configured)"):
        assert row in text
    assert "vocab 257" in text and "fits 2.00 GiB" in text
    assert "planner: memory cap 2.00 GiB: no methods (full normuon) needs" in text


def build_for_rss():
    """A model with a 32000-token vocabulary (8.3M parameters) and its AdamW, built in the child
    process of rss_step_peak: its tensors, not Python's, make the footprint."""
    _, cfg, model, optimizer, _ = build({"d_model": 256, "n_layers": 1, "n_heads": 4, "seq_len": 64}, [],
                                        vocab=32000)
    x, y = (torch.randint(0, 32000, (2, 64)) for _ in range(2))
    return model, optimizer, x, y


@pytest.mark.slow
def test_rss_of_a_step_includes_its_tensors():
    cfg = load_config(None, ["model.d_model=256", "model.n_layers=1", "model.n_heads=4", "model.seq_len=64"])
    estimate = estimate_for(cfg.model.build(32000), 2, [], cfg.methods, "adamw")
    rss = rss_step_peak(build_for_rss)
    assert 0.7 * estimate.peak < rss < 3 * estimate.peak
