"""LLaMA-style decoder-only transformer.

Module and weight names follow Hugging Face `LlamaForCausalLM` (embed_tokens, layers.N.self_attn.q_proj,
mlp.gate_proj, input_layernorm, norm, lm_head, ...) and RoPE uses its rotate-half layout, so an export is a
rename (add the "model." prefix) and gives the same logits. QK-norm modules are named q_norm/k_norm as in Qwen3.

The speedrun options (ModelConfig's value_embeds, x0_lambdas, unet_skips, smear, logit_softcap, bigram_hash;
docs/model.md) add parameters that stock Llama lacks.  Their gates, tables and scalars are plain Parameters
named without ".weight" (``value_embed``, ``value_gate``, ``lambdas``, ``skip_weight``, ``smear_gate``...): no
method that swaps a block's Linears (LoRA, SLTrain, QAT, fp8) touches them, and the optimizer gives them to
AdamW, never to Muon.  This module depends on torch and ModelConfig only, so an export can carry it as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# relative: an exported model folder carries gpt.py and config.py without flopwise
from .config import SMEAR_CHANNELS, VALUE_GATE_CHANNELS, ModelConfig

# `enable_gqa` arrived in torch 2.5; older versions get the kv heads repeated by hand.
_SDPA_HAS_GQA = torch.__version__ >= "2.5"


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the gain, as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if hasattr(F, "rms_norm"):
            h = F.rms_norm(h, (h.shape[-1],), eps=self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that computes in its input's dtype: outside autocast a weight stored in another dtype
    (bf16 weights, methods.use bf16_weights) is upcast per call (``linear``), so bf16-stored weights can
    compute in fp32 on CPUs without fast bf16.  Under autocast, autocast casts both, as for any nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in ``x``'s dtype.  A weight (and bias) stored in a lower precision is upcast for the
    matmul, and upcast again in backward rather than kept: backward keeps the stored weight itself, so
    bf16 weights save their memory under fp32 compute too.  Under autocast, F.linear as it is."""
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    return _UpcastLinear.apply(x, weight, bias)


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W (and b) upcast to x's dtype; gradients returned in W's and b's own dtypes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = (rows.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """RMSNorm (LLaMA), or LayerNorm (GPT-2) with a bias when the model has biases."""
    if cfg.norm == "layer":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(dim, cfg.norm_eps)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables in HF's layout: frequencies duplicated across both halves of head_dim."""

    def __init__(self, head_dim: int, seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int = 0,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k of shape [B, H, T, head_dim] by their positions start..start+T-1, or by ``positions``
        [B, T] (packed sequences, each counted from 0)."""
        t = q.shape[-2]
        if positions is None:
            cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        else:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention on SDPA (flash kernels on GPU), optional QK-norm before RoPE, and on the
    layers ``ModelConfig.value_embed_layers`` names a gated value embedding (below)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.attn_dim, bias=cfg.bias)
        self.k_proj = Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.attn_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        has_value_embed = layer in cfg.value_embed_layers()
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.value_embed = nn.Parameter(torch.empty(cfg.vocab_size, kv_dim)) if has_value_embed else None
        channels = min(VALUE_GATE_CHANNELS, cfg.d_model)
        self.value_gate = nn.Parameter(torch.empty(cfg.kv_heads, channels)) if has_value_embed else None

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, cache: LayerCache | None = None,
                packing: Packing | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.value_embed is not None:
            v = v + self.gated_value_embedding(x, idx, v.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        start = cache.length if cache is not None else 0
        if rope is not None:
            q, k = rope(q, k, start, packing.positions if packing is not None else None)
        if cache is not None:
            k, v = cache.extend(k, v)
        # A prompt attends causally; a single new token attends to everything cached before it; several
        # new tokens after a cache (a continuation scored after its shared context) attend to the cache
        # and causally among themselves.
        y = _attend(q, k, v, causal=t > 1, groups=self.n_heads // self.n_kv_heads, offset=start,
                    mask=packing.mask if packing is not None else None)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def gated_value_embedding(self, x: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the value embedding adds to v [B, T, kv_heads, head_dim] (in v's ``dtype``): a per-token table
        row (ResFormer's value residual, Zhou et al. 2024, as a token embedding: modded-nanogpt's 2024-12-04
        ValueEmbed record) times a gate per kv head, 3 * sigmoid(x[..., :12] W^T) in (0, 3), read from the
        block's normalized input (nanochat, nanochat/gpt.py ``ve_gate``).  It depends on the token and the
        position's own input alone, so cached values stay right."""
        b, t, _ = x.shape
        gate = 3 * torch.sigmoid(linear(x[..., :self.value_gate.shape[1]], self.value_gate))
        rows = F.embedding(idx, self.value_embed).to(dtype).view(b, t, self.n_kv_heads, self.head_dim)
        return gate.unsqueeze(-1) * rows


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, groups: int,
            offset: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA; with ``offset`` cached positions before the queries, causal is aligned to the bottom right (query
    i sees keys up to offset + i), which SDPA's own is_causal (aligned top left) does not do.  A ``mask``
    (packed sequences: causal within each, nothing across) replaces the causal rule."""
    if mask is not None:
        causal = False
    elif causal and offset:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=offset)
        causal = False
    if groups > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        groups = 1
    extra = {"enable_gqa": True} if groups > 1 else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)


@dataclass(frozen=True)
class Packing:
    """Several sequences packed in each row of a window: each token's position within its own sequence, the
    attention mask [B, 1, T, T] that lets a token see only the earlier tokens of its sequence, and where each
    sequence starts [B, T] (smear and the bigram hash look back one token, never across a start)."""

    positions: torch.Tensor
    mask: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def of(cls, segments: torch.Tensor) -> Packing:
        """From sequence ids [B, T] (each sequence's tokens contiguous)."""
        t = segments.shape[1]
        index = torch.arange(t, device=segments.device).expand_as(segments)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        same = segments[:, :, None] == segments[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
        return cls(positions=index - first, mask=(same & causal).unsqueeze(1), starts=starts)


class LayerCache:
    """One layer's keys and values for incremental decoding, preallocated for ``capacity`` positions."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device) -> None:
        self.shape, self.device = shape, device
        self.length = 0
        # The token at the last cached position [B, 1]: the one the next token's smear and bigram hash look back
        # to.  GPT.logits keeps it in the first layer's cache.
        self.last_token: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, kv_heads, T, head_dim] keys/values; return all of them so far.  The cache takes
        the dtype of the first keys: the compute dtype, which may differ from the weights'."""
        if self.length == 0:
            self.keys = torch.empty(self.shape, device=self.device, dtype=k.dtype)
            self.values = torch.empty(self.shape, device=self.device, dtype=v.dtype)
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def repeat(self, batch: int) -> LayerCache:
        """A cache of ``batch`` rows, each a copy of this one's first row: one context continued several ways."""
        copy = LayerCache((batch, *self.shape[1:]), self.device)
        copy.keys = self.keys[:1].repeat(batch, 1, 1, 1)
        copy.values = self.values[:1].repeat(batch, 1, 1, 1)
        copy.length = self.length
        copy.last_token = None if self.last_token is None else self.last_token[:1].repeat(batch, 1)
        return copy


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)) (LLaMA); or down(act(up(x))) with GELU (GPT-2) or ReLU²
    (So et al. 2021, Primer; the modded-nanoGPT speedrun's choice)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.gate_proj = Linear(cfg.d_model, cfg.hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.up_proj = Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.down_proj = Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(F.gelu(h) if self.kind == "gelu" else F.relu(h).square())


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Before that, with unet_skips a layer past the middle adds ``skip_weight`` times its mirror layer's output
    (modded-nanogpt's 2024-11-10 UNetDoubleLr record: learned weights starting at 1), and with x0_lambdas the
    input becomes lambdas[0] * x + lambdas[1] * x0, x0 being the embedding (nanochat's resid_lambdas and
    x0_lambdas; modded-nanogpt's 2024-11-06 ShortcutsTweaks record's per-block lambdas, from (1, 0): the
    identity)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.empty(2)) if cfg.x0_lambdas else None
        self.skip_weight = nn.Parameter(torch.empty(1)) if cfg.skip_source(layer) is not None else None

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, cache: LayerCache | None = None,
                packing: Packing | None = None, x0: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        """``x0``: the embedding (x0_lambdas); ``skip``: the mirror layer's output (unet_skips); ``idx``: the
        tokens (value embeddings)."""
        if self.skip_weight is not None:
            x = x + self.skip_weight * skip
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, packing, idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    """The decoder: token (and, GPT-2 style, learned position) embedding, n_layers blocks, final norm,
    (tied) output head; and the speedrun options the config turns on (docs/model.md)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.bigram_embed = nn.Embedding(cfg.bigram_hash, cfg.d_model) if cfg.bigram_hash else None
        self.smear_gate = nn.Parameter(torch.empty(1, min(SMEAR_CHANNELS, cfg.d_model))) if cfg.smear else None
        self.smear_lambda = nn.Parameter(torch.empty(1)) if cfg.smear else None
        self.layers = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        # A tied head reuses embed_tokens.weight rather than registering it twice, so every state dict
        # (checkpoints, FSDP shards, the HF export) holds each weight exactly once.
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.context, cfg.rope_theta) if cfg.positions == "rope" else None
        # Activation checkpointing (flopwise/methods/checkpointing.py): keep only each block's input for
        # backward and recompute the rest, trading one more forward for the activations' memory.
        self.checkpoint_blocks = False
        # Blocks the forward runs, the first ``depth`` of them: depth growth (flopwise/methods/grow_depth.py)
        # trains a shallower model first and stacks its blocks into the rest.
        self.depth = cfg.n_layers
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2*n_layers) (GPT-2) so the
        residual stream's variance does not grow with depth, or zero with zero_init_out (each block then
        starts as the identity, as in the modded-nanoGPT speedrun). Biases zero, norm gains one.  The
        options' parameters follow, as their sources start them (``_init_options``)."""
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "down_proj"))
                if is_output and cfg.zero_init_out:
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output else cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self._init_options()

    @torch.no_grad()
    def _init_options(self) -> None:
        """The speedrun options' parameters as their sources start them (drawn after every other weight, so a
        model without options draws exactly what it did before they existed):

        - value embedding tables N(0, init_std), as v_proj's weights (nanochat inits them as its c_v), and their
          gates U(0, 0.02) (nanochat): each gate starts near 3 * sigmoid(0) = 1.5;
        - lambdas (1, 0), so each block starts reading x alone (modded-nanogpt 2024-11-06);
        - U-net skip weights 1 (modded-nanogpt 2024-11-10);
        - smear_lambda 0, so smear starts off, and its gate U(0, 0.02) (nanochat);
        - the bigram table 0 (modded-nanogpt 2026-01-19 BigramHashEmbedding), so it starts off."""
        cfg = self.config
        for block in self.layers:
            attention = block.self_attn
            if attention.value_embed is not None:
                nn.init.normal_(attention.value_embed, mean=0.0, std=cfg.init_std)
                nn.init.uniform_(attention.value_gate, 0.0, 0.02)
            if block.lambdas is not None:
                block.lambdas.copy_(torch.tensor([1.0, 0.0]))
            if block.skip_weight is not None:
                nn.init.ones_(block.skip_weight)
        if self.smear_gate is not None:
            nn.init.zeros_(self.smear_lambda)
            nn.init.uniform_(self.smear_gate, 0.0, 0.02)
        if self.bigram_embed is not None:
            nn.init.zeros_(self.bigram_embed.weight)

    def logits(self, idx: torch.Tensor, caches: list[LayerCache] | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of idx [B, T]; with ``caches``, after the positions they hold (and extending them);
        with ``segments`` [B, T] (a packed window's sequence ids, each sequence contiguous), each sequence as if
        alone: attending only within itself, its positions counted from 0."""
        start = caches[0].length if caches else 0
        end = start + idx.shape[1]
        if end > self.config.context:
            raise ValueError(f"sequence length {end} exceeds the model's context of {self.config.context}")
        packing = Packing.of(segments) if segments is not None else None
        x = self.embed_tokens(idx).float()  # the residual stream is fp32, whatever the weights' dtype
        if self.smear_gate is not None or self.bigram_embed is not None:
            previous, first = self._previous_tokens(idx, caches, packing)
            if self.smear_gate is not None:
                x = self._smear(x, previous, first)
            if self.bigram_embed is not None:
                x = x + self.bigram_embed(bigram_hash(idx, previous, first, self.config.bigram_hash))
        if caches:
            caches[0].last_token = idx[:, -1:]
        if self.embed_positions is not None:
            positions = packing.positions if packing is not None else torch.arange(start, end, device=idx.device)
            x = x + self.embed_positions(positions)
        x0 = x if self.config.x0_lambdas else None
        outputs: dict[int, torch.Tensor] = {}  # the encoder layers' outputs the U-net skips read
        recompute = self.checkpoint_blocks and self.training and not caches and torch.is_grad_enabled()
        for i, layer in zip(range(self.depth), self.layers):
            source = self.config.skip_source(i)
            skip = outputs.pop(source) if source is not None else None
            if recompute:
                x = checkpoint(layer, x, self.rope, None, packing, x0, skip, idx, use_reentrant=False)
            else:
                x = layer(x, self.rope, caches[i] if caches else None, packing, x0, skip, idx)
            if self.config.unet_skips and i < self.config.n_layers // 2:
                outputs[i] = x
        logits = linear(self.norm(x), self.head_weight)
        cap = self.config.logit_softcap
        if cap:  # in fp32 (nanochat); modded-nanogpt's 2024-11-06 record, 30, lowered to 15 on 2025-01-04
            logits = (logits.float() / cap).tanh_() * cap  # in place: one logit-sized temporary fewer
        return logits

    def _previous_tokens(self, idx: torch.Tensor, caches: list[LayerCache] | None,
                         packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the token before each position [B, T], whether the position starts a sequence [B, T]).  A window
        starts one, as does each packed sequence; after a cache, the first token's previous one is the last
        cached token.  At a start the previous token is a placeholder (the token itself) that nothing reads."""
        last = caches[0].last_token if caches and caches[0].length else None
        previous = torch.cat((idx[:, :1] if last is None else last, idx[:, :-1]), dim=1)
        first = packing.starts.clone() if packing is not None else torch.zeros_like(idx, dtype=torch.bool)
        if last is None:
            first[:, 0] = True
        return previous, first

    def _smear(self, x: torch.Tensor, previous: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Each token's embedding plus a gated share of the previous token's (nanochat's smear, nanochat/gpt.py;
        modded-nanogpt's 2025-09-18 Smear record): x_t + smear_lambda * sigmoid(x_t[:24] . w) * x_(t-1), nothing
        at a sequence's first token.  One token of look-back from the first step, which induction heads need."""
        gate = self.smear_lambda * torch.sigmoid(linear(x[..., :self.smear_gate.shape[1]], self.smear_gate))
        before = self.embed_tokens(previous).float().masked_fill(first.unsqueeze(-1), 0.0)
        return x + gate * before

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection: the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, vocab] and, with targets, the cross-entropy on fp32 logits: the mean, or each
        token's [B, T] with reduction="none"; ``segments`` as in ``logits``."""
        logits = self.logits(idx, segments=segments)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
        return logits, loss if reduction != "none" else loss.view(targets.shape)

    def per_token_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target token [B, T], for evaluation by domain and by byte.  It goes
        through __call__, so wrappers' forward hooks (FSDP's unsharding) run."""
        return self(idx, targets, reduction="none")[1]

    def new_cache(self, batch: int) -> list[LayerCache]:
        """Empty key/value caches for the whole context, on the device of the weights."""
        cfg = self.config
        shape = (batch, cfg.kv_heads, cfg.context, cfg.head_dim)
        return [LayerCache(shape, self.embed_tokens.weight.device) for _ in range(cfg.n_layers)]

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens sampled tokens [B, 1] one at a time, continuing idx [B, T].

        A KV cache makes each new token cost one position instead of the whole context.  When the
        context is full, the cache is rebuilt from the last half of it (a sliding window in two halves).
        """
        context = self.config.context
        caches = self.new_cache(idx.shape[0])
        window = idx[:, -context:]
        logits = self.logits(window, caches)[:, -1]
        for produced in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            if produced + 1 == max_new_tokens:
                return
            window = torch.cat((window, token), dim=1)
            if caches[0].length == context:
                window = window[:, -(context // 2):]
                caches = self.new_cache(idx.shape[0])
                logits = self.logits(window, caches)[:, -1]
            else:
                logits = self.logits(token, caches)[:, -1]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """idx [B, T] followed by max_new_tokens sampled tokens (temperature 0: greedy)."""
        tokens = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator))
        return torch.cat((idx, *tokens), dim=1)

    def store_matrices_in(self, dtype: torch.dtype) -> None:
        """Keep every matrix (embeddings, head, the blocks' Linears) in ``dtype``; norm gains and biases
        stay as they are (bf16 weights, flopwise/methods/bf16_weights.py)."""
        for param in self.parameters():
            if param.ndim >= 2:
                param.data = param.data.to(dtype)

    def num_parameters(self) -> int:
        """Unique parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())


# The bigram hash's multipliers (modded-nanogpt's 2026-01-19 BigramHashEmbedding record, ``get_bigram_hash``):
# large odd integers that spread (previous, current) pairs over the table.
BIGRAM_MULTIPLIERS = (36313, 27191)


def bigram_hash(idx: torch.Tensor, previous: torch.Tensor, first: torch.Tensor, rows: int) -> torch.Tensor:
    """The bigram table's row for each position [B, T]: (36313 * token XOR 27191 * previous token) mod (rows - 1),
    and the last row, rows - 1, at a sequence's first token, which has no previous token (the record's rule for
    position 0, here also for every packed sequence's start)."""
    current, before = BIGRAM_MULTIPLIERS
    mixed = torch.bitwise_xor(current * idx, before * previous) % (rows - 1)
    return mixed.masked_fill(first, rows - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, vocab]: greedy at temperature 0, else drawn from filter_logits."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(F.softmax(filtered, dim=-1), num_samples=1, generator=generator)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature-scaled logits with -inf outside the top_k tokens and then outside the smallest set
    whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020), in Hugging Face's order."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits
