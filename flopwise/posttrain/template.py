"""The chat format: ChatML, ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

ChatML (Qwen2/2.5/3, SmolLM2, OpenHermes) rather than nanochat's own tokens or Llama 3's headers: it is the
template inference engines recognise most widely (llama.cpp and vLLM read it from ``tokenizer_config.json``),
and it needs only two special tokens for any role (the role is plain text after ``<|im_start|>``), so the
embedding grows by two rows; ``<|im_end|>`` is the one end-of-turn token a chat model learns to stop at.

flopwise renders conversations here in Python and the export carries the same format as a Jinja
``chat_template``, so ``transformers``' ``apply_chat_template`` gives exactly the ids flopwise trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.chatml import GENERATION_PROMPT, IM_END, IM_START, SPECIAL_TOKENS
from flopwise.model.gpt import GPT


class MessageLike(Protocol):
    """One turn: ``role`` is "system", "user" or "assistant" (read-only, so frozen dataclasses fit)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with ``<|im_start|>`` and ``<|im_end|>`` as special added tokens, so each is one id that
    plain text never splits, and bits per byte counts them as 0 bytes.  New ids come after the current
    ones (a string already in the vocabulary keeps its id); ``tokenizer`` itself when it has both."""
    if not _missing(tokenizer):
        return tokenizer
    grown = HFTokenizer.from_str(tokenizer.to_json())
    grown.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return Tokenizer(grown, tokenizer.eos_token)


def _missing(tokenizer: Tokenizer) -> list[str]:
    """The chat tokens that are not special added tokens of ``tokenizer``."""
    special = {token.content for token in _rust(tokenizer).get_added_tokens_decoder().values() if token.special}
    return [token for token in SPECIAL_TOKENS if token not in special]


def check_room(tokenizer: Tokenizer, vocab_limit: int, reason: str) -> None:
    """Refuse, in one line, a tokenizer whose chat tokens would need ids at or past ``vocab_limit``: the
    rows of a model whose embedding cannot grow (``reason`` says why, e.g. a frozen embedding).  A model
    that can grow has room always (``resize_for_tokenizer``); a padded one has room in its spare rows."""
    needed = add_chat_tokens(tokenizer).vocab_size
    if needed > vocab_limit:
        raise FlopwiseError(f"the tokenizer has no room for the chat tokens {', '.join(SPECIAL_TOKENS)}: with "
                            f"them it needs {needed} embedding rows, but the model's embedding is fixed at "
                            f"{vocab_limit} ({reason}): use a tokenizer that already has them (a ChatML one, "
                            "like Qwen's)")


def resize_for_tokenizer(model: GPT, vocab_size: int) -> None:
    """Grow the embedding (and an untied head) to ``vocab_size`` rows, before an optimizer holds them.

    New rows start as the mean of the trained ones (Hewitt 2021, "Initializing New Word Embeddings for
    Pretrained Language Models"; transformers' ``resize_token_embeddings(mean_resizing=True)``): a new
    token's logit is then the mean of the old logits, so it cannot take much probability from them and
    the model's predictions barely move, where a random row could dominate a trained model's softmax.
    Old rows, and so the logits of old ids, are unchanged.  Shrinking is refused: it would drop rows."""
    rows = model.config.vocab_size
    if vocab_size < rows:
        raise FlopwiseError(f"cannot shrink the model's vocabulary from {rows} to {vocab_size} rows: that would "
                            f"drop trained embeddings; give a tokenizer with at least {rows} ids")
    if vocab_size == rows:
        return
    model.embed_tokens.weight = _grown(model.embed_tokens.weight, vocab_size)
    model.embed_tokens.num_embeddings = vocab_size
    if model.lm_head is not None:
        model.lm_head.weight = _grown(model.lm_head.weight, vocab_size)
        model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size


@torch.no_grad()
def _grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """``weight`` [vocab, d] with ``rows - vocab`` copies of its mean row (averaged in fp32) appended."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    grown = torch.cat((weight, mean.expand(rows - weight.shape[0], -1)))
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


def render(tokenizer: Tokenizer, messages: Sequence[MessageLike], add_generation_prompt: bool = False
           ) -> tuple[list[int], list[bool]]:
    """Token ids of ``messages`` as ``CHAT_TEMPLATE`` renders them, and per id whether it is a training
    target: the tokens of an assistant's content and its ``<|im_end|>`` (not its header, which the prompt
    gives at inference).  For next-token loss, position i predicts ids[i + 1] when mask[i + 1].

    The whole text is encoded at once, as ``apply_chat_template`` does: byte-level BPE merges whitespace
    across the header/content boundary ("assistant\\n" + "\\n\\nHi"), so pieces encoded apart could differ.
    A token is a target when its characters overlap a target span, as in transformers'
    ``return_assistant_tokens_mask``.  Special tokens are matched inside contents too, as transformers does
    by default: a literal "<|im_end|>" in a message becomes the special token."""
    missing = _missing(tokenizer)
    if missing:
        raise ValueError(f"the tokenizer lacks the chat tokens {', '.join(missing)}: call add_chat_tokens first")
    text, spans = render_text(messages, add_generation_prompt)
    encoding = _rust(tokenizer).encode(text, add_special_tokens=False)
    inside = bytearray(len(text))
    for start, end in spans:
        inside[start:end] = b"\x01" * (end - start)
    return encoding.ids, [any(inside[start:end]) for start, end in encoding.offsets]


def render_text(messages: Sequence[MessageLike], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its targets (assistant content + ``<|im_end|>``)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for message in messages:
        header, body = f"{IM_START}{message.role}\n", f"{message.content}{IM_END}"
        if message.role == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        parts += (header, body, "\n")
        length += len(header) + len(body) + 1
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts), spans


def _rust(tokenizer: Tokenizer) -> HFTokenizer:
    """The wrapped ``tokenizers`` object, for added tokens and character offsets, which ``Tokenizer`` does
    not expose."""
    return tokenizer._tokenizer
