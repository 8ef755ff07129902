"""Parameter and FLOP counts from a ModelConfig's shapes alone, so budgets can be planned before building a model."""

from __future__ import annotations

from flopwise.model.config import SMEAR_CHANNELS, VALUE_GATE_CHANNELS, ModelConfig


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block used in matmuls: q, k, v, o projections and the MLP's two or three matrices."""
    return sum(out * inp for _, out, inp in cfg.block_linears)


def block_matmul_parameters(cfg: ModelConfig) -> int:
    """Weights of all blocks' Linears: what pruning (flopwise/methods/prune.py) may zero."""
    return cfg.n_layers * _layer_matmul_params(cfg)


def _option_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the options' own matmuls, all layers: each value-embedding gate (kv_heads x 12) and the smear
    gate (1 x 24).  Multi-token prediction adds none: it scores the same logits against later targets."""
    value_gates = len(cfg.value_embed_layers()) * cfg.kv_heads * min(VALUE_GATE_CHANNELS, cfg.d_model)
    return value_gates + (min(SMEAR_CHANNELS, cfg.d_model) if cfg.smear else 0)


def _option_embedding_params(cfg: ModelConfig) -> int:
    """The options' lookup tables: a vocab x kv_dim value embedding per value-embedding layer, and the bigram
    table (bigram_hash x d_model)."""
    value_embeds = len(cfg.value_embed_layers()) * cfg.vocab_size * cfg.kv_heads * cfg.head_dim
    return value_embeds + cfg.bigram_hash * cfg.d_model


def _option_scalars(cfg: ModelConfig) -> int:
    """The options' scalars: two lambdas per block, a skip weight per U-net skip, smear's lambda."""
    lambdas = 2 * cfg.n_layers if cfg.x0_lambdas else 0
    skips = sum(cfg.skip_source(layer) is not None for layer in range(cfg.n_layers))
    return lambdas + skips + (1 if cfg.smear else 0)


def _layer_other_params(cfg: ModelConfig) -> int:
    """Norm gains (and LayerNorm biases), QK-norm gains and linear biases of one block."""
    norm = cfg.d_model * (2 if cfg.norm == "layer" and cfg.bias else 1)
    qk_norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    biases = sum(out for _, out, _ in cfg.block_linears) if cfg.bias else 0
    return 2 * norm + qk_norms + biases


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embedding (vocab*d, plus seq_len*d for learned positions, and the options' lookup
    tables: value embeddings and the bigram table), non_embedding (blocks, their norms and biases, the final
    norm, and the options' gates and scalars), head (0 when tied to the embedding, else vocab*d) and total
    (unique parameters, as GPT.num_parameters)."""
    d = cfg.d_model
    final_norm = d * (2 if cfg.norm == "layer" and cfg.bias else 1)
    non_embedding = (cfg.n_layers * (_layer_matmul_params(cfg) + _layer_other_params(cfg)) + final_norm
                     + _option_matmul_params(cfg) + _option_scalars(cfg))
    embedding = (cfg.vocab_size * d + (cfg.seq_len * d if cfg.positions == "learned" else 0)
                 + _option_embedding_params(cfg))
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return {"embedding": embedding, "non_embedding": non_embedding, "head": head,
            "total": embedding + non_embedding + head}


def flops_per_token(cfg: ModelConfig, block_sparsity: float = 0.0) -> float:
    """Training FLOPs (forward + backward) per token at full context, PaLM/nanoGPT convention:

        6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

    N_matmul counts every weight used in a matmul: the blocks' q/k/v/o and MLP matrices plus the vocab*d
    output head (counted whether or not it is tied, since the head matmul runs either way), and the options'
    gates (each value-embedding gate, the smear gate). Norm gains, the embedding lookups (token, positions,
    value embeddings, bigram table) and the options' elementwise work (lambdas, U-net skips, gating products,
    the softcap's tanh, multi-token prediction's extra targets on the same logits) are excluded (no matmul),
    as the softmax is. Each matmul weight costs 2 FLOPs per token forward and 4 backward, hence 6. The second
    term is attention's QK^T and AV products: 2 * 2 * seq_len * n_heads * head_dim forward per layer (n_heads *
    head_dim = d_model unless head_size is set), times 3 for the backward; it ignores causal masking, as PaLM's
    MFU accounting does.

    ``block_sparsity``: the share of the blocks' matmul weights pruned to zero (flopwise/methods/prune.py);
    they count at their density, 6 FLOPs per nonzero weight, as the sparse-training papers count (Jin et al.
    2025, arXiv:2501.12486), although a dense kernel multiplies the zeros too.
    """
    blocks = block_matmul_parameters(cfg) * (1.0 - block_sparsity)
    n_matmul = blocks + cfg.vocab_size * cfg.d_model + _option_matmul_params(cfg)
    return float(6 * n_matmul + 12 * cfg.n_layers * cfg.attn_dim * cfg.seq_len)


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward-only FLOPs per token (evaluation, sampling): one third of the training count."""
    return flops_per_token(cfg) / 3
