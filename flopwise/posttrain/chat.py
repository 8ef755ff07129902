"""Chatting with a fine-tuned run: the conversation so far, rendered with the training template, and each
reply streamed token by token through the model's KV cache (``GPT.stream``).

The prompt of every reply is ``render`` of the whole history with the generation prompt, exactly the ids
the model was fine-tuned on (and what ``apply_chat_template`` gives on the export), so a greedy reply here is
the one ``transformers``' greedy ``generate`` gives.  A reply ends at ``<|im_end|>``, at the end-of-text token
or after ``max_tokens`` tokens; its text, without the end token, joins the history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.gpt import GPT
from flopwise.posttrain.conversations import Message
from flopwise.posttrain.template import IM_END, IM_START, MessageLike, add_chat_tokens, render


@dataclass(frozen=True)
class Reply(Message):
    """An assistant turn of the history; ``interrupted`` when Ctrl-C stopped it.  The model still sees the
    partial text as the reply it gave (closed by ``<|im_end|>``): it is what the user read."""

    interrupted: bool = False


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn (``check_sampling`` has accepted them): temperature 0 is greedy."""

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = 0.9
    max_tokens: int = 256
    seed: int = 0


def require_chat_tokens(tokenizer: Tokenizer, run_dir: Path) -> None:
    """Refuse, in one line, a run whose tokenizer never learned the chat format (a pretrained-only run)."""
    if add_chat_tokens(tokenizer) is not tokenizer:  # the tokenizer itself only when it has both tokens
        raise FlopwiseError(f"run '{run_dir}' has no chat template: fine-tune it with flopwise sft first "
                            f"(its tokenizer lacks {IM_START})")


def reply_end_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a reply: ``<|im_end|>`` (the end of a turn) and the end-of-text token."""
    return frozenset({tokenizer.encode_batch([IM_END])[0][0], tokenizer.eos_id})


class ChatSession:
    """A multi-turn conversation with one model: the history, and ``reply`` to add a user message and
    stream the answer.  One seeded generator serves the whole session, so a conversation is reproducible."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, sampling: Sampling, system: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.history: list[Message] = [Message("system", system)] if system else []
        self.stop_ids = reply_end_ids(tokenizer)
        device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.notice: str | None = None  # what the last prompt left out to fit the context, if anything

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's ``text`` and yield the reply's text as it is sampled (a piece ending inside a UTF-8
        character is held back).  When the consumer stops early (Ctrl-C, ``close()``), the tokens so far
        still join the history, as an interrupted reply."""
        self.history.append(Message("user", text))
        ids = self.prompt_ids()
        tokens: list[int] = []
        finished = False
        try:
            yield from self._pieces(ids, tokens)
            finished = True
        finally:
            self.history.append(Reply("assistant", self.tokenizer.decode(tokens), interrupted=not finished))

    def prompt_ids(self) -> list[int]:
        """The history rendered with the generation prompt, fitted to the context (``fit_prompt``); ``notice``
        says what was left out."""
        ids, self.notice = fit_prompt(self.tokenizer, self.history, self.model.config.context,
                                      self.sampling.max_tokens)
        return ids

    def _pieces(self, ids: list[int], tokens: list[int]) -> Iterator[str]:
        """Sample after ``ids`` until an end token or ``max_tokens``, appending each token to ``tokens`` and
        yielding the newly decoded text."""
        s = self.sampling
        idx = torch.tensor([ids], dtype=torch.long, device=self.generator.device)
        shown = ""
        for token in self.model.stream(idx, s.max_tokens, s.temperature, s.top_k, s.top_p, self.generator):
            if int(token) in self.stop_ids:
                break
            tokens.append(int(token))
            text = self.tokenizer.decode(tokens)
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(tokens)
        if text != shown:
            yield text[len(shown):]


def fit_prompt(tokenizer: Tokenizer, history: Sequence[MessageLike], context: int, max_tokens: int
               ) -> tuple[list[int], str | None]:
    """``history`` rendered with the generation prompt, left-truncated to fit ``context`` while leaving room for
    a reply (up to ``max_tokens``, at most half the context): the oldest exchanges (a user message and its
    reply) go first, the system message and the last user message stay; when those alone are too long, the
    earliest tokens are cut.  With the ids, one line on what was left out (None when nothing was).  ``flopwise
    chat`` and ``flopwise serve`` both prompt with it, so the same messages give the same reply."""
    limit = context - min(max_tokens, context // 2)
    system = [m for m in history[:1] if m.role == "system"]
    turns = list(history[len(system):])
    dropped = 0
    ids, _ = render(tokenizer, system + turns, add_generation_prompt=True)
    while len(ids) > limit and len(turns) > 1:
        turns, dropped = turns[2:], dropped + 2
        ids, _ = render(tokenizer, system + turns, add_generation_prompt=True)
    cut = max(len(ids) - limit, 0)
    return ids[cut:], _notice(context, limit, dropped, cut)


def _notice(context: int, limit: int, dropped: int, cut: int) -> str | None:
    """One line on what a prompt left out to fit the context, or None when nothing was."""
    if not dropped and not cut:
        return None
    left_out = [f"the {dropped} oldest messages"] if dropped else []
    left_out += [f"the first {cut} tokens"] if cut else []
    return (f"the conversation is longer than the model's {context}-token context ({limit} for the prompt): "
            f"left out {' and '.join(left_out)}")


def stream_reply(session: ChatSession, text: str, write: Callable[[str], None]) -> bool:
    """Write the reply to ``text`` piece by piece; False when Ctrl-C stopped it.  The partial reply stays in
    the history and the session can go on."""
    pieces = session.reply(text)
    try:
        for piece in pieces:
            write(piece)
    except KeyboardInterrupt:
        pieces.close()  # records the partial reply, whether Ctrl-C came while sampling or while writing
        return False
    return True
