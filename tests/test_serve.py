"""`flopwise serve`: the official `openai` client against the server on a loopback port (greedy replies equal
`flopwise chat`'s decode, streamed and whole, with token usage), stop strings cut as OpenAI's API cuts them, a
seeded request gives the same text alone and among many, bad requests get OpenAI-style 4xx JSON while the server
keeps serving, and the chat page streams and stops a reply in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from flopwise.data.tokenizer import Tokenizer, byte_tokenizer
from flopwise.model.gpt import GPT
from flopwise.posttrain.chat import ChatSession, Sampling
from flopwise.posttrain.template import add_chat_tokens
from flopwise.serve.app import ServeSettings
from flopwise.serve.engine import Decoding, Engine, _held_back
from tests.helpers import headless_chromium, serving, tiny_chat_model, watch_page_problems

openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install -e '.[test]'")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # servers on loopback ports

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return add_chat_tokens(byte_tokenizer())


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_chat_model()


@pytest.fixture
def slow_decoding(monkeypatch) -> None:
    """Every model samples a token per 20 ms: a reply of 100 tokens is still in flight when a test acts on it.
    (At temperature 0 the untrained model repeats one token and never ends early.)"""
    stream = GPT.stream

    def slow(self: GPT, *args, **kwargs) -> Iterator[torch.Tensor]:
        for token in stream(self, *args, **kwargs):
            time.sleep(0.02)
            yield token

    monkeypatch.setattr(GPT, "stream", slow)


@pytest.fixture(scope="module")
def server(model, tokenizer) -> Iterator[str]:
    with serving(Engine(model, tokenizer, max_active=4, max_waiting=64), ServeSettings("tiny", chat=True)) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_reference(model: GPT, tokenizer: Tokenizer, max_tokens: int) -> str:
    """What `flopwise chat --temperature 0` replies to MESSAGES."""
    session = ChatSession(model, tokenizer, Sampling(temperature=0, top_p=None, max_tokens=max_tokens),
                          system=MESSAGES[0]["content"])
    return "".join(session.reply(MESSAGES[1]["content"]))


def test_models_lists_the_served_run(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_a_streamed_greedy_chat_reply_is_flopwise_chats_reply_with_usage(client, model, tokenizer):
    expected = chat_reference(model, tokenizer, 24)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == expected
    assert whole.usage.model_dump() == usage.model_dump()


def test_usage_counts_the_rendered_prompt_and_the_reply(client, model, tokenizer):
    from flopwise.posttrain.chat import fit_prompt
    from flopwise.posttrain.conversations import Message

    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=10)
    ids, _ = fit_prompt(tokenizer, [Message(m["role"], m["content"]) for m in MESSAGES], model.config.context, 10)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 10


def test_a_completion_continues_the_prompt_greedily(client, model, tokenizer):
    result = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0)
    ids = tokenizer.encode_batch(["The river"])[0]
    expected = model.generate(torch.tensor([ids]), 16, temperature=0)[0, len(ids):].tolist()
    eos = expected.index(tokenizer.eos_id) if tokenizer.eos_id in expected else len(expected)
    assert result.choices[0].text == tokenizer.decode(expected[:eos])
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == eos

    streamed = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text


def test_a_stop_string_cuts_the_reply_before_it(client):
    full = client.completions.create(model="tiny", prompt="ab", max_tokens=40, temperature=1, seed=3)
    text = full.choices[0].text
    stop = text[5:7]  # a string the reply is known to contain
    assert len(stop) == 2 and full.choices[0].finish_reason == "length"
    cut = client.completions.create(model="tiny", prompt="ab", max_tokens=40, temperature=1, seed=3, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="ab", max_tokens=40, temperature=1, seed=3,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_held_back_is_the_longest_end_that_could_begin_a_stop_string():
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz", "lo!")) == 2
    assert _held_back("hello", ()) == 0 and _held_back("hello", ("q",)) == 0


def test_a_seeded_request_gives_the_same_text_alone_and_among_many(server, client):
    def ask(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="x", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    alone = {seed: ask(seed) for seed in range(6)}
    assert len(set(alone.values())) > 1  # the seeds matter
    together: dict[int, str] = {}

    def worker(seed: int) -> None:
        together[seed] = ask(seed)

    threads = [threading.Thread(target=worker, args=(seed % 6,)) for seed in range(18)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone


def test_a_pretrained_run_serves_completions_but_refuses_chat(model):
    plain = byte_tokenizer()
    with serving(Engine(model, plain, 1, 1), ServeSettings("base", chat=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="not fine-tuned for chat"):
            client.chat.completions.create(model="base", messages=MESSAGES)
        assert client.completions.create(model="base", prompt="a", max_tokens=3).usage.completion_tokens <= 3


BAD_REQUESTS = [  # (what, body, status, the param named)
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, None),
    ("a body that is not an object", b"[1, 2]", 400, None),
    ("an unknown model", {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    ("negative max_tokens", {"model": "tiny", "messages": MESSAGES, "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**9}, 400, "max_tokens"),
    ("temperature -1", {"model": "tiny", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("messages not a list", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("an unknown role", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("n above 1", {"model": "tiny", "messages": MESSAGES, "n": 3}, 400, "n"),
    ("a body over the limit", {"model": "tiny", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413, None),
]


@pytest.mark.parametrize(("what", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_a_json_4xx_and_the_server_keeps_serving(server, client, what, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and len(error["message"]) > 10
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.completion_tokens > 0


def test_unknown_routes_and_methods_are_json_errors(server):
    assert httpx.get(f"{server}/v2/anything").json()["error"]["message"].startswith("no route /v2/anything")
    response = httpx.get(f"{server}/v1/chat/completions")
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]["message"]


def test_beyond_the_slots_and_the_queue_a_request_gets_429(model, tokenizer, slow_decoding):
    with serving(Engine(model, tokenizer, 1, 0), ServeSettings("tiny", chat=True)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        long_reply = client.completions.create(model="tiny", prompt="a", max_tokens=100, temperature=0, stream=True)
        next(iter(long_reply))  # in flight: the one slot is taken
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model="tiny", prompt="b", max_tokens=2)
        long_reply.close()  # the client goes away: the server sees it at its next chunk, and frees the slot
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json() | {"status": "ok"} == {"status": "ok", "model": "tiny", "chat": True,
                                                                         "key_required": False, "active": 0,
                                                                         "waiting": 0}
        assert client.completions.create(model="tiny", prompt="b", max_tokens=2).usage.completion_tokens == 2


def test_a_key_guards_the_api_but_not_the_page(model, tokenizer):
    key = "sk-test-1234567890"
    with serving(Engine(model, tokenizer, 1, 4), ServeSettings("tiny", chat=True, key=key)) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test-1234567891", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key is required"):
            wrong.models.list()
        for headers in ({}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):  # none, or not as Bearer
            response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").json()["key_required"] is True
        assert httpx.get(f"{url}/").status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_cors_is_off_unless_an_origin_is_given(model, tokenizer):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    with serving(Engine(model, tokenizer, 1, 1), ServeSettings("tiny", chat=True)) as url:
        assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/completions", headers=preflight).headers
    with serving(Engine(model, tokenizer, 1, 1), ServeSettings("tiny", True, cors_origin="http://localhost:3000")) as url:
        response = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_the_engine_ends_a_cancelled_generation(model, tokenizer):
    async def run() -> tuple[str | None, int]:
        engine = Engine(model, tokenizer, 1, 0)
        generation = engine.submit(Decoding([1, 2, 3], 100, 1.0, None, 0, frozenset()))
        pieces = generation.pieces()
        await pieces.__anext__()
        generation.cancel()
        rest = [piece async for piece in pieces]
        return generation.finish_reason, len(rest)

    reason, _ = asyncio.run(run())
    assert reason == "cancelled"


def test_the_page_is_self_contained(server):
    page = httpx.get(f"{server}/").text
    assert "<title>flopwise chat</title>" in page
    assert "http://" not in page and "https://" not in page  # nothing loaded from the internet


def test_the_page_streams_a_reply_and_stops_one_in_chromium(model, tokenizer, slow_decoding):
    expected = chat_reference_for(model, tokenizer, "Hello there", 20, seed=1)
    problems: list[str] = []
    with serving(Engine(model, tokenizer, 2, 4), ServeSettings("tiny", chat=True)) as url, \
            headless_chromium() as browser:
        page = browser.new_page()
        watch_page_problems(page, problems)
        page.goto(url + "/", wait_until="load")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#temperature", "1")
        page.fill("#top_p", "1")
        page.fill("#seed", "1")
        page.fill("#max_tokens", "20")
        page.fill("#message", "Hello there")
        page.press("#message", "Enter")
        page.wait_for_function("document.body.dataset.busy === 'no' && document.querySelector('.assistant')")
        assert page.eval_on_selector(".assistant", "e => e.textContent") == expected and len(expected) > 5
        assert "reply tokens" in page.locator("#status").inner_text()

        page.fill("#temperature", "0")  # greedy: the reply runs to max_tokens, 2 s
        page.fill("#max_tokens", "100")
        page.fill("#message", "Go on")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant')[1].textContent.length > 0")
        page.click("#stop")
        page.wait_for_function("document.body.dataset.busy === 'no'")
        stopped = page.locator(".assistant").nth(1)
        assert "stopped" in stopped.get_attribute("class") and page.locator("#status").inner_text() == "stopped"
        assert 0 < len(stopped.evaluate("e => e.textContent")) < 100
        page.fill("#max_tokens", "5")  # the conversation goes on after a stop
        page.fill("#message", "Third")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant').length === 3 && "
                               "document.body.dataset.busy === 'no'")
        assert page.locator(".turn.error").count() == 0
    aborted = [p for p in problems if "request failed" in p and "/v1/chat/completions" in p]
    assert [p for p in problems if p not in aborted] == [] and len(aborted) <= 1


def chat_reference_for(model: GPT, tokenizer: Tokenizer, text: str, max_tokens: int, seed: int) -> str:
    """What `flopwise chat --temperature 1 --top-p 1 --seed SEED` replies to ``text``."""
    session = ChatSession(model, tokenizer, Sampling(temperature=1, top_p=None, max_tokens=max_tokens, seed=seed))
    return "".join(session.reply(text))
