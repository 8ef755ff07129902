"""The speedrun options of the decoder (docs/model.md): each changes the model, the neutral ones start as a no-op,
softcap, smear, bigram hash, lambdas and skips against computations written out here, causality, packing and
the KV cache with every option on, the counts against the model's own parameters, the optimizer's routing,
depth growth, config refusals, and real runs that train and resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flopwise.config import load_config
from flopwise.data.sampler import Batch
from flopwise.errors import FlopwiseError
from flopwise.evaluate.load import load_final_model
from flopwise.methods.grow_depth import stack_blocks
from flopwise.methods.mtp import mtp_loss, mtp_weights
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.stages.pretrain import PretrainStage
from tests.helpers import TINY, config_with, losses, resolved_with, run_error, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50
SHAPE = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "seq_len": 24}
ARCHITECTURE = {"value_embeds": True, "x0_lambdas": True, "unet_skips": True, "smear": True, "logit_softcap": 15.0,
                "bigram_hash": 97}
ALL_SETS = [f"model.{key}={str(value).lower()}" for key, value in {**ARCHITECTURE, "mtp_tokens": 2}.items()]



def model_with(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**SHAPE, **options})).eval()


@torch.no_grad()
def as_if_trained(model: GPT, seed: int = 1) -> GPT:
    """Every option parameter moved off its initial value, so that each option acts (smear and the bigram table
    start off), and the output projections off zero."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def ids(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def with_shared_weights(on: GPT, off: GPT) -> GPT:
    """``on`` with every weight it shares with ``off`` copied from it (the options' own keep their values)."""
    on.load_state_dict(off.state_dict(), strict=False)
    return on


# ---------------------------------------------------------------------------------------------
# Each option


@pytest.mark.parametrize("option, value, neutral", [
    ("smear", True, True), ("bigram_hash", 97, True), ("x0_lambdas", True, True),
    ("value_embeds", True, False), ("unet_skips", True, False), ("logit_softcap", 0.5, False),
])
def test_each_option_changes_the_logits_and_the_neutral_ones_start_as_a_no_op(option, value, neutral):
    off = as_if_trained(model_with())
    on = with_shared_weights(model_with(seed=3, **{option: value}), off)
    idx = ids(2, 24)
    with torch.no_grad():
        plain, fresh = off.logits(idx), on.logits(idx)
        if neutral:  # smear_lambda 0, a zero bigram table, lambdas (1, 0): the sources start them off
            assert torch.equal(fresh, plain)
            as_if_trained(on, seed=4)
            with_shared_weights(on, off)
            fresh = on.logits(idx)
    assert (fresh - plain).abs().max() > 1e-3


def test_softcap_is_c_tanh_of_the_logits_over_c():
    off = as_if_trained(model_with())
    on = with_shared_weights(model_with(logit_softcap=2.0), off)
    idx = ids(2, 24)
    with torch.no_grad():
        expected = 2.0 * torch.tanh(off.logits(idx).double() / 2.0)
        capped = on.logits(idx)
    assert capped.dtype == torch.float32 and capped.abs().max() < 2.0
    torch.testing.assert_close(capped.double(), expected, rtol=1e-5, atol=1e-6)


