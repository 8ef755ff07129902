"""The decode scheduler behind ``flopwise serve``: one thread owns the model and takes every active request one
token further per round, in turn; requests beyond ``max_active`` wait in a bounded queue, and beyond that are
refused (the server answers 429).

Why interleaving in one thread, not batched decoding: each request keeps its own KV cache and seeded generator
and every forward has the shapes it has alone, so a request with a seed gets the same text alone or under load,
bit for bit (batched rows of different lengths would need padding masks whose arithmetic differs from a lone
row's).  On a CPU one decode already uses every core, so a batch would buy little; round-robin still gives
every client its first token after one prefill per request ahead of it, not after whole replies.

Each request's text is cut at its stop strings as OpenAI's API does (the stop string itself is not returned);
text that could still become a stop string, or that ends inside a UTF-8 character, is held back until known.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.model.gpt import GPT


class Busy(Exception):
    """Every decode slot is taken and the waiting queue is full."""


@dataclass(frozen=True)
class Decoding:
    """What one request asks the model for (already checked)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int
    end_ids: frozenset[int]
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """One request in the scheduler: the text pieces it has produced, read by the server's event loop.

    ``finish_reason`` is "stop" (an end token or a stop string), "length" (``max_tokens``) or "cancelled"
    (the client went away, or the server is stopping)."""

    decoding: Decoding
    loop: asyncio.AbstractEventLoop
    completion_tokens: int = 0
    finish_reason: str | None = None
    _queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this request at the scheduler's next round (the client disconnected)."""
        self._cancelled.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece, until it ends (then ``finish_reason`` is set)."""
        while (piece := await self._queue.get()) is not None:
            yield piece

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def _emit(self, piece: str | None) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, piece)


class _Decoder:
    """A generation's state on the scheduler thread: its token stream, tokens so far and text shown."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, generation: Generation) -> None:
        d = generation.decoding
        device = model.embed_tokens.weight.device
        generator = torch.Generator(device=device).manual_seed(d.seed)
        idx = torch.tensor([d.prompt_ids], dtype=torch.long, device=device)
        self.generation, self.tokenizer = generation, tokenizer
        self.tokens: Iterator[torch.Tensor] = model.stream(idx, d.max_tokens, d.temperature, None, d.top_p,
                                                          generator)
        self.ids: list[int] = []
        self.shown = ""

    def step(self) -> bool:
        """Sample one token and emit what text it makes certain; True when the generation has ended."""
        g, d = self.generation, self.generation.decoding
        if g._cancelled.is_set():
            return self._finish("cancelled", self.shown)
        token = next(self.tokens, None)
        if token is None:
            return self._finish("length", self.tokenizer.decode(self.ids))
        if int(token) in d.end_ids:
            return self._finish("stop", self.tokenizer.decode(self.ids))
        self.ids.append(int(token))
        g.completion_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids)
        cut = _first_stop(text, d.stop)
        if cut is not None:
            return self._finish("stop", text[:cut])
        if len(self.ids) == d.max_tokens:
            return self._finish("length", text)
        certain = len(text) - max(_held_back(text, d.stop), 1 if text.endswith("\ufffd") else 0)
        if certain > len(self.shown):
            g._emit(text[len(self.shown):certain])
            self.shown = text[:certain]
        return False

    def _finish(self, reason: str, text: str) -> bool:
        g = self.generation
        if len(text) > len(self.shown) and reason != "cancelled":
            g._emit(text[len(self.shown):])
        g.finish_reason = reason
        g._emit(None)
        return True


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class Engine:
    """The model behind the server, shared by every request through one scheduler thread."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_active: int, max_waiting: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_active, self.max_waiting = max_active, max_waiting
        self._waiting: deque[Generation] = deque()
        self._active: list[_Decoder] = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="flopwise-decode", daemon=True)
        self._thread.start()

    def submit(self, decoding: Decoding) -> Generation:
        """Queue a request (call from the event loop); ``Busy`` when the slots and the queue are full."""
        generation = Generation(decoding, asyncio.get_running_loop())
        with self._wake:
            if len(self._active) + len(self._waiting) >= self.max_active + self.max_waiting:
                raise Busy(f"{self.max_active} requests are being answered and {self.max_waiting} are waiting")
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    @property
    def load(self) -> dict[str, int]:
        with self._wake:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._active and not self._waiting:
                    self._wake.wait()
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(_Decoder(self.model, self.tokenizer, self._waiting.popleft()))
                round_ = list(self._active)
            ended = [decoder for decoder in round_ if self._step(decoder)]
            with self._wake:
                self._active = [d for d in self._active if d not in ended]

    @staticmethod
    def _step(decoder: _Decoder) -> bool:
        """One token of one request; an error inside the model ends that request, not the server."""
        try:
            with torch.inference_mode():
                return decoder.step()
        except Exception as error:  # noqa: BLE001 - reported to that client as a 500, the others go on
            decoder.generation.finish_reason = f"error: {type(error).__name__}: {error}"
            decoder.generation._emit(None)
            return True
