"""Structured width pruning (methods.use prune_width, flopwise/methods/width.py): its importance scores against a
hand-written attention and MLP, the sliced model against the big one with the pruned heads and channels zeroed, a
real run from an imported model (smaller final/ that transformers loads with equal logits, the calibration's FLOPs
metered), exact resume, and one-line refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.width import (
    KeptWidth,
    WidthPruningConfig,
    calibration_flops,
    importance,
    kept_heads,
    kept_width,
    pruned_shape,
    slice_into,
)
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder
from tests.helpers import TINY, load_hf_model, losses, resolved_with, run_error, train, train_events

VOCAB = 257


def random_model(**shape: object) -> GPT:
    """A small random model whose norm gains are off 1 (so a norm that was not copied would show)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=4, seq_len=64, **shape))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def by_hand(block: torch.nn.Module, x: torch.Tensor, rope: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(each head's output [B, T, H, D], the MLP's activation [B, T, hidden]) of one block on its input ``x``,
    written out with an explicit causal softmax (no SDPA, no hooks)."""
    attn, cfg_heads = block.self_attn, block.self_attn.n_heads
    h = block.input_layernorm(x)
    b, t, _ = h.shape
    d = attn.head_dim
    q = (h @ attn.q_proj.weight.T).view(b, t, cfg_heads, d).transpose(1, 2)
    k = (h @ attn.k_proj.weight.T).view(b, t, attn.n_kv_heads, d).transpose(1, 2)
    v = (h @ attn.v_proj.weight.T).view(b, t, attn.n_kv_heads, d).transpose(1, 2)
    q, k = rope(q, k)
    group = cfg_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    heads = (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, D]
    x = x + heads.reshape(b, t, -1) @ attn.o_proj.weight.T
    m = block.post_attention_layernorm(x)
    activation = F.silu(m @ block.mlp.gate_proj.weight.T) * (m @ block.mlp.up_proj.weight.T)
    return heads, activation


@pytest.mark.parametrize("shape", [{}, {"n_kv_heads": 2}])
def test_importance_equals_a_hand_written_forward(shape):
    model = random_model(**shape)
    windows = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))
    heads, channels = importance(model, windows, batch_size=2)  # batches of 2, 2 and 1 window
    x = model.embed_tokens(windows)
    with torch.no_grad():
        for layer, block in enumerate(model.layers):
            head_out, activation = by_hand(block, x, model.rope)
            expected_heads = head_out.norm(dim=-1).mean(dim=(0, 1))
            expected_channels = activation.abs().mean(dim=(0, 1))
            assert torch.allclose(heads[layer], expected_heads, atol=1e-5, rtol=1e-5)
            assert torch.allclose(channels[layer], expected_channels, atol=1e-5, rtol=1e-5)
            x = block(x, model.rope)


def test_kept_heads_are_the_top_ones_in_order():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])
    heads, kv = kept_heads(scores, KeptWidth(3, 3, 1), kv_heads=6)  # one query head per KV head: whole heads
    assert heads.tolist() == [1, 3, 5] and kv.tolist() == [1, 3, 5]
    heads, kv = kept_heads(scores, KeptWidth(4, 2, 1), kv_heads=2)  # GQA: two of each group of three, all KV heads
    assert heads.tolist() == [0, 1, 3, 5] and kv.tolist() == [0, 1]


def test_kept_width_and_the_pruned_shape():
    mha = ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, mlp_hidden=100)
    assert kept_width(WidthPruningConfig(heads=0.5, mlp=0.25), mha) == KeptWidth(2, 2, 25)
    small = pruned_shape(WidthPruningConfig(heads=0.5, mlp=0.25), mha)
    assert (small.n_heads, small.n_kv_heads, small.head_dim, small.hidden, small.d_model) == (2, None, 16, 25, 64)
    gqa = ModelConfig(vocab_size=VOCAB, d_model=96, n_heads=6, n_kv_heads=2)
    assert kept_width(WidthPruningConfig(heads=2 / 3, mlp=1.0), gqa) == KeptWidth(4, 2, gqa.hidden)
    assert pruned_shape(WidthPruningConfig(heads=1.0, mlp=0.5), gqa).head_size is None  # all heads: width as it was
    qwen = ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, head_size=32)  # heads wider than d_model / n_heads
    assert pruned_shape(WidthPruningConfig(heads=1.0, mlp=0.5), qwen).head_size == 32
    assert pruned_shape(WidthPruningConfig(heads=0.5, mlp=0.5), qwen).head_size is None  # 2 x 32 spans d_model again
    defaults = WidthPruningConfig()  # Minitron-4B from Nemotron-4 15B: 32 of 48 heads (8 KV groups), MLP 9216/24576
    nemotron = ModelConfig(vocab_size=VOCAB, d_model=6144, n_heads=48, n_kv_heads=8, mlp_hidden=24576)
    assert kept_width(defaults, nemotron) == KeptWidth(32, 8, 9216)


@pytest.mark.parametrize("shape", [{}, {"n_kv_heads": 2, "qk_norm": True}, {"head_size": 8, "tie_embeddings": False}])
def test_pruned_model_equals_the_big_one_with_the_pruned_heads_and_channels_zeroed(shape):
    big = random_model(**shape)
    config = WidthPruningConfig(heads=0.5, mlp=0.5)
    small = GPT(pruned_shape(config, big.config)).eval()
    generator = torch.Generator().manual_seed(2)
    heads = [torch.rand(big.config.n_heads, generator=generator) for _ in big.layers]
    channels = [torch.rand(big.config.hidden, generator=generator) for _ in big.layers]
    kept = KeptWidth(small.config.n_heads, small.config.kv_heads, small.config.hidden)
    slice_into(big, small, heads, channels)
    masked = GPT(big.config).eval()
    masked.load_state_dict(big.state_dict())
    d = big.config.head_dim
    with torch.no_grad():
        for layer, block in enumerate(masked.layers):
            q_heads, _ = kept_heads(heads[layer], kept, big.config.kv_heads)
            dropped = sorted(set(range(big.config.n_heads)) - set(q_heads.tolist()))
            for head in dropped:
                block.self_attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
            keep = torch.zeros(big.config.hidden, dtype=torch.bool)
            keep[torch.topk(channels[layer], kept.channels).indices] = True
            block.mlp.down_proj.weight[:, ~keep] = 0
    x = torch.randint(0, VOCAB, (3, 32), generator=generator)
    with torch.no_grad():
        assert (small(x)[0] - masked(x)[0]).abs().max().item() < 1e-5
        assert (small(x)[0] - big(x)[0]).abs().max().item() > 1e-3  # pruning did change the model


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """A trained-looking (random, perturbed) GQA Qwen3-style model saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("big") / "hf"
    save_hf_folder(random_model(n_kv_heads=2, qk_norm=True), byte_tokenizer(), folder)
    return folder


def prune_args(big: Path, text_folder: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run's flags (TINY's, less the shape and tokenizer, which the imported model gives) pruning ``big``."""
    sets = ["model.seq_len=64", "optim.batch_size=4", "train.eval_tokens=512", "train.log_every=1",
            "methods.progressive=false", "methods.prune_width.calibration=8"]
    return ["--init-from", str(big), "--method", "prune_width", "--data", str(text_folder), "--out", str(out),
            *[flag for value in sets for flag in ("--set", value)], *extra]


@pytest.mark.slow
def test_a_pruned_run_trains_the_small_model_meters_the_calibration_and_exports_it(big_folder, text_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    run = tmp_path / "run"
    assert train(*prune_args(big_folder, text_folder, run, "--budget", "6steps",
                             "--set", "methods.prune_width.heads=0.5", "--set", "methods.prune_width.mlp=0.5")) == 0
    plan = json.loads((run / "plan.json").read_text())
    big = load_hf_model(big_folder, seq_len=64).config
    assert (plan["model"]["n_heads"], plan["model"]["n_kv_heads"], plan["model"]["head_size"]) == (2, 2, 12)
    assert plan["model"]["mlp_hidden"] == big.hidden // 2 and plan["export"]["architecture"] == "Qwen3ForCausalLM"
    events = train_events(run)
    calibration = calibration_flops(big, 8)
    assert events[-1]["flops"] == pytest.approx(6 * plan["flops_per_step"] + calibration, rel=1e-9)
    assert events[-1]["loss"] < events[0]["loss"]
    assert (run / "final" / "model.safetensors").stat().st_size < (big_folder / "model.safetensors").stat().st_size
    ours = load_hf_model(run / "final", seq_len=64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5


def test_a_pruned_run_starts_from_the_pruned_big_model(big_folder, text_folder, tmp_path):
    """At a learning rate of ~0 the run's final/ is the pruned big model: the stage scored and sliced it."""
    run = tmp_path / "run"
    assert train(*prune_args(big_folder, text_folder, run, "--budget", "1steps", "--set", "optim.lr=1e-12",
                             "--set", "optim.muon_lr=1e-12", "--set", "methods.prune_width.heads=0.5")) == 0
    trained = load_file(str(run / "final" / "model.safetensors"))
    original = load_file(str(big_folder / "model.safetensors"))
    assert trained["model.embed_tokens.weight"].equal(original["model.embed_tokens.weight"])
    q, big_q = trained["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    rows = {tuple(r.tolist()) for r in big_q}
    assert q.shape[0] == big_q.shape[0] // 2 and all(tuple(r.tolist()) in rows for r in q)


@pytest.mark.slow
def test_resume_of_a_pruned_run_equals_the_uninterrupted_one(big_folder, text_folder, tmp_path):
    """From its own small checkpoint: the imported big model is no longer needed (it is gone when the run resumes)."""
    full, part, big = tmp_path / "full", tmp_path / "part", tmp_path / "big"
    shutil.copytree(big_folder, big)
    assert train(*prune_args(big, text_folder, full, "--budget", "8steps")) == 0
    assert train(*prune_args(big, text_folder, part, "--budget", "8steps", "--stop-after", "4steps")) == 0
    shutil.rmtree(big)
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    assert [e["flops"] for e in train_events(part)] == [e["flops"] for e in train_events(full)]
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting,message", [
    ("methods.prune_width.heads=0", "config (defaults with --set): methods.prune_width.heads=0: must lie in (0, 1]"),
    ("methods.prune_width.mlp=1.5", "config (defaults with --set): methods.prune_width.mlp=1.5: must lie in (0, 1]"),
    ("methods.prune_width.calibration=0",
     "config (defaults with --set): methods.prune_width.calibration=0: must be a whole number >= 1"),
    ("methods.prune_width.heads=0.2", "methods.prune_width.heads=0.2 keeps 0 of the 2 query heads of each KV group: "
                                      "raise it to at least 0.5"),
    ("methods.prune_width.mlp=0.001", "methods.prune_width.mlp=0.001 keeps 0 of the 128 MLP channels: raise it to "
                                      "at least 0.00781"),
])
def test_bad_settings_are_one_line(big_folder, text_folder, tmp_path, capsys, setting, message):
    err = run_error(capsys, ["train", *prune_args(big_folder, text_folder, tmp_path / "run", "--budget", "2steps",
                                                  "--set", setting)])
    assert err == f"flopwise: error: {message}"
    assert not (tmp_path / "run").exists()


