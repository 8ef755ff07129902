"""From a parameter count to a concrete decoder shape: the family the planner chooses among.

Depth grows with the square root of width, ``n_layers = round(sqrt(d_model / 8))``, which
reproduces flopwise's named sizes (128 -> 4 layers, 256 -> 6, 512 -> 8) and reaches 16 layers
at d_model 2048, about where LLaMA-style 1B models sit; small models stay comparatively deep,
as MobileLLM (Liu et al. 2024) found better at small scale.  Heads are 64 wide from d_model 256
on where 64 divides it, else 32 wide.

The family is regular on purpose: a scaling law predicts loss from N alone, so members must differ
in size, not in kind.  An earlier family had widths 48, 80 and 112 with 16-wide heads, and 2-layer
models up to d_model 48; those members trained 7-15% worse than their N predicted (d112's pilots
made the law think larger models gain less than they do, and d48 half-size runs fell far behind),
so widths are now multiples of 32 with heads at least 32 wide.
"""

from __future__ import annotations

import math

from flopwise.config import ModelSection
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters

# steps of 32 up to 512, then about 1.1x apart (to 26B parameters at d_model 8192, so that a cluster's
# FLOP budget can be planned too): from d_model 128 on, neighbours differ by at most 1.9x
# in parameters (where depth steps up), mostly by 1.2-1.5x, so the best size is never far off and half
# and double any member's N have a member close by; below it, 2.4x at most (d96 -> d128)
WIDTHS = (tuple(range(32, 513, 32)) + tuple(range(576, 1025, 64)) + tuple(range(1152, 2049, 128))
          + tuple(range(2304, 4097, 256)) + tuple(range(4608, 8193, 512)))


def depth_for_width(d_model: int) -> int:
    return max(2, round(math.sqrt(d_model / 8)))


def heads_for_width(d_model: int) -> int:
    if d_model >= 256 and d_model % 64 == 0:
        return d_model // 64
    return max(1, d_model // 32)


def family_fields(d_model: int) -> dict[str, int | None]:
    """The model-section fields that make a config the family member of width ``d_model`` (KV heads
    and MLP width back to their defaults)."""
    return {"d_model": d_model, "n_layers": depth_for_width(d_model), "n_heads": heads_for_width(d_model),
            "n_kv_heads": None, "head_size": None, "mlp_hidden": None}


def family_shape(model: ModelSection, d_model: int, vocab_size: int) -> ModelConfig:
    """The family member of width ``d_model``, keeping every other choice of the config's model
    section (MLP, norm, QK-norm, tying, seq_len)."""
    return model.model_copy(update=family_fields(d_model)).build(vocab_size)


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """N of the scaling law: parameters outside the embedding and output head (Kaplan et al. 2020)."""
    return count_parameters(cfg)["non_embedding"]
