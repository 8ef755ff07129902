"""The HTTP side of ``flopwise serve``: an ASGI app (Starlette) with OpenAI's routes, its JSON errors, server-sent
events for ``stream``, the key check and the body limit, over the decode scheduler (``engine``).

Routes: ``GET /`` (the chat page), ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (a run
fine-tuned for chat) and ``POST /v1/completions`` (any run).  Every error is OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and leaves the server serving.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flopwise.posttrain.chat import fit_prompt, reply_end_ids
from flopwise.posttrain.conversations import Message
from flopwise.serve.engine import Busy, Decoding, Engine, Generation
from flopwise.serve.requests import ChatRequest, CompletionRequest, RequestError, parse

# Paths a client reaches without the key: the page holds no secret (it asks for the key), and /health is for
# load balancers and the page's first look.
OPEN_PATHS = frozenset({"/", "/health"})
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ServeSettings:
    """What the server answers with and what it allows."""

    model_id: str
    chat: bool  # the tokenizer has the chat tokens: /v1/chat/completions is served
    key: str | None = None
    cors_origin: str | None = None
    max_body: int = 1 << 20


def build_app(engine: Engine, settings: ServeSettings) -> Starlette:
    """The ASGI app serving ``engine``'s model under ``settings``."""
    routes = _Routes(engine, settings)
    middleware = []
    if settings.cors_origin:  # outermost, so a browser's preflight is answered before the key is asked for
        middleware.append(Middleware(CORSMiddleware, allow_origins=[settings.cors_origin],
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    if settings.key is not None:
        middleware.append(Middleware(RequireKey, key=settings.key))
    return Starlette(
        routes=[Route("/", routes.page), Route("/health", routes.health), Route("/v1/models", routes.models),
                Route("/v1/chat/completions", routes.chat, methods=["POST"]),
                Route("/v1/completions", routes.completions, methods=["POST"])],
        middleware=middleware,
        exception_handlers={RequestError: _request_error, HTTPException: _http_error, Exception: _server_error})


class _Routes:
    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine, self.settings = engine, settings
        self.created = int(time.time())
        self.context = engine.model.config.context

    async def page(self, request: Request) -> Response:
        return HTMLResponse((files("flopwise.serve") / "page" / "index.html").read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "chat": self.settings.chat,
                             "key_required": self.settings.key is not None, **self.engine.load})

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_id, "object": "model", "created": self.created, "owned_by": "flopwise",
                 "context_length": self.context}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        body: ChatRequest = parse(ChatRequest, await read_json(request, self.settings.max_body))
        self._check_model(body.model)
        if not self.settings.chat:
            raise RequestError(400, f"model '{body.model}' was not fine-tuned for chat (its tokenizer has no "
                                    "chat tokens): use /v1/completions, or serve a run trained with flopwise sft",
                               "model", "model_not_chat")
        max_tokens = self._max_tokens(body)
        tokenizer = self.engine.tokenizer
        history = [Message(m.role, m.text) for m in body.messages]
        ids, _ = fit_prompt(tokenizer, history, self.context, max_tokens)
        generation = self._submit(body, ids, max_tokens, reply_end_ids(tokenizer))
        reply = _Reply("chatcmpl", "chat.completion", body.model, len(ids), generation)
        if body.stream:
            return _event_stream(reply.chunks(lambda text: {"delta": {"content": text}}, {"delta": {"role": "assistant",
                                                                                                    "content": ""}}))
        text = await reply.text()
        return JSONResponse(reply.whole({"message": {"role": "assistant", "content": text}}))

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await read_json(request, self.settings.max_body))
        self._check_model(body.model)
        max_tokens = self._max_tokens(body)
        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode_batch([body.text])[0] if body.text else [tokenizer.eos_id]
        generation = self._submit(body, ids, max_tokens, frozenset({tokenizer.eos_id}))
        reply = _Reply("cmpl", "text_completion", body.model, len(ids), generation)
        if body.stream:
            return _event_stream(reply.chunks(lambda text: {"text": text, "logprobs": None}))
        text = await reply.text()
        return JSONResponse(reply.whole({"text": text, "logprobs": None}))

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_id:
            raise RequestError(404, f"the model '{model}' does not exist here: this server serves "
                                    f"'{self.settings.model_id}' (GET /v1/models)", "model", "model_not_found")

    def _max_tokens(self, body: ChatRequest | CompletionRequest) -> int:
        asked = body.reply_tokens()
        if asked is not None and asked > self.context:
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise RequestError(400, f"{param}: {asked} is more than the model's context of {self.context} tokens",
                               param, "context_length_exceeded")
        return asked if asked is not None else min(DEFAULT_MAX_TOKENS, self.context)

    def _submit(self, body: ChatRequest | CompletionRequest, ids: list[int], max_tokens: int,
                end_ids: frozenset[int]) -> Generation:
        seed = body.seed % 2**64 if body.seed is not None else secrets.randbits(63)
        top_p = body.top_p if body.top_p < 1 else None
        decoding = Decoding(ids, max_tokens, body.temperature, top_p, seed, end_ids, body.stops())
        try:
            return self.engine.submit(decoding)
        except Busy as busy:
            raise RequestError(429, f"the server is busy: {busy}; retry later", None, "rate_limit_exceeded",
                               "rate_limit_error") from None


