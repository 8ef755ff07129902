"""What a config resolves to before a model is built: the shape ``flopwise train`` would build and
the compute dtype it would train in, for the planner, the memory estimate and the scan."""

from __future__ import annotations

from flopwise.config import RunConfig
from flopwise.model.config import NAMED_SIZES, ModelConfig


def shape_from_config(config: RunConfig) -> ModelConfig:
    """The shape ``flopwise train`` would build: an imported model's, or the config's with the
    tokenizer's vocabulary (data.vocab_size for BPE, 257 for bytes, a tokenizer file's own)."""
    from flopwise.data.tokenizer import Tokenizer

    m = config.model
    if m.init_from:
        from flopwise.model.hf import model_config_from_hf, read_hf_config, resolve_hf_source

        folder = resolve_hf_source(m.init_from)
        return model_config_from_hf(read_hf_config(folder), folder, m.seq_len or NAMED_SIZES[m.size]["seq_len"])
    tokenizer = config.data.tokenizer
    if tokenizer == "bpe":
        vocab = config.data.vocab_size
    elif tokenizer == "byte":
        vocab = 256 + 1  # the bytes and end-of-text
    else:
        vocab = Tokenizer.load(tokenizer).vocab_size
    return m.build(vocab)


def compute_dtype(config: RunConfig) -> str:
    """``fp32`` or ``bf16``: what train.precision (and, for 'auto', this machine) gives."""
    if config.train.precision != "auto":
        return config.train.precision
    import torch

    from flopwise.runtime import choose_device, choose_dtype

    dtype = choose_dtype("auto", choose_device(config.train.device))
    return "bf16" if dtype == torch.bfloat16 else "fp32"