def first_block_input(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model.logits(idx)
    handle.remove()
    return seen[0][0].double()


def test_smear_adds_a_gated_share_of_the_previous_tokens_embedding():
    model = as_if_trained(model_with(smear=True))
    idx = ids(1, 24)[0]
    table, w, lam = (t.detach().double() for t in (model.embed_tokens.weight, model.smear_gate[0], model.smear_lambda))
    expected = []
    for t, token in enumerate(idx.tolist()):
        e = table[token]
        if t > 0:  # x_t + lambda * sigmoid(x_t[:24] . w) * x_(t-1); the first token has no previous one
            gate = lam[0] * (1 / (1 + torch.exp(-(e[:24] * w).sum())))
            e = e + gate * table[idx[t - 1]]
        expected.append(e)
    torch.testing.assert_close(first_block_input(model, idx[None]), torch.stack(expected), rtol=1e-6, atol=1e-6)


def test_bigram_hash_adds_the_row_of_each_previous_token_pair():
    rows = 97
    model = as_if_trained(model_with(bigram_hash=rows))
    idx = ids(1, 24)[0].tolist()
    table, bigrams = model.embed_tokens.weight.detach().double(), model.bigram_embed.weight.detach().double()
    expected = []
    for t, token in enumerate(idx):  # the record's hash: position 0 takes the reserved last row
        row = rows - 1 if t == 0 else ((36313 * token) ^ (27191 * idx[t - 1])) % (rows - 1)
        expected.append(table[token] + bigrams[row])
    torch.testing.assert_close(first_block_input(model, torch.tensor([idx])), torch.stack(expected),
                               rtol=1e-6, atol=1e-6)


def test_lambdas_mix_x0_back_in_and_unet_skips_add_the_mirror_layers_output():
    model = as_if_trained(model_with(x0_lambdas=True, unet_skips=True))
    inputs, outputs = [], []
    for layer in model.layers:
        layer.input_layernorm.register_forward_pre_hook(lambda module, args: inputs.append(args[0].double()))
        layer.register_forward_hook(lambda module, args, output: outputs.append(output.double()))
    x0 = first_block_input(model, ids(1, 24))
    with torch.no_grad():
        model.logits(ids(1, 24))
    inputs, outputs = inputs[-4:], outputs[-4:]
    for layer, block in enumerate(model.layers):  # 4 layers: 2 and 3 add the outputs of 1 and 0
        x = x0 if layer == 0 else outputs[layer - 1][0]
        if layer >= 2:
            x = x + block.skip_weight.double() * outputs[3 - layer][0]
        lambdas = block.lambdas.detach().double()
        torch.testing.assert_close(inputs[layer][0], lambdas[0] * x + lambdas[1] * x0, rtol=1e-6, atol=1e-6)
    assert [block.skip_weight is not None for block in model.layers] == [False, False, True, True]
    assert [ModelConfig(**{**SHAPE, "n_layers": 5, "unet_skips": True}).skip_source(i) for i in range(5)] \
        == [None, None, None, 1, 0]


def test_value_embeddings_sit_on_every_other_layer_ending_with_the_last_with_gates_near_1_5():
    for n_layers, expected in ((4, [1, 3]), (5, [0, 2, 4])):
        model = model_with(value_embeds=True, n_layers=n_layers)
        assert [i for i, b in enumerate(model.layers) if b.self_attn.value_embed is not None] == expected
    gate = model.layers[0].self_attn.value_gate
    assert gate.shape == (2, 12) and 0 <= gate.min() and gate.max() <= 0.02  # nanochat's U(0, 0.02)


# ---------------------------------------------------------------------------------------------
# Every option on


def test_causal_with_every_option_on():
    model = as_if_trained(model_with(**ARCHITECTURE))
    idx = ids(2, 24)
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % VOCAB
    with torch.no_grad():
        before, after = model.logits(idx), model.logits(changed)
    assert torch.equal(before[:, :11], after[:, :11])
    assert not torch.allclose(before[:, 11:], after[:, 11:])


def test_a_packed_sequence_gets_the_logits_it_gets_alone_with_every_option_on():
    """Smear and the bigram hash must not look back across a sequence start, as attention must not."""
    model = as_if_trained(model_with(**ARCHITECTURE))
    lengths = [7, 5, 12]
    sequences = [ids(n, seed=10 + n) for n in lengths]
    idx = torch.cat(sequences)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model.logits(idx, segments=segments)[0]
        alone = torch.cat([model.logits(s[None])[0] for s in sequences])
        unpacked = model.logits(idx)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unpacked[7:], alone[7:], atol=1e-3)


def test_kv_cache_equals_the_full_forward_with_every_option_on():
    model = as_if_trained(model_with(**ARCHITECTURE))
    idx = ids(3, 20)
    caches = model.new_cache(3)
    with torch.no_grad():
        full = model.logits(idx)
        prefix = model.logits(idx[:, :6], caches)
        steps = [model.logits(idx[:, i:i + 1], caches) for i in range(6, 14)]
        chunk = model.logits(idx[:, 14:], caches)  # several new tokens after a cache
        context = model.new_cache(1)
        model.logits(idx[:1, :9], context)
        continued = model.logits(idx[:1, 9:].expand(4, -1), [cache.repeat(4) for cache in context])
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(continued, full[:1, 9:].expand(4, -1, -1), rtol=1e-5, atol=1e-5)
    produced = model.generate(idx[:1, :5], 10, temperature=0)[0, 5:].tolist()
    window = idx[:1, :5]
    for token in produced:  # greedy by recomputing the whole window (all within the context)
        with torch.no_grad():
            assert int(model.logits(window)[0, -1].argmax()) == token
        window = torch.cat((window, torch.tensor([[token]])), dim=1)


