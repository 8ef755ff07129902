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
    p.add_argument("--data", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                   help="text file, folder (recursive), .jsonl, .parquet, or 'stdlib' (default); repeatable. "
                        "NAME= makes its documents domain NAME (held-out loss is reported per domain); :WEIGHT "
                        "gives that domain this share of the training tokens, e.g. --data code=./src:0.3 "
                        "--data prose=./docs:0.7")
    p.add_argument("--dedup", choices=("none", "exact", "near"),
                   help="remove duplicate documents at ingest: exact (default) or also near-duplicates (MinHash)")
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


def add_data_method_flags(p: argparse.ArgumentParser) -> None:
    """The data-side methods (flopwise/data/mixture.py, methods/sample_weights.py, methods/salt.py)."""
    p.add_argument("--online-mixture", choices=("loss", "excess"),
                   help="adapt the domain weights during the run: toward domains with higher training loss "
                        "('loss'), or with higher loss than --reference's ('excess', DoReMi)")
    p.add_argument("--reference", metavar="RUN", help="finished run on the same data, for --online-mixture excess")
    p.add_argument("--reweight", nargs="?", const="linupper", choices=("linupper", "quadratic", "extremes"),
                   help="reweight each sequence by its loss in the batch (Sow et al. 2025; default strategy "
                        "linupper, temperature 0.4: see reweight.*)")
    p.add_argument("--curriculum", choices=("rarity", "teacher"),
                   help="easy-to-hard order: by token rarity, or by the loss of curriculum.scorer (see curriculum.*)")
    p.add_argument("--teacher", metavar="RUN",
                   help="SALT: a small finished run (same tokenizer) that distills into the first part of the "
                        "budget (salt.kd_weight, salt.kd_until) and can pick batches (salt.select_pool)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe, then the config file, then the convenience flags, then ``--set`` overrides."""
    flags = (("model.size", "model"), ("data.tokenizer", "tokenizer"), ("train.seed", "seed"),
             ("train.device", "device"), ("data.sources", "data"), ("data.val_sources", "val_data"),
             ("data.include", "include"), ("train.compile", "compile"), ("model.init_from", "init_from"),
             ("train.parallel", "parallel"), ("train.log", "log"), ("memory.limit", "memory"),
             ("memory.methods", "method"), ("train.law", "law"), ("train.target_loss", "target_loss"),
             ("data.dedup", "dedup"), ("mixture.online", "online_mixture"), ("mixture.reference", "reference"),
             ("reweight.strategy", "reweight"), ("curriculum.order", "curriculum"), ("salt.teacher", "teacher"))
    values: dict[str, Any] = {}
    for key, name in flags:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            values[key] = str(value) if isinstance(value, Path) else value
    if args.budget:
        values.update({f"budget.{name}": amount for name, amount in Budget.parse(args.budget).to_dict().items()})
    return load_config(args.config, args.overrides, values, base=recipe_values(args.recipe))
