"""Chat data for post-training: JSONL conversations and preference pairs in the formats people already have.

The conversation format is detected per file from the keys of its first record, so exports from different
tools can be mixed file by file without a setting; every record of a file must then use that format:

- OpenAI-style ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.
- ShareGPT ``{"conversations": [{"from": ..., "value": str}, ...], "system": str}`` (``system`` optional,
  as LLaMA-Factory writes it).  ``from`` maps as FastChat, LLaMA-Factory and axolotl read it:
  human/user -> user; gpt/assistant/chatgpt/bing/bard/model -> assistant; system -> system.  Tool turns
  (function_call, observation, tool) are refused: flopwise trains chat only.
- Alpaca ``{"instruction": str, "input": str, "output": str, "system": str}`` (``input`` and ``system``
  optional): the user turn is the instruction, then a blank line and the input when there is one.

A conversation needs an assistant turn with text (the tokens trained on) and may hold a system message only
first.  Preference files (``read_preferences``) hold ``prompt``/``chosen``/``rejected``, with the replies as
strings or as whole conversations.  Every problem raises a one-line ``FlopwiseError`` naming the file, the line
and the field, so one bad record in a large export is found at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from flopwise.errors import FlopwiseError

Role = Literal["system", "user", "assistant"]
FORMATS = ("OpenAI-style 'messages' (role/content), ShareGPT 'conversations' (from/value) "
           "or Alpaca 'instruction'/'input'/'output'")
_SHOWN_KEYS = 8  # keys listed when a record matches no format; more are counted
_SHOWN_CHARS = 40  # a bad value is quoted up to this length


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training conversation; ``source`` is the file it came from, or ``built-in:<module>``."""

    messages: tuple[Message, ...]
    source: str


@dataclass(frozen=True)
class PreferencePair:
    """Two final assistant replies to one ``prompt`` (the conversation before them), the first preferred."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class _Turns:
    """How one format spells a turn: the keys of its speaker and text, and the speakers it accepts."""

    role_key: str
    content_key: str
    roles: Mapping[str, Role]
    accepted: str


OPENAI = _Turns("role", "content", {"system": "system", "user": "user", "assistant": "assistant"},
                "system, user or assistant")
SHAREGPT = _Turns("from", "value", {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                                    "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                                    "bard": "assistant", "model": "assistant"},
                  "system, human or user, gpt, assistant, chatgpt, bing, bard or model")


@dataclass(frozen=True)
class RecordLine:
    """Where a record sits, so that every error names the file, the line and the field."""

    kind: str  # "conversations" or "preferences"
    path: Path
    number: int

    def error(self, problem: str, field: str | None = None) -> FlopwiseError:
        where = f"{self.kind} file '{self.path}' line {self.number}"
        return FlopwiseError(f"{where} field '{field}' {problem}" if field else f"{where} {problem}")


_Parser = Callable[[dict, RecordLine], list[Message]]  # one format's record -> its messages


# ---------------------------------------------------------------- public readers


def read_conversations(path: Path) -> list[Conversation]:
    """All conversations of a JSONL file, in file order; the first record decides the file's format."""
    path = Path(path)
    conversations: list[Conversation] = []
    detected: tuple[str, str, _Parser] | None = None
    first = 0
    for line, record in json_records(path, "conversations"):
        if detected is None:
            detected, first = _detect(record, line), line.number
        key, name, parse = detected
        if key not in record:
            raise line.error(f"is missing: line {first} is {name}, and every record of a file must use that format",
                             key)
        conversations.append(Conversation(tuple(parse(record, line)), str(path)))
    if not conversations:
        raise FlopwiseError(f"conversations file '{path}' has no conversations: write one JSON object per line "
                            f"in one of the formats {FORMATS}")
    return conversations


def read_preferences(path: Path) -> list[PreferencePair]:
    """All preference pairs of a JSONL file, in file order.

    ``chosen`` and ``rejected`` are replies (strings) to ``prompt`` (a string for one user turn, or a list of
    messages), or whole conversations (lists of messages) that share everything but their final assistant turn;
    with a ``prompt`` as well, the lists continue it.
    """
    path = Path(path)
    pairs = [_pair(record, line) for line, record in json_records(path, "preferences")]
    if not pairs:
        raise FlopwiseError(f"preferences file '{path}' has no preference pairs: write one JSON object per line "
                            "with 'prompt', 'chosen' and 'rejected'")
    if all(pair.chosen == pair.rejected for pair in pairs):
        raise FlopwiseError(f"preferences file '{path}': all {len(pairs)} pairs have the same chosen and rejected "
                            "reply, so DPO has no preference to learn: give pairs whose replies differ")
    return pairs


