"""Sampling speed: KV-cached decoding (what `flopwise sample` does) against recomputing the whole
window for every new token, on a randomly initialized model of a named size.

Speed does not depend on the weights, so no training is needed.  Arms alternate over repeats so
machine drift cancels; prints the table and writes bench/results/sampling.json.

    python bench/sampling.py --size small --tokens 200 --prompt-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config
from flopwise.model.config import NAMED_SIZES
from flopwise.model.gpt import GPT, sample_next

HERE = Path(__file__).parent


@torch.no_grad()
def recompute(model: GPT, idx: torch.Tensor, tokens: int, generator: torch.Generator) -> None:
    """The cache-free baseline: a full forward over the last seq_len tokens per new token."""
    for _ in range(tokens):
        logits = model(idx[:, -model.config.seq_len:])[0][:, -1]
        idx = torch.cat((idx, sample_next(logits, 0.8, 50, None, generator)), dim=1)


def cached(model: GPT, idx: torch.Tensor, tokens: int, generator: torch.Generator) -> float:
    """Decode with the KV cache; returns seconds to the first token (prompt processing)."""
    start = time.perf_counter()
    first = None
    for token in model.stream(idx, tokens, 0.8, 50, None, generator):
        first = first if first is not None else time.perf_counter() - start
    return first or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=list(NAMED_SIZES))
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the default BPE's)")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sampling.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(load_config(None, [f"model.size={args.size}"]).model.build(args.vocab)).eval()  # default recipe
    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens))
    seconds: dict[str, list[float]] = {"KV cache (flopwise sample)": [], "recompute window": []}
    first_token: list[float] = []
    cached(model, prompt, 5, torch.Generator().manual_seed(0))  # warm-up
    for repeat in range(args.repeats):
        start = time.perf_counter()
        first_token.append(cached(model, prompt, args.tokens, torch.Generator().manual_seed(repeat)))
        seconds["KV cache (flopwise sample)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        recompute(model, prompt, args.tokens, torch.Generator().manual_seed(repeat))
        seconds["recompute window"].append(time.perf_counter() - start)
    baseline = statistics.median(seconds["recompute window"])
    table = Table(title=f"sampling {args.tokens} tokens, model '{args.size}', {args.prompt_tokens}-token prompt, "
                        f"{torch.get_num_threads()} threads")
    for column in ("decoding", "tokens/s (median)", "ms/token", "speedup"):
        table.add_column(column, justify="right")
    rows = []
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"decoding": name, "tokens_per_s": args.tokens / median,
                     "ms_per_token": 1000 * median / args.tokens, "speedup": baseline / median, "seconds": values})
        table.add_row(name, f"{args.tokens / median:,.0f}", f"{1000 * median / args.tokens:.2f}",
                      f"{baseline / median:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"time to first token: {1000 * statistics.median(first_token):.1f} ms", highlight=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                                    "first_token_ms": 1000 * statistics.median(first_token), "rows": rows}, indent=1))
    console.print(f"written: {args.out}", highlight=False)


if __name__ == "__main__":
    main()
