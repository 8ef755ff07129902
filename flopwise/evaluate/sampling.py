"""Streaming text from a model (``flopwise sample``, ``flopwise chat``), with its settings checked first."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.gpt import GPT


def check_sampling(max_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling settings, refused in one line (``flopwise sample`` checks them before loading a model)."""
    if max_tokens < 1:
        raise FlopwiseError(f"--max-tokens {max_tokens} must be a positive number of tokens to generate")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise FlopwiseError(f"--temperature {temperature} must be 0 (greedy) or a positive number, e.g. 0.8")
    if top_p is not None and not 0 < top_p <= 1:
        raise FlopwiseError(f"--top-p {top_p} must lie in (0, 1], e.g. 0.9")
    if top_k is not None and top_k < 1:
        raise FlopwiseError(f"--top-k {top_k} must be 0 (off) or a positive number of tokens, e.g. 50")


def stream_sample(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int) -> Iterator[str]:
    """Pieces of text as they are sampled (a piece is held back while it ends inside a UTF-8 character)."""
    check_sampling(max_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    ids = tokenizer.encode_batch([prompt])[0] if prompt else [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    shown = ""
    for token in model.stream(idx, max_tokens, temperature, top_k, top_p, generator):
        new_tokens.append(int(token))
        text = tokenizer.decode(new_tokens)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new_tokens)
    if text != shown:
        yield text[len(shown):]
