"""``flopwise data``: read, clean and tokenize the data as a run would, and show what it holds.

The summary is what a user checks before spending a budget: how many documents each source gave,
what deduplication and the quality filters removed (per domain), and how many training and held-out
tokens each domain has, so a mixture's weights can be set knowing how often a small domain repeats.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.atomic import write_json_atomic
from flopwise.cli.flags import add_setup_flags, config_from_args
from flopwise.rundir import check_output

EPILOG = """\
examples:
  flopwise data                                        # the built-in corpus (stdlib: code and prose)
  flopwise data --data code=./src --data docs=./docs --dedup near
  flopwise data --data ./texts --set data.min_chars=200 --set data.max_duplicate_line_share=0.3 --out summary.json
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="summarize the data a run would train on: documents, duplicates, tokens",
                            description="Read, deduplicate, filter and tokenize the data exactly as `flopwise "
                                        "train` would (the result is cached for the run), and print a summary "
                                        "per domain.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_flags(p, "unused here (accepted so the same command line works)")
    p.add_argument("--out", type=Path, help="also write the summary as JSON here")


def cmd_data(args: argparse.Namespace, console: Console) -> int:
    from flopwise.data.pipeline import prepare_data
    from flopwise.methods.stack import MethodStack
    from flopwise.resolve import resolve

    check_output("--out", args.out, folder=False)
    config = resolve(config_from_args(args), settle_memory=False).config  # the methods the data implies, too
    prepared = prepare_data(config.data, config.train.seed)
    summary = prepared.summary()
    weights = MethodStack(config.methods).domain_weights(config.data.sources, summary["domains"])
    hygiene = summary["hygiene"]
    table = Table(title=f"data: {hygiene['documents_in']:,} documents read, {hygiene['documents_out']:,} kept "
                        f"({hygiene['exact_duplicates']:,} exact and {hygiene['near_duplicates']:,} near duplicates, "
                        f"{sum(hygiene['filtered'].values()):,} filtered)")
    for column in ("domain", "documents read", "removed", "train tokens", "held-out tokens", "share of train",
                   "mixture weight"):
        table.add_column(column, justify="right" if column != "domain" else "left")
    train_tokens = summary["domain_tokens"]["train"]
    total = sum(train_tokens.values())
    for index, domain in enumerate(summary["domains"]):
        counts = hygiene["per_domain"].get(domain, {"documents_in": 0, "removed": 0})
        weight = f"{weights[index] / sum(weights):.3f}" if weights else "natural"
        table.add_row(domain, f"{counts['documents_in']:,}", f"{counts['removed']:,}", f"{train_tokens[domain]:,}",
                      f"{summary['domain_tokens']['val'][domain]:,}", f"{train_tokens[domain] / total:.3f}", weight)
    console.print(table)
    if prepared.stats.describe():
        console.print("read: " + prepared.stats.describe().removeprefix(", "), highlight=False)
    if hygiene["filtered"]:
        console.print("filters: " + ", ".join(f"{name} removed {count}" for name, count in hygiene["filtered"].items()),
                      highlight=False)
    if args.out:
        write_json_atomic(args.out, summary)
        console.print(f"written: {args.out}", highlight=False)
    return 0
