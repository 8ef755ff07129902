"""``flopwise sample``: generate text from a run's model, printed as it is sampled."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from flopwise.cli.flags import add_checkpoint_flag, load_sampling_model, require_utf8


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


def cmd_sample(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.sampling import stream_sample

    require_utf8(args.prompt, "--prompt")
    model, tokenizer, top_k = load_sampling_model(args)
    sys.stdout.write(args.prompt)
    for piece in stream_sample(model, tokenizer, args.prompt, args.max_tokens, args.temperature,
                               top_k, args.top_p, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