@pytest.mark.parametrize("shape", [
    {}, {"tie_embeddings": False, "n_layers": 5}, {"n_kv_heads": None, "n_layers": 3, "d_model": 16, "n_heads": 2},
    {"mlp": "gelu", "norm": "layer", "bias": True, "positions": "learned", "n_layers": 2},
])
def test_counts_equal_the_models_own_parameters(shape):
    cfg = ModelConfig(**{**SHAPE, **ARCHITECTURE, **shape})
    model = GPT(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    lookups = [model.embed_tokens.weight, model.bigram_embed.weight, *(b.self_attn.value_embed for b in model.layers
                                                                       if b.self_attn.value_embed is not None)]
    lookups += [model.embed_positions.weight] if model.embed_positions is not None else []
    assert counts["embedding"] == sum(p.numel() for p in lookups)
    # matmuls, counted from the modules as nanochat's num_matmul_params does: every Linear, the gates, the head
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += sum(p.numel() for name, p in model.named_parameters() if name.endswith("_gate"))
    matmul += model.head_weight.numel() if model.lm_head is None else 0
    attention = 12 * cfg.n_layers * cfg.attn_dim * cfg.seq_len
    assert flops_per_token(cfg) == 6 * matmul + attention


def test_muon_gets_only_the_blocks_linear_weights_with_every_option_on():
    config = config_with([], "optim.name=muon")
    model = model_with(**ARCHITECTURE)
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    muon = {id(p) for group in optimizer.param_groups if group.get("update") == "muon" for p in group["params"]}
    linears = {id(m.weight) for m in model.layers.modules() if isinstance(m, nn.Linear)}
    assert muon == linears
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    option_params = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in
                     ("value_embed", "value_gate", "lambdas", "skip_weight", "smear_gate", "smear_lambda")]
    assert len(option_params) == 2 * 2 + 4 + 2 + 2 and not decayed & {id(p) for p in option_params}


