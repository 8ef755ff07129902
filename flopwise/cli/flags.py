"""The flags that describe a run's setup (budget, data, recipe, config file, overrides, memory),
shared by `train`, `plan`, `scan` and `data` so that a plan and its run read the same configuration.

``CONFIG_FLAGS`` is the one table from a flag to the config key it sets (``methods.use``: the flag's
methods join the list), and ``SWITCH_FLAGS`` are the flags that also turn on the method whose setting they set
(``--reweight`` sets ``methods.reweight.strategy`` and turns ``reweight`` on): ``config_from_args`` builds the
config from them, and ``train --resume`` refuses every flag in them (a resumed run keeps its config).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flopwise.errors import FlopwiseError
from flopwise.recipes import recipe_values

if TYPE_CHECKING:  # the config imports the methods (and torch) on first use, not for --help
    from flopwise.config import RunConfig
    from flopwise.data.tokenizer import Tokenizer
    from flopwise.model.gpt import GPT

DEFAULT_RECIPE = "default"

# flag -> the config key it sets (the flag's argparse dest is its name with '_' for '-')
CONFIG_FLAGS: dict[str, str] = {
    "--model": "model.size", "--tokenizer": "data.tokenizer", "--seed": "train.seed", "--device": "train.device",
    "--data": "data.sources", "--val-data": "data.val_sources", "--include": "data.include",
    "--compile": "train.compile", "--init-from": "model.init_from", "--parallel": "train.parallel",
    "--log": "train.log", "--memory": "memory.limit", "--method": "methods.use", "--law": "train.law",
    "--target-loss": "train.target_loss", "--dedup": "data.dedup",
    "--online-mixture": "methods.online_mixture.rule", "--reference": "methods.online_mixture.reference",
    "--reweight": "methods.reweight.strategy", "--curriculum": "methods.curriculum.order",
    "--teacher": "methods.salt.teacher", "--distill-from": "methods.distill.teacher",
}
# flags that turn on the method whose setting (methods.<method>.<setting>) they set: it joins methods.use
SWITCH_FLAGS = ("--online-mixture", "--reweight", "--curriculum", "--teacher", "--distill-from")


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
    p.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="NAME",
                   help="'default' (flopwise's recipe), 'stock' (the default with a model that stock transformers "
                        "loads, no remote code) or 'baseline' (nanoGPT's GPT-2 setup, for comparison); config file "
                        "and --set apply on top")
    p.add_argument("--tokenizer", help="'bpe' (default, trained on your data), 'byte', or a tokenizer.json path")
    p.add_argument("--seed", type=int, help="fixes data order, initialization and everything random")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory cap, e.g. 4GiB: flopwise estimates the peak and picks the memory-saving methods "
                        "with the least quality cost that fit (see `flopwise memory`), or says why nothing fits")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="a training method to use (joins methods.use), repeatable, e.g. --method galore --method "
                        "8bit; memory-saving ones override the choice --memory would make (docs/methods.md lists "
                        "every method; an unknown name is refused with the list)")


def add_data_method_flags(p: argparse.ArgumentParser) -> None:
    """The data-side methods' flags (flopwise/methods/online_mixture.py, reweight.py, curriculum.py, salt.py)."""
    p.add_argument("--online-mixture", choices=("loss", "excess"),
                   help="adapt the domain weights during the run: toward domains with higher training loss "
                        "('loss'), or with higher loss than --reference's ('excess', DoReMi)")
    p.add_argument("--reference", metavar="RUN", help="finished run on the same data, for --online-mixture excess")
    p.add_argument("--reweight", nargs="?", const="linupper", choices=("linupper", "quadratic", "extremes"),
                   help="reweight each sequence by its loss in the batch (Sow et al. 2025; default strategy "
                        "linupper, temperature 0.4: see methods.reweight.*)")
    p.add_argument("--curriculum", choices=("rarity", "teacher"),
                   help="easy-to-hard order: by token rarity, or by the loss of methods.curriculum.scorer "
                        "(see methods.curriculum.*)")
    p.add_argument("--teacher", metavar="RUN",
                   help="SALT: a small finished run (same tokenizer) that distills into the first part of the "
                        "budget (methods.salt.kd_weight, kd_until) and can pick batches (methods.salt.select_pool)")
    add_distill_flag(p)


def add_distill_flag(p: argparse.ArgumentParser) -> None:
    """--distill-from, for `train` and `sft` (flopwise/methods/distill.py)."""
    p.add_argument("--distill-from", metavar="RUN",
                   help="distil a larger finished run (or Hugging Face folder, same tokenizer) into this model: its "
                        "logits' KL joins the loss (methods.distill.weight, weight_end, temperature); its forward "
                        "passes count in the budget")


def add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    """--checkpoint, for the commands that read a run's model (eval, sample, export)."""
    p.add_argument("--checkpoint", action="store_true",
                   help="use the run's newest checkpoint instead of its final model (an unfinished run)")


def load_sampling_model(args: argparse.Namespace) -> tuple[GPT, Tokenizer, int | None]:
    """The run's model and tokenizer for `sample` and `chat`, and their top-k (``--top-k 0``: off, None); the
    sampling flags are checked first, so a bad one is refused before the model is loaded."""
    from flopwise.evaluate.load import load_run_model
    from flopwise.evaluate.sampling import check_sampling
    from flopwise.runtime import choose_device

    top_k = None if args.top_k == 0 else args.top_k
    check_sampling(args.max_tokens, args.temperature, top_k, args.top_p)
    model, tokenizer = load_run_model(args.run, choose_device(args.device), args.checkpoint)
    return model, tokenizer, top_k


def require_utf8(text: str, what: str) -> str:
    """``text`` as given, refused in one line when it holds bytes that are not UTF-8: Python keeps such bytes
    of the command line and of stdin as lone surrogates, which no tokenizer can encode."""
    raw = text.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FlopwiseError(f"{what} is not UTF-8 text (byte {raw[error.start]:#04x} at position {error.start + 1}): "
                            "give it in UTF-8, e.g. convert it with iconv -t UTF-8") from None
    return text


def _flag_value(args: argparse.Namespace, flag: str) -> Any:
    """The flag's value, None when not given or when this command has no such flag."""
    value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
    return None if value is False else value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe, then the config file, then the convenience flags, then ``--set`` overrides; the methods the
    flags name join those of the recipe and the file."""
    from flopwise.budget import Budget  # pydantic: imported once a run holds its folder (flopwise/cli/train.py)
    from flopwise.config import load_config

    values: dict[str, Any] = {}
    methods: list[str] = []
    for flag, key in CONFIG_FLAGS.items():
        value = _flag_value(args, flag)
        if value is None:
            continue
        if key == "methods.use":
            methods += value
        else:
            values[key] = str(value) if isinstance(value, Path) else value
        if flag in SWITCH_FLAGS:
            methods.append(key.split(".")[1])
    budget = getattr(args, "budget", None)
    if budget:
        values.update(Budget.parse(budget).config_values())
    return load_config(args.config, args.overrides, values, base=recipe_values(args.recipe), methods=methods)


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The flags in ``args`` that change the config ``config_from_args`` builds, other than --budget:
    those of ``CONFIG_FLAGS``, then --config, --set and --recipe."""
    layers = {"--config": args.config is not None, "--set": bool(args.overrides),
              "--recipe": args.recipe != DEFAULT_RECIPE}
    given = [flag for flag in CONFIG_FLAGS if _flag_value(args, flag) is not None]
    return given + [flag for flag, on in layers.items() if on]
