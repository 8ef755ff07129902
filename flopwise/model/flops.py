"""Parameter and FLOP counts from a ModelConfig's shapes alone, so budgets can be planned before building a model."""

from __future__ import annotations

from flopwise.model.config import ModelConfig


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block used in matmuls: q, k, v, o projections and the MLP's two or three matrices."""
    return sum(out * inp for _, out, inp in cfg.block_linears)


def _layer_other_params(cfg: ModelConfig) -> int:
    """Norm gains (and LayerNorm biases), QK-norm gains and linear biases of one block."""
    norm = cfg.d_model * (2 if cfg.norm == "layer" and cfg.bias else 1)
    qk_norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    biases = sum(out for _, out, _ in cfg.block_linears) if cfg.bias else 0
    return 2 * norm + qk_norms + biases


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embedding (vocab*d, plus seq_len*d for learned positions), non_embedding
    (blocks, their norms and biases, and the final norm), head (0 when tied to the embedding, else
    vocab*d) and total (unique parameters, as GPT.num_parameters)."""
    d = cfg.d_model
    final_norm = d * (2 if cfg.norm == "layer" and cfg.bias else 1)
    non_embedding = cfg.n_layers * (_layer_matmul_params(cfg) + _layer_other_params(cfg)) + final_norm
    embedding = cfg.vocab_size * d + (cfg.seq_len * d if cfg.positions == "learned" else 0)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return {"embedding": embedding, "non_embedding": non_embedding, "head": head,
            "total": embedding + non_embedding + head}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token at full context, PaLM/nanoGPT convention:

        6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

    N_matmul counts every weight used in a matmul: the blocks' q/k/v/o and MLP matrices plus the vocab*d
    output head (counted whether or not it is tied, since the head matmul runs either way). Norm gains and
    the embedding lookup are excluded (no matmul). Each matmul weight costs 2 FLOPs per token forward and
    4 backward, hence 6. The second term is attention's QK^T and AV products: 2 * 2 * seq_len * n_heads *
    head_dim forward per layer (n_heads * head_dim = d_model unless head_size is set), times 3 for the
    backward; it ignores causal masking, as PaLM's MFU accounting does.
    """
    n_matmul = cfg.n_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.d_model
    return float(6 * n_matmul + 12 * cfg.n_layers * cfg.attn_dim * cfg.seq_len)


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward-only FLOPs per token (evaluation, sampling): one third of the training count."""
    return flops_per_token(cfg) / 3