@pytest.mark.parametrize("n_layers, factor", [(4, 2), (6, 2), (6, 3)])
def test_depth_growth_keeps_the_function_with_every_option_on(n_layers, factor):
    model = as_if_trained(model_with(n_layers=n_layers, **ARCHITECTURE))
    model.depth = n_layers // factor
    optimizer = torch.optim.AdamW(model.parameters())
    idx = ids(2, 24)
    with torch.no_grad():
        before = model.logits(idx)
    stack_blocks(model, optimizer, n_layers, function_preserving=True)
    with torch.no_grad():
        after = model.logits(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for layer in range(n_layers // factor, n_layers):
        block, source = model.layers[layer], model.layers[layer % (n_layers // factor)]
        assert block.lambdas.tolist() == [1.0, 0.0] and (block.skip_weight is None or block.skip_weight == 0)
        if block.self_attn.value_embed is not None and source.self_attn.value_embed is not None:
            assert torch.equal(block.self_attn.value_embed, source.self_attn.value_embed)


def test_plain_stacking_copies_by_name_with_every_option_on():
    model = as_if_trained(model_with(n_layers=6, **ARCHITECTURE))
    model.depth = 3
    initial = model.layers[3].self_attn.value_embed.clone()  # its source, block 0, has none
    stack_blocks(model, torch.optim.AdamW(model.parameters()), 6)
    assert torch.equal(model.layers[3].self_attn.value_embed, initial)
    assert torch.equal(model.layers[5].lambdas, model.layers[2].lambdas)
    assert torch.equal(model.layers[4].self_attn.q_proj.weight, model.layers[1].self_attn.q_proj.weight)


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("setting, says", [
    ("model.bigram_hash=-1", "model.bigram_hash=-1: must be a whole number >= 0"),
    ("model.logit_softcap=-1", "model.logit_softcap=-1: must be a finite number >= 0"),
    ("model.mtp_tokens=-1", "model.mtp_tokens=-1: must be a whole number >= 0"),
    ("model.mtp_weight=0", "model.mtp_weight=0: must be positive"),
])
def test_a_bad_option_value_is_refused_in_one_line_naming_the_key(setting, says):
    with pytest.raises(FlopwiseError) as error:
        load_config(None, [setting])
    assert says in str(error.value) and "\n" not in str(error.value)


def test_shape_refusals_name_the_key_and_the_fix(tmp_path, capsys):
    for fields, says in (({"bigram_hash": 1}, "model.bigram_hash=1 leaves no row"),
                         ({"mtp_tokens": 24}, "model.mtp_tokens=24 must be below model.seq_len=24"),
                         ({"logit_softcap": float("inf")}, "model.logit_softcap=inf must be a finite number"),
                         ({"smear": 1}, "model.smear=1 must be true or false")):
        with pytest.raises(FlopwiseError) as error:
            ModelConfig.from_dict({**SHAPE, **fields}).validate()
        assert str(error.value).startswith(says) and "\n" not in str(error.value)
    error = run_error(capsys, ["train", "--tokenizer", "byte", "--set", "model.bigram_hash=1", "--out", str(tmp_path)])
    assert "model.bigram_hash=1 leaves no row" in error


def test_options_are_off_by_default_and_round_trip():
    cfg = config_with().model.build(VOCAB)
    assert cfg.stock_architecture and not cfg.value_embed_layers()
    assert all(cfg.skip_source(layer) is None for layer in range(cfg.n_layers))
    on = config_with([], *ALL_SETS).model.build(VOCAB)
    assert ModelConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert not on.stock_architecture and not ModelConfig(**{**SHAPE, "mlp": "gelu"}).stock_architecture
    assert ModelConfig(**{**SHAPE, "mtp_tokens": 2}).stock_architecture  # a training loss, not the model


def test_options_cannot_be_set_with_init_from():
    config = config_with([], "model.init_from=some/model", "model.smear=true")
    with pytest.raises(FlopwiseError) as error:
        PretrainStage.check(config, None, new=True)
    assert str(error.value).startswith("model.smear cannot be set with --init-from")


# ---------------------------------------------------------------------------------------------
# Multi-token prediction


def test_mtp_weights_follow_the_records_schedule():
    # modded-nanogpt 2025-12-22: [1, 0.5, 0.25 -> 0] -> [1, 0.5 -> 0] -> [1] over thirds of the run
    for p, expected in ((0.0, [0.5, 0.25]), (1 / 6, [0.5, 0.125]), (0.5, [0.25]), (0.9, []), (1.0, [])):
        assert mtp_weights(2, 0.5, p) == pytest.approx(expected)
    assert mtp_weights(1, 0.3, 0.25) == pytest.approx([0.15]) and mtp_weights(3, 0.5, 0.8) == []


def test_mtp_loss_scores_the_same_logits_against_later_targets():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    expected = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for ahead, weight in ((1, 0.5), (2, 0.2)):
            for t in range(6 - ahead):
                expected[b] -= weight * log_probs[b, t, targets[b, t + ahead]] / 6
    torch.testing.assert_close(mtp_loss(logits, targets, [0.5, 0.2]).double(), expected)


def test_the_step_adds_mtp_while_the_logged_loss_stays_plain():
    resolved = resolved_with([], "model.mtp_tokens=2", "model.size=tiny", "model.seq_len=16",
                             "methods.progressive=false")
    assert resolved.methods == ["mtp"]
    model = GPT(resolved.model)
    stack = MethodStack(resolved.config.methods)
    stack.configure(model)
    stack.on_progress(0, 0.5)
    tokens = torch.randint(0, resolved.model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(4, dtype=torch.int64))
    loss, plain = stack.loss(model, batch, torch.device("cpu"), torch.float32)
    logits, token_losses = model(batch.inputs, batch.targets, reduction="none")
    torch.testing.assert_close(plain, token_losses.mean())
    torch.testing.assert_close(loss, (token_losses.mean(dim=1) + mtp_loss(logits, batch.targets, [0.25])).mean())
    with pytest.raises(FlopwiseError) as error:
        resolved_with(["mtp"])
    assert str(error.value).startswith("methods.use 'mtp' needs model.mtp_tokens >= 1")


# ---------------------------------------------------------------------------------------------
# Real runs


def option_args(text_folder: Path, budget: str, progressive: bool = False) -> list[str]:
    """TINY's run with every option on; ``progressive``: with the default recipe's progressive methods."""
    assert TINY[-2:] == ["--set", "methods.progressive=false"]
    tiny = TINY[:-2] if progressive else TINY
    return [*tiny, "--data", str(text_folder), "--budget", budget, *[a for s in ALL_SETS for a in ("--set", s)]]


def test_a_short_run_with_every_option_trains_and_its_model_generates(tmp_path, text_folder):
    run = tmp_path / "run"
    assert train(*option_args(text_folder, "4steps"), "--out", str(run)) == 0
    curve = [loss for _, loss in losses(run)]
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert 'use = ["mtp"]' in (run / "config.toml").read_text()  # implied by model.mtp_tokens
    model, _ = load_final_model(run, torch.device("cpu"))
    assert model.config.smear and model.config.bigram_hash == 97 and model.smear_lambda.item() != 0
    assert model.generate(torch.tensor([[10, 20, 30]]), 5, temperature=0).shape == (1, 8)


@pytest.mark.slow
def test_a_run_with_every_option_resumes_bit_for_bit_across_depth_growth(tmp_path, text_folder):
    """The default recipe's progressive methods on (depth growth at 3/4 of the budget), MTP's weights fading."""
    args = option_args(text_folder, "12steps", progressive=True)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "5steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)  # bit for bit across the interruption
    assert "grow_depth" in (full / "config.toml").read_text()
