"""``flopwise eval``: a run's held-out loss, perplexity and bits per byte, per domain."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.cli.flags import add_checkpoint_flag
from flopwise.errors import FlopwiseError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="held-out loss, perplexity and bits per byte, per domain",
                            description="Evaluate a run's final model on its held-out split; with --quantize int4, "
                                        "the model its 4-bit export would be (writes eval-int4.json).")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per domain (default: all)")
    p.add_argument("--quantize", choices=("int4",), default=None,
                   help="round every block Linear's weight to int4 first (symmetric, round-to-nearest, one scale "
                        "per group of input columns) and write eval-int4.json instead of eval.json")
    p.add_argument("--group", type=int, default=None,
                   help="input columns per int4 scale (default: the run's methods.qat.group when it trained with "
                        "qat, else 32)")
    add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def eval_table(result: dict, title: str = "held-out evaluation") -> Table:
    """The held-out evaluation per domain and overall (also what `train` prints at the end)."""
    table = Table(title=title)
    for column in ("domain", "loss (nats/token)", "perplexity", "bits/byte", "unigram baseline", "tokens"):
        table.add_column(column, justify="right" if column != "domain" else "left")
    rows = list(result["domains"].items()) + [("all", result)]
    for name, r in rows:
        table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['bpb']:.4f}",
                      f"{r['unigram_loss']:.4f}", f"{r['tokens']:,}")
    return table


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.final import evaluate_run

    if args.max_tokens is not None and args.max_tokens < 1:
        raise FlopwiseError(f"--max-tokens {args.max_tokens} must be a positive number of tokens per domain "
                            "(leave it out to evaluate all)")
    if args.group is not None and args.quantize is None:
        raise FlopwiseError(f"--group {args.group} sets the groups of --quantize int4: add --quantize int4, "
                            "or drop --group")
    result = evaluate_run(args.run, args.device, args.max_tokens, args.checkpoint, args.quantize, args.group)
    if args.quantize is None:
        title, path = "held-out evaluation", args.run / "eval.json"
    else:
        title = f"held-out evaluation of the {args.quantize} model (round-to-nearest, groups of {result['group']})"
        path = args.run / f"eval-{args.quantize}.json"
    console.print(eval_table(result, title))
    path.write_text(json.dumps(result, indent=1))
    console.print(f"written: {path}", highlight=False)
    return 0
