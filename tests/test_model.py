"""The decoder and its counts, checked against independent computations written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flopwise.errors import FlopwiseError
from flopwise.model import gpt
from flopwise.model.config import NAMED_SIZES, ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token, forward_flops_per_token
from flopwise.model.gpt import GPT, RotaryEmbedding

# Tied embeddings, multi-head attention, default SwiGLU width.
TIED_MHA = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, seq_len=16)
# Untied head, grouped-query attention (6 query heads sharing 2 kv heads), QK-norm, explicit MLP width.
UNTIED_GQA = ModelConfig(vocab_size=50, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, seq_len=12,
                         mlp_hidden=64, qk_norm=True, tie_embeddings=False)


def _model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def test_parameter_count_tied_mha_by_hand():
    # SwiGLU width: 8/3 * 32 = 85.33 -> 85 -> next multiple of 32 = 96.
    assert TIED_MHA.hidden == 96
    attention = 4 * 32 * 32                      # q, k, v, o: 4 * 1024 = 4096
    mlp = 3 * 32 * 96                            # gate, up, down: 9216
    norms = 2 * 32                               # input_layernorm + post_attention_layernorm: 64
    non_embedding = 2 * (attention + mlp + norms) + 32   # 2 * 13376 + final norm = 26784
    embedding = 100 * 32                         # 3200, shared with the head
    assert non_embedding == 26784
    expected = {"embedding": 3200, "non_embedding": 26784, "head": 0, "total": 29984}
    assert count_parameters(TIED_MHA) == expected
    model = _model(TIED_MHA)
    assert model.lm_head is None and model.head_weight is model.embed_tokens.weight
    assert model.num_parameters() == embedding + non_embedding == 29984
    assert sum(p.numel() for p in model.parameters()) == 29984


def test_parameter_count_untied_gqa_qk_norm_by_hand():
    head_dim = 48 // 6                           # 8
    q = o = 48 * 48                              # 2304 each
    k = v = 48 * (2 * head_dim)                  # 2 kv heads * 8 = 16 wide: 768 each
    mlp = 3 * 48 * 64                            # 9216
    norms = 2 * 48 + 2 * head_dim                # block norms 96 + q_norm/k_norm 16 = 112
    per_layer = q + k + v + o + mlp + norms      # 15472
    non_embedding = 3 * per_layer + 48           # 46416 + final norm = 46464
    assert (per_layer, non_embedding) == (15472, 46464)
    expected = {"embedding": 2400, "non_embedding": 46464, "head": 2400, "total": 2400 + 46464 + 2400}
    assert count_parameters(UNTIED_GQA) == expected
    model = _model(UNTIED_GQA)
    assert model.num_parameters() == 51264
    assert sum(p.numel() for p in model.parameters()) == 51264


def test_flops_per_token_by_hand():
    # Matmul weights: 2 layers * (4096 attention + 9216 MLP) + head 100*32 (counted though tied) = 29824.
    n_matmul = 2 * (4096 + 9216) + 3200
    attention = 12 * 2 * 32 * 16                 # 12 * n_layers * d_model * seq_len = 12288
    assert flops_per_token(TIED_MHA) == 6 * n_matmul + attention == 191232
    assert forward_flops_per_token(TIED_MHA) == pytest.approx(191232 / 3)
    # GQA: k, v are 48x16; the untied head is counted once, same as a tied one.
    n_matmul = 3 * (2 * 2304 + 2 * 768 + 9216) + 2400
    assert flops_per_token(UNTIED_GQA) == 6 * n_matmul + 12 * 3 * 48 * 12


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = _model(UNTIED_GQA)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def _reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex rotation: pair i of HF's layout is (x[i], x[i + d/2]) -> z_i * exp(j * pos * theta^(-2i/d))."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for pos in range(t):
        for i in range(half):
            angle = pos * theta ** (-2 * i / d)
            z = complex(x[..., pos, i].item(), x[..., pos, i + half].item()) * complex(math.cos(angle), math.sin(angle))
            out[..., pos, i], out[..., pos, i + half] = z.real, z.imag
    return out


def test_rope_matches_complex_rotation():
    rope = RotaryEmbedding(head_dim=8, seq_len=16, theta=10000.0)
    q = torch.randn(1, 1, 10, 8, generator=torch.Generator().manual_seed(2))
    k = torch.randn(1, 1, 10, 8, generator=torch.Generator().manual_seed(3))
    rq, rk = rope(q, k)
    torch.testing.assert_close(rq.double(), _reference_rope(q, 10000.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk.double(), _reference_rope(k, 10000.0), rtol=1e-5, atol=1e-5)
    # Buffers are derived, not saved.
    assert "cos" not in rope.state_dict() and "sin" not in rope.state_dict()


@pytest.mark.parametrize("native_gqa", [True, False])
def test_gqa_equals_mha_with_repeated_kv_heads(monkeypatch, native_gqa):
    monkeypatch.setattr(gpt, "_SDPA_HAS_GQA", native_gqa and gpt._SDPA_HAS_GQA)
    mha_cfg = ModelConfig(**{**UNTIED_GQA.to_dict(), "n_kv_heads": None})
    gqa, mha = _model(UNTIED_GQA), _model(mha_cfg, seed=5)
    groups, head_dim = 6 // 2, 8
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(2, head_dim, 48).repeat_interleave(groups, dim=0).reshape(6 * head_dim, 48)
        state[name] = w
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])


def test_loss_is_cross_entropy_of_logits():
    model = _model(TIED_MHA)
    gen = torch.Generator().manual_seed(6)
    idx, targets = torch.randint(0, 100, (3, 10), generator=gen), torch.randint(0, 100, (3, 10), generator=gen)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 100)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1)))
    per_token = model.per_token_loss(idx, targets)
    assert per_token.shape == (3, 10)
    torch.testing.assert_close(per_token[1, 4], F.cross_entropy(logits[1, 4], targets[1, 4]))
    torch.testing.assert_close(per_token.mean(), loss)
    assert model(idx)[1] is None


def test_init_scales_residual_outputs_and_keeps_norms_at_one():
    model = _model(ModelConfig(vocab_size=64, d_model=256, n_layers=8, n_heads=4, seq_len=8))
    layer = model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def _one_line_error(cfg_or_call) -> str:
    with pytest.raises(FlopwiseError) as info:
        cfg_or_call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_config_errors_are_one_line_with_the_fix():
    message = _one_line_error(lambda: ModelConfig(vocab_size=10, d_model=256, n_heads=3).validate())
    assert message.startswith("model.n_heads=3 does not divide model.d_model=256")
    assert message.endswith("choose n_heads among 1, 2, 4, 8, 16, 32")
    message = _one_line_error(lambda: ModelConfig(vocab_size=10, d_model=256, n_heads=4, n_kv_heads=3).validate())
    assert "model.n_kv_heads=3" in message and "model.n_heads=4" in message and "1, 2, 4" in message
    message = _one_line_error(lambda: GPT(ModelConfig(vocab_size=10, d_model=12, n_heads=4)))
    assert "head_dim=3" in message and "RoPE" in message
    message = _one_line_error(lambda: ModelConfig(vocab_size=0).validate())
    assert "model.vocab_size=0" in message
    message = _one_line_error(lambda: ModelConfig.from_dict({"vocab_size": 10, "d_modle": 64, "n_head": 2}))
    assert message.startswith("unknown model config key(s) d_modle, n_head: valid keys are vocab_size, d_model")


def test_config_round_trip_and_named_sizes():
    assert ModelConfig.from_dict(UNTIED_GQA.to_dict()) == UNTIED_GQA
    head_dims = {name: ModelConfig(vocab_size=256, **shape).head_dim for name, shape in NAMED_SIZES.items()}
    assert head_dims == {"tiny": 32, "small": 32, "base": 64, "medium": 64, "large": 64}
    for shape in NAMED_SIZES.values():
        ModelConfig(vocab_size=256, **shape).validate()


def test_tiny_model_overfits_one_batch():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=32)
    model = _model(cfg).train()
    gen = torch.Generator().manual_seed(7)
    idx, targets = torch.randint(0, 64, (4, 32), generator=gen), torch.randint(0, 64, (4, 32), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        _, loss = model(idx, targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(idx, targets)[1].item() < 0.5 * first


def test_generate_shape_and_greedy_determinism():
    model = _model(TIED_MHA)
    prompt = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    a = model.generate(prompt, 12, top_k=1)        # runs past seq_len=16: the context is cropped
    torch.manual_seed(1)
    b = model.generate(prompt, 12, top_k=1)
    assert a.shape == (2, 22)
    assert torch.equal(a[:, :10], prompt) and torch.equal(a, b)
    with torch.no_grad():
        first = model(prompt)[0][:, -1].argmax(-1)
    assert torch.equal(a[:, 10], first)
    sampled = model.generate(prompt, 5, temperature=0.8, top_k=5)
    assert sampled.shape == (2, 15) and int(sampled.max()) < 100