class _Reply:
    """One generation as OpenAI's response objects: whole, or as a stream of chunks."""

    def __init__(self, prefix: str, kind: str, model: str, prompt_tokens: int, generation: Generation) -> None:
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.created = int(time.time())
        self.prompt_tokens, self.generation = prompt_tokens, generation

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def usage(self) -> dict[str, int]:
        done = self.generation.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def finish_reason(self) -> str:
        reason = self.generation.finish_reason or "stop"
        if reason.startswith("error"):
            raise RuntimeError(reason)
        return reason

    async def text(self) -> str:
        try:
            return await self.generation.text()
        finally:
            self.generation.cancel()  # the client went away before the end: stop decoding for it

    def whole(self, choice: dict[str, Any]) -> dict[str, Any]:
        choices = [{"index": 0, **choice, "finish_reason": self.finish_reason()}]
        return self._object(self.kind, choices, usage=self.usage())

    async def chunks(self, piece: Callable[[str], dict[str, Any]], opening: dict[str, Any] | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """The stream's objects: an opening chunk (chat: the role), a chunk per piece of text, the chunk with the
        finish reason, then one with the usage (what OpenAI sends with ``stream_options.include_usage``, sent
        always: a client that does not ask for it skips a chunk without choices)."""
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind
        try:
            if opening is not None:
                yield self._object(kind, [{"index": 0, **opening, "finish_reason": None}])
            async for text in self.generation.pieces():
                yield self._object(kind, [{"index": 0, **piece(text), "finish_reason": None}])
            try:
                reason = self.finish_reason()
            except RuntimeError as error:
                yield {"error": {"message": str(error), "type": "server_error", "param": None, "code": None}}
                return
            yield self._object(kind, [{"index": 0, **piece(""), "finish_reason": reason}])
            yield self._object(kind, [], usage=self.usage())
        finally:
            self.generation.cancel()


def _event_stream(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: ``data: <json>`` per object, then ``data: [DONE]``."""
    async def events() -> AsyncIterator[str]:
        async for obj in objects:
            yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past ``limit`` bytes (by its Content-Length, or while reading), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        return json.loads(body)
    except ValueError as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from None


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is over the server's limit of {limit} bytes ({size} bytes or "
                             "more): send a shorter one, or start the server with a larger --max-body",
                        None, "request_too_large")


class RequireKey:
    """Refuse (401) a request without ``Authorization: Bearer <key>``, except to ``OPEN_PATHS`` and a browser's
    CORS preflight.  The keys are compared as SHA-256 digests with ``hmac.compare_digest``: in constant time,
    whatever the length of what was sent."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.digest = app, hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest):
            return await self.app(scope, receive, send)
        error = RequestError(401, "a valid API key is required: send it as 'Authorization: Bearer <key>' (the "
                                  "openai client's api_key)", None, "invalid_api_key", "authentication_error")
        await JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


async def _request_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), error.status)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = {404: f"no route {request.url.path}: the API is under /v1 (GET /v1/models)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
    return JSONResponse(RequestError(error.status_code, message).body(), error.status_code)


async def _server_error(request: Request, error: Exception) -> Response:
    body = {"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error", "param": None,
                      "code": None}}
    return JSONResponse(body, 500)
