"""``flopwise sample``: generate text from a run's model, printed as it is sampled."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from rich.console import Console

from flopwise.cli.flags import add_checkpoint_flag
from flopwise.errors import FlopwiseError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sample", help="generate text from a run's final model",
                            description="Generate text from a run's final model, printed as it is sampled "
                                        "(KV-cached decoding).",
                            epilog="examples:\n  flopwise sample runs/a --prompt 'def main(' --top-p 0.9\n"
                                   "  flopwise sample runs/a --prompt 'import os' --temperature 0   # greedy",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50; 0: off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this much probability, e.g. 0.9")
    p.add_argument("--seed", type=int, default=0)
    add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags, refused before the model is loaded and before anything is printed."""
    if args.max_tokens < 1:
        raise FlopwiseError(f"--max-tokens {args.max_tokens} must be a positive number of tokens to generate")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise FlopwiseError(f"--temperature {args.temperature} must be 0 (greedy) or a positive number, e.g. 0.8")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise FlopwiseError(f"--top-p {args.top_p} must lie in (0, 1], e.g. 0.9")
    if args.top_k < 0:
        raise FlopwiseError(f"--top-k {args.top_k} must be 0 (off) or a positive number of tokens, e.g. 50")


def cmd_sample(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.final import load_run_model, stream_sample
    from flopwise.runtime import choose_device

    check_sampling_flags(args)
    model, tokenizer = load_run_model(args.run, choose_device(args.device), args.checkpoint)
    sys.stdout.write(args.prompt)
    for piece in stream_sample(model, tokenizer, args.prompt, args.max_tokens, args.temperature,
                               args.top_k or None, args.top_p, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
