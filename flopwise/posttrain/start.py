"""The model post-training starts from: a finished run's ``final/`` or a Hugging Face model, given the chat tokens.

Its tokenizer gains ``<|im_start|>`` and ``<|im_end|>`` (``add_chat_tokens``) and its embedding (and an untied
head) grows by their rows where it has none to spare (``resize_for_tokenizer``), so the model the optimizer
sees already has its final shape.  DPO loads the same starting model again as its frozen reference, and a
resumed run loads it again for that reference, so the growth is deterministic (mean rows, no random draw).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import NAMED_SIZES, ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import WEIGHTS, load_weights_into, model_config_from_hf, read_hf_config, resolve_hf_source
from flopwise.posttrain.template import add_chat_tokens, check_room, resize_for_tokenizer
from flopwise.rundir import is_run_dir, planned_model_config


@dataclass
class Start:
    """The starting model (fp32 weights, embedding grown for the chat tokens), its tokenizer with the chat
    tokens, and whether it had to grow (a frozen embedding could not learn the new rows)."""

    model: GPT
    tokenizer: Tokenizer
    grown: bool


def load_start(spec: str, seq_len: int | None, frozen_embedding: str | None = None) -> Start:
    """``spec``: a finished run folder, or a Hugging Face folder or hub id.  ``seq_len``: the window to train in
    (default: the run's own, or the named small size's for a Hugging Face model).  ``frozen_embedding``: why the
    embedding cannot learn (LoRA), which refuses chat tokens that need new rows."""
    cfg, tokenizer, folder = _source(spec, seq_len)
    model = GPT(cfg)
    load_weights_into(model, folder)
    rows = model.config.vocab_size
    if frozen_embedding is not None:
        check_room(tokenizer, rows, frozen_embedding)
    chat = add_chat_tokens(tokenizer)
    resize_for_tokenizer(model, max(rows, chat.vocab_size))
    return Start(model, chat, model.config.vocab_size > rows)


def start_shape(spec: str, seq_len: int | None) -> ModelConfig:
    """The shape of ``load_start``'s model, from the start's config and tokenizer alone (no weights are read)."""
    cfg, tokenizer, _ = _source(spec, seq_len)
    return dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, add_chat_tokens(tokenizer).vocab_size))


def _source(spec: str, seq_len: int | None) -> tuple[ModelConfig, Tokenizer, Path]:
    """The start's shape at the window asked for, its tokenizer, and the folder holding its weights."""
    path = Path(spec).expanduser()
    if is_run_dir(path):
        final = path / "final"
        if not (final / WEIGHTS).is_file():
            raise FlopwiseError(f"--init-from '{spec}' is a run without a final model: finish it first "
                                f"(flopwise train --resume {spec})")
        cfg = _with_window(planned_model_config(path), seq_len, spec)
        tokenizer = Tokenizer.load(final / "tokenizer.json")
        folder = final
    else:
        folder = resolve_hf_source(spec)
        if not (folder / "config.json").is_file():  # read before the tokenizer, whose absence says less
            raise FlopwiseError(f"--init-from '{spec}' is neither a flopwise run folder (no config.toml) nor a "
                                "Hugging Face model folder (no config.json): give a finished run or a model folder")
        cfg = model_config_from_hf(read_hf_config(folder), folder, seq_len or NAMED_SIZES["small"]["seq_len"])
        tokenizer = Tokenizer.load(folder)
    return cfg, tokenizer, folder


def _with_window(cfg: ModelConfig, seq_len: int | None, spec: str) -> ModelConfig:
    """The run's shape with the window post-training asks for; learned positions fix theirs (a table of
    seq_len rows)."""
    if seq_len is None or seq_len == cfg.seq_len:
        return cfg
    if cfg.positions == "learned":
        raise FlopwiseError(f"model.seq_len={seq_len}: run '{spec}' learned positions for a window of "
                            f"{cfg.seq_len}, which stays: drop model.seq_len")
    return dataclasses.replace(cfg, seq_len=seq_len)
