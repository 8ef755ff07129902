"""`flopwise serve` under load, on loopback only: 32 concurrent clients x 4 streamed chat requests each, against the
same 128 requests sent one at a time.  Every request has its own seed, so each concurrent reply must equal its
one-at-a-time reply exactly ("mixed" counts those that differ).  Each server is a real `flopwise serve`
process; they differ in how many requests take turns token by token (``--max-concurrent``: 32, the default,
and 8) against a plain first-come queue (``--max-concurrent 1``).  Batched decoding is not built
(flopwise/serve/engine.py says why).

Per row: requests answered, mixed, latency p50/p95 (request to last byte), time to first token p50/p95, and
tokens/s (completion tokens over the phase's wall clock).  Prints a table and writes bench/results/serve.json.
Bounded: 128 requests of at most --max-tokens each, per phase, and a timeout on each.

    python bench/serve.py                      # an untrained tiny model (byte tokenizer with the chat tokens)
    python bench/serve.py --run runs/sft       # a run of yours
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
ROOT = HERE.parent
CLIENTS, PER_CLIENT = 32, 4


def tiny_run(folder: Path) -> Path:
    """An untrained `tiny` model (the named size) with a byte tokenizer and the chat tokens, as a run folder."""
    import torch

    from flopwise.data.tokenizer import byte_tokenizer
    from flopwise.model.config import NAMED_SIZES, ModelConfig
    from flopwise.model.gpt import GPT
    from flopwise.model.hf import save_hf_folder
    from flopwise.posttrain.template import add_chat_tokens, resize_for_tokenizer

    torch.manual_seed(0)
    tokenizer = add_chat_tokens(byte_tokenizer())
    model = GPT(ModelConfig(vocab_size=257, **NAMED_SIZES["tiny"]))
    resize_for_tokenizer(model, tokenizer.vocab_size)
    run = folder / "tiny"
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "plan.json").write_text(json.dumps({"model": model.config.to_dict()}))
    save_hf_folder(model, tokenizer, run / "final")
    return run


def start(run: Path, max_concurrent: int) -> tuple[subprocess.Popen, str, str]:
    """`flopwise serve RUN` on a free loopback port: the process, its base URL and its model id."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLOPWISE_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "flopwise", "serve", str(run), "--port", "0",
                                "--max-concurrent", str(max_concurrent), "--max-queue", str(CLIENTS * PER_CLIENT)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if match := re.match(r"serving '(.+?)' .* at (http://127\.0\.0\.1:\d+)/", line):
            return process, match.group(2), match.group(1)
    raise SystemExit(f"flopwise serve ended before serving (exit {process.wait()})")


def request_body(model: str, index: int, max_tokens: int) -> dict:
    return {"model": model, "stream": True, "temperature": 1.0, "seed": index, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Tell me about request {index}."}]}


async def ask(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: its text, completion tokens, latency and time to first token (seconds)."""
    started = time.perf_counter()
    first, text, usage = None, [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first if first is not None else time.perf_counter() - started
                    text.append(choice["delta"]["content"])
    return {"text": "".join(text), "tokens": usage["completion_tokens"], "latency": time.perf_counter() - started,
            "first_token": first if first is not None else time.perf_counter() - started}


async def one_at_a_time(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        results = [await ask(client, url, body) for body in bodies]
        return results, time.perf_counter() - started


async def concurrently(url: str, bodies: list[dict]) -> tuple[list[dict | None], float]:
    """CLIENTS clients at once, each sending its PER_CLIENT requests one after another."""
    results: list[dict | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=CLIENTS)

    async def client_loop(client: httpx.AsyncClient, first: int) -> None:
        for index in range(first, len(bodies), CLIENTS):
            results[index] = await ask(client, url, bodies[index])

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, c) for c in range(CLIENTS)))
        return results, time.perf_counter() - started


def summary(results: list[dict | None], wall: float, reference: list[dict]) -> dict:
    done = [r for r in results if r is not None]
    latencies = sorted(r["latency"] for r in done)
    firsts = sorted(r["first_token"] for r in done)

    def p95(values: list[float]) -> float:
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]

    return {"requests": len(results), "answered": len(done),
            "mixed": sum(1 for r, ref in zip(results, reference) if r is None or r["text"] != ref["text"]),
            "latency_p50": statistics.median(latencies), "latency_p95": p95(latencies),
            "first_token_p50": statistics.median(firsts), "first_token_p95": p95(firsts),
            "tokens": sum(r["tokens"] for r in done), "wall": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a run fine-tuned for chat (default: untrained tiny)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply at most (default 48)")
    parser.add_argument("--max-concurrent", type=int, nargs="+", default=[32, 8, 1],
                        help="the servers to compare, by their decode slots (default 32 8 1; 32 is serve's default)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = args.run or tiny_run(Path(folder))
        rows: dict[str, dict] = {}
        reference: list[dict] = []
        for max_concurrent in args.max_concurrent:
            scheduler = f"--max-concurrent {max_concurrent}" + (" (a plain queue)" if max_concurrent == 1 else "")
            process, url, model = start(run, max_concurrent)
            try:
                bodies = [request_body(model, i, args.max_tokens) for i in range(CLIENTS * PER_CLIENT)]
                alone, wall = asyncio.run(one_at_a_time(url, bodies))
                reference = reference or alone
                rows[f"one at a time, {scheduler}"] = summary(alone, wall, reference)
                together, wall = asyncio.run(concurrently(url, bodies))
                rows[f"{CLIENTS} clients x {PER_CLIENT}, {scheduler}"] = summary(together, wall, reference)
            finally:
                process.terminate()
                process.wait(timeout=60)
    table = Table(title=f"flopwise serve on loopback: {CLIENTS * PER_CLIENT} streamed chat requests, "
                        f"up to {args.max_tokens} tokens each")
    for column in ("phase", "answered", "mixed", "latency p50", "p95", "first token p50", "p95", "tokens/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, r in rows.items():
        table.add_row(phase, f"{r['answered']}/{r['requests']}", str(r["mixed"]), f"{r['latency_p50']:.3f}s",
                      f"{r['latency_p95']:.3f}s", f"{r['first_token_p50']:.3f}s", f"{r['first_token_p95']:.3f}s",
                      f"{r['tokens_per_s']:.0f}")
    Console(width=150).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run or "untrained tiny"), "max_tokens": args.max_tokens,
                                    "clients": CLIENTS, "per_client": PER_CLIENT, "rows": rows}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
