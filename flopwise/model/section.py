"""The model section of the run config (``model.*``): a named size whose shape explicit fields override."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from flopwise.model.config import MLPS, NAMED_SIZES, NORMS, POSITIONS, ModelConfig
from flopwise.section import Section, in_range


class ModelSection(Section):
    """Shape of the decoder; a named size gives defaults that explicit fields override.

    ``init_from`` (a Hugging Face model folder or hub id) takes the shape and weights from that
    model instead; only ``seq_len`` (the training context) is then chosen here."""

    size: str = "small"
    init_from: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_size: int | None = None  # one head's width (unset: d_model / n_heads; Qwen3 sets it apart)
    seq_len: int | None = None
    mlp_hidden: int | None = None
    qk_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    mlp: Literal[MLPS] = "swiglu"  # type: ignore[valid-type]
    norm: Literal[NORMS] = "rms"  # type: ignore[valid-type]
    positions: Literal[POSITIONS] = "rope"  # type: ignore[valid-type]
    bias: bool = False
    zero_init_out: bool = True
    # the speedrun options (docs/model.md), all off
    value_embeds: bool = False
    x0_lambdas: bool = False
    unet_skips: bool = False
    smear: bool = False
    logit_softcap: float = 0.0
    mtp_tokens: int = 0
    mtp_weight: float = 0.5
    bigram_hash: int = 0

    _sizes = in_range("d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "seq_len", "mlp_hidden",
                      low=1)  # or None
    _theta = in_range("rope_theta", low=0, above=True)
    _counts = in_range("bigram_hash", "mtp_tokens", low=0)
    _softcap = in_range("logit_softcap", low=0)
    _mtp_weight = in_range("mtp_weight", low=0, above=True)

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in NAMED_SIZES:
            raise ValueError(f"unknown size '{value}': choose one of {', '.join(NAMED_SIZES)}")
        return value

    def build(self, vocab_size: int) -> ModelConfig:
        shape = dict(NAMED_SIZES[self.size])
        for key, value in self.model_dump(exclude={"size", "init_from"}).items():
            if value is not None:
                shape[key] = value
        cfg = ModelConfig(vocab_size=vocab_size, **shape)
        cfg.validate()
        return cfg
