"""The bodies of ``/v1/chat/completions`` and ``/v1/completions``, as OpenAI's API defines them, checked before
anything is queued.  Fields the API has that flopwise does not serve are refused when set to anything but their
default (``n`` > 1, ``logprobs``, tools); fields it does not know are ignored, as clients send extras."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RequestError(Exception):
    """A request the server refuses: the HTTP status, OpenAI's error type and code, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content is a string or a list of text parts (the newer form clients may send)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Sampled(BaseModel):
    """What both endpoints share: the model, how to sample, when to stop, and whether to stream."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and (len(stop) > 4 or not all(stop)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def reply_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("prompt takes one string (a list of several prompts is not served)")
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse(kind: type[BaseModel], body: Any) -> Any:
    """``body`` as ``kind``, or a 400 naming the first field at fault and what it must be."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list", "function")))
        given = f" (got {first['input']!r:.60})" if "input" in first and first["type"] != "missing" else ""
        raise RequestError(400, f"{param or 'body'}: {first['msg']}{given}", param or None) from None
