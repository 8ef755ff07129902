"""The flags that describe a run's setup (budget, data, recipe, config file, overrides, memory),
shared by `train`, `plan` and `scan` so that a plan and its run read the same configuration."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flopwise.budget import Budget
from flopwise.config import MEMORY_METHODS, RunConfig, load_config
from flopwise.recipes import recipe_values


def add_setup_flags(p: argparse.ArgumentParser, budget_help: str) -> None:
    p.add_argument("--budget", help=budget_help)
    p.add_argument("--data", action="append", metavar="PATH",
                   help="text file, folder (recursive), .jsonl, .parquet, or 'stdlib' (default); repeatable")
    p.add_argument("--val-data", action="append", metavar="PATH",
                   help="explicit held-out source instead of a split of --data; repeatable")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching, e.g. '*.md'; repeatable")
    p.add_argument("--config", type=Path, help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. model.d_model=256; repeatable, applied last")
    p.add_argument("--recipe", default="default", metavar="NAME",
                   help="'default' (flopwise's recipe) or 'baseline' (nanoGPT's GPT-2 setup, for comparison); "
                        "config file and --set apply on top")
    p.add_argument("--tokenizer", help="'bpe' (default, trained on your data), 'byte', or a tokenizer.json path")
    p.add_argument("--seed", type=int, help="fixes data order, initialization and everything random")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory cap, e.g. 4GiB: flopwise estimates the peak and picks the memory-saving methods "
                        "with the least quality cost that fit (see `flopwise memory`), or says why nothing fits")
    p.add_argument("--method", action="append", metavar="NAME", choices=MEMORY_METHODS,
                   help="memory-saving method, repeatable: " + ", ".join(MEMORY_METHODS)
                        + " (overrides the choice --memory would make)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe, then the config file, then the convenience flags, then ``--set`` overrides."""
    flags = (("model.size", "model"), ("data.tokenizer", "tokenizer"), ("train.seed", "seed"),
             ("train.device", "device"), ("data.sources", "data"), ("data.val_sources", "val_data"),
             ("data.include", "include"), ("train.compile", "compile"), ("model.init_from", "init_from"),
             ("train.parallel", "parallel"), ("train.log", "log"), ("memory.limit", "memory"),
             ("memory.methods", "method"), ("train.law", "law"), ("train.target_loss", "target_loss"))
    values: dict[str, Any] = {}
    for key, name in flags:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            values[key] = str(value) if isinstance(value, Path) else value
    if args.budget:
        values.update({f"budget.{name}": amount for name, amount in Budget.parse(args.budget).to_dict().items()})
    return load_config(args.config, args.overrides, values, base=recipe_values(args.recipe))
