"""`flopwise chat`: a greedy reply is the greedy decode of the rendered history, each turn's prompt is the
whole conversation rendered by the training template, Ctrl-C stops a reply but not the session, and the
command answers one `--prompt` on stdout and refuses a run that was never fine-tuned."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flopwise.cli import main
from flopwise.data.tokenizer import Tokenizer, byte_tokenizer
from flopwise.model.gpt import GPT
from flopwise.posttrain.chat import ChatSession, Reply, Sampling, stream_reply
from flopwise.posttrain.conversations import Message
from flopwise.posttrain.template import IM_END, add_chat_tokens, render
from tests.helpers import one_error_line, tiny_chat_model, write_model_run

GREEDY = Sampling(temperature=0, top_p=None, max_tokens=12)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return add_chat_tokens(byte_tokenizer())


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_chat_model()


def greedy_ids(model: GPT, tokenizer: Tokenizer, messages: list[Message], max_tokens: int) -> list[int]:
    """The reference: argmax over full forwards of the rendered history, cut at the first end token."""
    window = torch.tensor([render(tokenizer, messages, add_generation_prompt=True)[0]])
    stops = {tokenizer.encode_batch([IM_END])[0][0], tokenizer.eos_id}
    out: list[int] = []
    for _ in range(max_tokens):
        with torch.no_grad():
            token = int(model(window)[0][0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        window = torch.cat((window, torch.tensor([[token]])), dim=1)
    return out


def greedy_reply(model: GPT, tokenizer: Tokenizer, messages: list[Message], max_tokens: int) -> str:
    return tokenizer.decode(greedy_ids(model, tokenizer, messages, max_tokens))


def test_greedy_reply_is_the_greedy_decode_of_the_rendered_history(model, tokenizer):
    session = ChatSession(model, tokenizer, GREEDY, system="Be brief.")
    reply = "".join(session.reply("Hello there"))
    expected = greedy_reply(model, tokenizer, session.history[:2], GREEDY.max_tokens)
    assert reply == expected and len(reply) > 0
    assert session.history[-1] == Reply("assistant", expected) and session.notice is None


def test_second_prompt_is_the_whole_history_rendered(model, tokenizer, monkeypatch):
    session = ChatSession(model, tokenizer, GREEDY, system="Be brief.")
    first = "".join(session.reply("Hello there"))
    prompts: list[list[int]] = []
    stream = GPT.stream

    def recording(self: GPT, idx: torch.Tensor, *args) -> Iterator[torch.Tensor]:
        prompts.append(idx[0].tolist())
        return stream(self, idx, *args)

    monkeypatch.setattr(GPT, "stream", recording)
    "".join(session.reply("And again?"))
    history = [Message("system", "Be brief."), Message("user", "Hello there"), Message("assistant", first),
               Message("user", "And again?")]
    assert prompts == [render(tokenizer, history, add_generation_prompt=True)[0]]


def test_ctrl_c_stops_a_reply_after_k_tokens_and_the_session_goes_on(model, tokenizer, monkeypatch):
    k = 3
    stream = GPT.stream

    def interrupted(self: GPT, *args) -> Iterator[torch.Tensor]:
        for produced, token in enumerate(stream(self, *args)):
            if produced == k:
                raise KeyboardInterrupt
            yield token

    session = ChatSession(model, tokenizer, GREEDY)
    monkeypatch.setattr(GPT, "stream", interrupted)
    assert stream_reply(session, "Hello there", lambda piece: None) is False
    monkeypatch.setattr(GPT, "stream", stream)
    partial = session.history[-1]
    full = greedy_ids(model, tokenizer, session.history[:1], GREEDY.max_tokens)
    assert len(full) > k and partial == Reply("assistant", tokenizer.decode(full[:k]), interrupted=True)

    written: list[str] = []
    assert stream_reply(session, "Go on", written.append) is True
    assert "".join(written) == greedy_reply(model, tokenizer, session.history[:3], GREEDY.max_tokens)
    assert [m.role for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_a_long_conversation_drops_its_oldest_exchanges(model, tokenizer):
    session = ChatSession(model, tokenizer, Sampling(temperature=0, top_p=None, max_tokens=8), system="S")
    session.history += [Message("user", "x" * 40), Message("assistant", "y" * 40)]
    session.history.append(Message("user", "last"))
    ids = session.prompt_ids()
    assert ids == render(tokenizer, [session.history[0], session.history[-1]], add_generation_prompt=True)[0]
    assert "left out the 2 oldest messages" in session.notice


def write_run(run: Path, tokenizer: Tokenizer) -> Path:
    return write_model_run(run, tiny_chat_model(), tokenizer)


def test_prompt_prints_the_reply_only(tmp_path, tokenizer, capsys):
    run = write_run(tmp_path / "run", tokenizer)
    args = ["chat", str(run), "--prompt", "Hello there", "--temperature", "0", "--max-tokens", "12"]
    assert main(args) == 0
    expected = greedy_reply(tiny_chat_model(), tokenizer, [Message("user", "Hello there")], 12)
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_loop_answers_until_exit(tmp_path, tokenizer, capsys, monkeypatch):
    run = write_run(tmp_path / "run", tokenizer)
    lines = iter(["Hello there", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda *prompt: next(lines))
    assert main(["chat", str(run), "--temperature", "0", "--max-tokens", "12"]) == 0
    expected = greedy_reply(tiny_chat_model(), tokenizer, [Message("user", "Hello there")], 12)
    assert f"assistant> {expected}\n" in capsys.readouterr().out


def test_a_run_without_chat_tokens_is_refused(tmp_path, capsys):
    run = write_run(tmp_path / "run", byte_tokenizer())
    assert main(["chat", str(run), "--prompt", "Hi"]) == 2
    assert one_error_line(capsys) == (f"flopwise: error: run '{run}' has no chat template: fine-tune it with "
                                      "flopwise sft first (its tokenizer lacks <|im_start|>)")


def test_bad_temperature_is_refused_before_loading(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "no-such-run"), "--temperature", "-1"]) == 2
    assert "--temperature -1.0 must be 0 (greedy)" in capsys.readouterr().err


def test_ctrl_c_while_writing_keeps_the_partial_reply(model, tokenizer):
    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    session = ChatSession(model, tokenizer, GREEDY)
    assert stream_reply(session, "Hello there", interrupt) is False
    partial = session.history[-1]
    assert partial.interrupted and greedy_reply(model, tokenizer, session.history[:1], 12).startswith(partial.content)
    assert partial.content


def test_a_message_that_is_not_utf8_is_not_sent_and_the_chat_goes_on(tmp_path, tokenizer, capsys, monkeypatch):
    """Bytes from a latin-1 terminal on stdin: one note naming the byte, then the next message is answered.  The
    stdin decodes strictly, as outside Python's UTF-8 mode, where reading the line itself used to fail."""
    run = write_run(tmp_path / "run", tokenizer)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nHello there\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", str(run), "--temperature", "0", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "flopwise: note: your message is not UTF-8 text (byte 0xe9 at position 4): give it in UTF-8, e.g. convert "
        "it with iconv -t UTF-8; it was not sent"]
    expected = greedy_reply(tiny_chat_model(), tokenizer, [Message("user", "Hello there")], 12)
    assert f"assistant> {expected}\n" in out


@pytest.mark.parametrize("flag", ["--prompt", "--system"])
def test_a_flag_that_is_not_utf8_is_refused(tmp_path, tokenizer, capsys, flag):
    run = write_run(tmp_path / "run", tokenizer)
    extra = [] if flag == "--prompt" else ["--prompt", "Hi"]
    assert main(["chat", str(run), flag, "caf\udce9", *extra]) == 2  # $'caf\xe9' as Python's argv holds it
    assert one_error_line(capsys) == (f"flopwise: error: {flag} is not UTF-8 text (byte 0xe9 at position 4): give "
                                      "it in UTF-8, e.g. convert it with iconv -t UTF-8")