# ---------------------------------------------------------------- lines and records


def json_records(path: Path, kind: str) -> Iterator[tuple[RecordLine, dict]]:
    """Each non-blank line's JSON object; the file is streamed, so a large export needs little memory."""
    with _open(path, kind) as file:
        for number, raw in enumerate(file, 1):
            line = RecordLine(kind, path, number)
            text = _decoded(raw, line)
            if text.strip():
                yield line, _parsed(text, line)


def _open(path: Path, kind: str) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        cause = error.strerror.lower() if error.strerror else str(error)
        raise FlopwiseError(f"{kind} file '{path}' could not be read: {cause}: check the path") from None


def _decoded(raw: bytes, line: RecordLine) -> str:
    """UTF-8 text of one line; a byte-order mark before the first record is dropped, as editors write one."""
    try:
        return raw.decode("utf-8-sig" if line.number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise line.error(f"is not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}): "
                         "save the file as UTF-8") from None


def _parsed(text: str, line: RecordLine) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise line.error(f"is not valid JSON ({error.msg} at column {error.colno}): "
                         "write one JSON object per line") from None
    if not isinstance(record, dict):
        raise line.error(f"is a JSON {json_type(record)}, not an object: write one JSON object per line")
    return record


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def quoted(value: str) -> str:
    """A user's value quoted on one line (repr escapes newlines), cut so a long one does not flood the line."""
    return repr(value[:_SHOWN_CHARS] + ("..." if len(value) > _SHOWN_CHARS else ""))


def _keys(record: dict) -> str:
    keys = [quoted(str(key)) for key in list(record)[:_SHOWN_KEYS]]
    more = len(record) - len(keys)
    return ", ".join(keys) + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------- fields


def _text(record: dict, key: str, line: RecordLine, field: str | None = None) -> str:
    """A required string field; ``field`` names it in errors when it sits inside a list."""
    field = field or key
    if key not in record:
        raise line.error("is missing", field)
    value = record[key]
    if not isinstance(value, str):
        raise line.error(f"is a JSON {json_type(value)}: give the text as a string", field)
    return value


def _optional_text(record: dict, key: str, line: RecordLine) -> str:
    return "" if record.get(key) is None else _text(record, key, line)


def parse_messages(items: object, field: str, line: RecordLine, turns: _Turns, system_first: bool = True
                   ) -> list[Message]:
    """A list of turns; a system message is allowed only at the start (``system_first``), as chat templates
    place it there."""
    if not isinstance(items, list) or not items:
        shown = "an empty list" if isinstance(items, list) else f"a JSON {json_type(items)}"
        raise line.error(f"is {shown}: give a list of messages with '{turns.role_key}' and '{turns.content_key}'",
                         field)
    return [_message(item, f"{field}[{index}]", line, turns, system_first and index == 0)
            for index, item in enumerate(items)]


def _message(item: object, field: str, line: RecordLine, turns: _Turns, system_allowed: bool) -> Message:
    if not isinstance(item, dict):
        raise line.error(f"is a JSON {json_type(item)}: give an object with '{turns.role_key}' and "
                         f"'{turns.content_key}'", field)
    speaker = _text(item, turns.role_key, line, f"{field}.{turns.role_key}")
    role = turns.roles.get(speaker)
    if role is None:
        raise line.error(f"is {quoted(speaker)}: use {turns.accepted}", f"{field}.{turns.role_key}")
    if role == "system" and not system_allowed:
        raise line.error(f"is {quoted(speaker)}: a system message may only come first", f"{field}.{turns.role_key}")
    return Message(role, _text(item, turns.content_key, line, f"{field}.{turns.content_key}"))


def _with_reply(messages: list[Message], field: str, line: RecordLine) -> list[Message]:
    """The messages, checked to hold an assistant turn with text: without one there is nothing to learn."""
    if not any(message.role == "assistant" and message.content.strip() for message in messages):
        raise line.error("has no assistant turn with text: each conversation needs at least one assistant reply",
                         field)
    return messages


def _system(record: dict, line: RecordLine) -> list[Message]:
    """The record-level system prompt of ShareGPT and Alpaca records, as a leading message when given."""
    system = _optional_text(record, "system", line)
    return [Message("system", system)] if system.strip() else []


# ---------------------------------------------------------------- the three conversation formats


def _openai(record: dict, line: RecordLine) -> list[Message]:
    return _with_reply(parse_messages(record["messages"], "messages", line, OPENAI), "messages", line)


def _sharegpt(record: dict, line: RecordLine) -> list[Message]:
    system = _system(record, line)
    turns = parse_messages(record["conversations"], "conversations", line, SHAREGPT)
    if system and turns[0].role == "system":
        raise line.error("and 'conversations[0]' both give a system prompt: keep one", "system")
    return _with_reply(system + turns, "conversations", line)


def _alpaca(record: dict, line: RecordLine) -> list[Message]:
    instruction = _text(record, "instruction", line)
    if not instruction.strip():
        raise line.error("is empty: each record needs an instruction", "instruction")
    extra = _optional_text(record, "input", line)
    output = _text(record, "output", line)
    if not output.strip():
        raise line.error("is empty: each record needs an output, the assistant's reply", "output")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return _system(record, line) + [Message("user", user), Message("assistant", output)]


_FORMATS: tuple[tuple[str, str, _Parser], ...] = (
    ("messages", "OpenAI-style 'messages'", _openai),
    ("conversations", "ShareGPT 'conversations'", _sharegpt),
    ("instruction", "Alpaca 'instruction'/'input'/'output'", _alpaca),
)


def _detect(record: dict, line: RecordLine) -> tuple[str, str, _Parser]:
    """The format whose key the record has, checked in a fixed order so the choice never depends on key order."""
    for key, name, parse in _FORMATS:
        if key in record:
            return key, name, parse
    found = f"has keys {_keys(record)}, which match no known format" if record else "is an empty object"
    raise line.error(f"{found}: use {FORMATS}")


# ---------------------------------------------------------------- preference pairs


def _pair(record: dict, line: RecordLine) -> PreferencePair:
    if "chosen" not in record or "rejected" not in record:
        found = f"has keys {_keys(record)}" if record else "is an empty object"
        raise line.error(f"{found}: a preference pair needs 'chosen' and 'rejected' replies, and a 'prompt' "
                         "unless they are whole conversations")
    prompt = _prompt(record, line)
    chosen = prompt + _reply(record, "chosen", line, not prompt)
    rejected = prompt + _reply(record, "rejected", line, not prompt)
    if chosen[:-1] != rejected[:-1]:
        raise line.error("does not share the prompt of 'chosen': the two may differ only in their final "
                         "assistant turn", "rejected")
    if not any(message.role == "user" for message in chosen[:-1]):
        raise line.error("has no user turn before the replies: give the prompt the replies answer",
                         "prompt" if "prompt" in record else "chosen")
    return PreferencePair(tuple(chosen[:-1]), chosen[-1].content, rejected[-1].content, str(line.path))


def _prompt(record: dict, line: RecordLine) -> list[Message]:
    """The turns before the replies: none (whole conversations follow), one user turn, or a list of messages."""
    prompt = record.get("prompt")
    if prompt is None:
        return []
    if isinstance(prompt, list):
        return parse_messages(prompt, "prompt", line, OPENAI)
    if isinstance(prompt, str) and prompt.strip():
        return [Message("user", prompt)]
    shown = "empty" if isinstance(prompt, str) else f"a JSON {json_type(prompt)}"
    raise line.error(f"is {shown}: give the prompt as a string or a list of messages", "prompt")


def _reply(record: dict, key: str, line: RecordLine, system_first: bool) -> list[Message]:
    """``chosen`` or ``rejected`` as messages ending in the assistant reply that is compared."""
    value = record[key]
    if isinstance(value, str):
        messages = [Message("assistant", value)]
    elif isinstance(value, list):
        messages = parse_messages(value, key, line, OPENAI, system_first)
    else:
        raise line.error(f"is a JSON {json_type(value)}: give the reply as a string or a list of messages", key)
    if messages[-1].role != "assistant":
        raise line.error(f"ends with a {messages[-1].role} turn: it must end with the assistant reply", key)
    if not messages[-1].content.strip():
        raise line.error(f"is empty: a preference pair needs a {key} reply", key)
    return messages