def test_pruning_without_an_imported_model_is_refused(text_folder, tmp_path, capsys):
    err = run_error(capsys, ["train", "--method", "prune_width", "--data", str(text_folder), "--budget", "2steps",
                             "--out", str(tmp_path / "run"), *TINY])
    assert err == ("flopwise: error: methods.use 'prune_width': width pruning shrinks a trained model: give "
                   "--init-from RUN/final or a HF folder")


def test_the_resolved_run_is_the_small_model(big_folder):
    """plan.json, the FLOP count and the memory estimate read the resolved shape: the pruned one."""
    resolved = resolved_with(["prune_width"], **{"model.init_from": str(big_folder), "model.seq_len": 64})
    imported = load_hf_model(big_folder, seq_len=64).config
    assert resolved.model == pruned_shape(WidthPruningConfig(), imported)
    assert count_parameters(resolved.model)["total"] < count_parameters(imported)["total"]
    plain = resolved_with([], **{"model.init_from": str(big_folder), "model.seq_len": 64})
    assert plain.model == imported  # no method, no change


def test_an_unfillable_shape_change_is_refused():
    from flopwise.methods.base import Calibration
    from tests.helpers import stack_of

    with pytest.raises(FlopwiseError, match="no method in methods.use"):
        stack_of(["z_loss"]).fill_from(random_model(), random_model(), Calibration(torch.zeros(1, 4).long(), 1))
