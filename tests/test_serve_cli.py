"""`flopwise serve` as a command: it refuses to listen beyond loopback without a key (exit 2, one line, nothing
loaded or bound), refuses bad flags in one line, and as a real process with a key: 401 without it, the key absent
from everything it prints, `--quantize int4` serving the rounded model, and SIGTERM during a streamed reply
finishing that reply before exiting 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from flopwise.data.tokenizer import byte_tokenizer
from flopwise.evaluate.quantized import round_to_int4
from flopwise.posttrain.template import add_chat_tokens
from tests.helpers import run_error, tiny_chat_model, write_model_run

pytest.importorskip("uvicorn", reason="the serve tests need the serve extra: pip install -e '.[test]'")

KEY = "sk-flopwise-test-7f3a9c"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_model_run(tmp_path_factory.mktemp("serve") / "tiny", tiny_chat_model(256),
                           add_chat_tokens(byte_tokenizer()))


def test_a_host_beyond_loopback_without_a_key_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLOPWISE_API_KEY", raising=False)
    err = run_error(capsys, ["serve", str(tmp_path / "no-such-run"), "--host", "0.0.0.0"])
    assert err == ("flopwise: error: --host 0.0.0.0 would let other machines reach the model: give a key with "
                   "--api-key-file FILE or $FLOPWISE_API_KEY (clients send it as a Bearer token), or serve on "
                   "127.0.0.1")


@pytest.mark.parametrize(("args", "message"), [
    (["--api-key-file", "{empty}"], "is empty: write the key on its first line"),
    (["--api-key-file", "{missing}"], "cannot be read (FileNotFoundError)"),
    (["--group", "16"], "--group 16 sets the groups of --quantize int4"),
    (["--max-concurrent", "0"], "--max-concurrent 0 must be at least 1"),
    (["--port", "70000"], "--port 70000 must lie in 0..65535"),
])
def test_bad_flags_are_refused_in_one_line(run, tmp_path, capsys, args, message):
    (tmp_path / "empty").write_text("\n")
    args = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in args]
    assert message in run_error(capsys, ["serve", str(run), *args])


def test_without_the_serve_extra_the_error_names_the_install(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert run_error(capsys, ["serve", str(run)]) == ("flopwise: error: flopwise serve needs the 'serve' extra: "
                                                      "pip install 'flopwise[serve]' (starlette and uvicorn)")


def start_server(run: Path, key_file: Path, *args: str) -> tuple[subprocess.Popen, str, str]:
    """`flopwise serve` as its own process on a free loopback port: the process, its base URL and all it printed
    up to the line that says where it serves."""
    env = {k: v for k, v in os.environ.items() if k != "FLOPWISE_API_KEY"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    process = subprocess.Popen([sys.executable, "-m", "flopwise", "serve", str(run), "--port", "0", "--api-key-file",
                                str(key_file), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    seen = ""
    try:
        while not (match := re.search(r"^serving .* at (http://127\.0\.0\.1:\d+)/", seen, re.MULTILINE)):
            line = process.stdout.readline()
            assert line, f"the server ended before serving: {seen}"
            seen += line
    except BaseException:
        process.kill()  # never leave a server behind
        raise
    return process, match.group(1), seen


@pytest.mark.slow  # a browser / a server process of its own
def test_a_keyed_int4_server_answers_streams_and_stops_cleanly_on_sigterm(run, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    process, url, said = start_server(run, key_file, "--quantize", "int4", "--shutdown-timeout", "20")
    assert "cpu, int4) at" in said and "key required" in said
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {KEY}"}
        greedy = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30,
                            json={"model": "tiny", "prompt": "The river", "max_tokens": 12, "temperature": 0}).json()
        rounded = tiny_chat_model(256)
        round_to_int4(rounded, 32)
        ids = byte_tokenizer().encode_batch(["The river"])[0]
        expected = rounded.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        assert greedy["choices"][0]["text"] == byte_tokenizer().decode(expected)

        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
                "temperature": 0, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=auth, json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(line for line in lines if line))
            process.send_signal(signal.SIGTERM)  # mid-reply: 200 tokens are far from done
            events += [line for line in lines if line]
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = said + process.stdout.read()
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert events[-1] == "data: [DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop") and chunks[-1]["usage"]["total_tokens"] > 0
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 10
    assert "Waiting for connections to close" in output  # the reply was still in flight at SIGTERM
    assert "stopped (SIGTERM)" in output
    assert KEY not in output
