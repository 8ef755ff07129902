"""Helpers the test modules share (kept here, not imported from one test module into another)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flopwise.cli import main
from flopwise.config import RunConfig, load_config
from flopwise.methods.stack import MethodStack
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config
from flopwise.rundir import read_metrics

TINY = ["--tokenizer", "byte", "--set", "model.size=tiny", "--set", "model.seq_len=64",
        "--set", "optim.batch_size=4", "--set", "train.eval_tokens=2048", "--set", "train.log_every=1"]


def train(*args: str) -> int:
    return main(["train", *args])


def train_events(run: Path) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in train_events(run)]


def load_hf_model(folder: Path, seq_len: int | None = None) -> GPT:
    """A flopwise GPT with a Hugging Face folder's weights, training context ``seq_len`` (default: the
    folder's max_position_embeddings), as --init-from imports them."""
    config = read_hf_config(folder)
    model = GPT(model_config_from_hf(config, folder, seq_len or config.get("max_position_embeddings") or 2048))
    load_weights_into(model, folder)
    return model


def config_with(methods: list[str] = (), *overrides: str, **values: Any) -> RunConfig:
    """A run config using ``methods``, with ``--set``-style ``overrides`` and dotted ``values``."""
    return load_config(None, [f"methods.use={json.dumps(list(methods))}", *overrides], values)


def stack_of(methods: list[str] = (), *overrides: str, **values: Any) -> MethodStack:
    """The MethodStack a run with ``methods`` (and ``overrides``) builds."""
    return MethodStack(config_with(methods, *overrides, **values))
