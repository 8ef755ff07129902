"""``flopwise eval``: a run's model scored on the run's own held-out split (loss, perplexity and bits per byte per
domain) and on downstream tasks, as trained or rounded to int4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flopwise.config import RunConfig, load_run_config
from flopwise.data.pipeline import prepare_data
from flopwise.data.sources import uses_builtin_corpus
from flopwise.data.tokenizer import Tokenizer
from flopwise.evaluate.heldout import Evaluator
from flopwise.evaluate.load import load_run_model
from flopwise.evaluate.quantized import check_int4, round_to_int4
from flopwise.evaluate.tasks.builtin import HeldoutText
from flopwise.evaluate.tasks.engine import evaluate_tasks
from flopwise.evaluate.tasks.resolve import check_task_names, resolve_tasks
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.methods.stack import int4_group
from flopwise.model.gpt import GPT
from flopwise.rundir import METRICS_FILE, read_metrics
from flopwise.runtime import choose_device, choose_dtype


def load_evaluated_model(run_dir: Path, run_config: RunConfig, device_name: str, checkpoint: bool,
                         quantize: str | None, group: int | None
                         ) -> tuple[GPT, Tokenizer, torch.device, int | None]:
    """The run's model as ``eval`` scores it: final or newest checkpoint, rounded to int4 when asked (the
    int4 group checked first, before anything is loaded); with the device and the group used."""
    if quantize is not None:
        group = group if group is not None else int4_group(run_config.methods)  # QAT's, else the default
        check_int4(run_dir, quantize, group)
    device = choose_device(device_name)
    model, tokenizer = load_run_model(run_dir, device, checkpoint)
    if quantize is not None:
        round_to_int4(model, group)
    return model, tokenizer, device, group


def evaluate_run(run_dir: Path, device_name: str, max_tokens: int | None, checkpoint: bool = False,
                 quantize: str | None = None, group: int | None = None) -> dict[str, Any]:
    """Held-out evaluation of the run's model on the run's own held-out split.  ``quantize="int4"``: of that
    model with every block Linear's weight rounded to int4 (flopwise/model/int4.py) in groups of ``group``
    input columns, by default those the run trained for (``methods.qat.group`` when it used qat, else 32);
    the result then records both.  A run whose final/ stores its weights in less than fp32 (artifact.precision,
    a size budget's choice) is scored as final/ stores them (``artifact``: what it ships), with its model as
    trained beside it (``as_trained``: the run's own final evaluation, on its final sample)."""
    run_config = load_run_config(run_dir)
    model, tokenizer, device, group = load_evaluated_model(run_dir, run_config, device_name, checkpoint, quantize,
                                                           group)
    corpus = prepare_data(run_config.data, run_config.train.seed, tokenizer).corpus
    evaluator = Evaluator(corpus, tokenizer.token_bytes(), model.config.seq_len, run_config.optim.batch_size,
                          device, choose_dtype(run_config.train.precision, device))
    result = evaluator(model, max_tokens)
    if quantize is not None:
        return {**result, "quantize": quantize, "group": group}
    precision = run_config.artifact.precision
    if checkpoint or precision == "fp32":
        return result
    stored = {"precision": precision, "loss": result["loss"], "bpb": result["bpb"]}
    return {**result, "artifact": stored, "as_trained": trained_final_loss(run_dir)}


def trained_final_loss(run_dir: Path) -> dict[str, Any] | None:
    """The run's final evaluation of its model as trained (before final/ stored it in less than fp32), as
    metrics.jsonl records it; None before the run has finished."""
    finals = [event for event in read_metrics(run_dir / METRICS_FILE) if event["event"] == "eval"
              and event.get("p") == 1.0 and "artifact_loss" in event]
    if not finals:
        return None
    return {"loss": finals[-1]["val_loss"], "bpb": finals[-1]["val_bpb"], "tokens": finals[-1]["val_tokens"]}


def evaluate_run_tasks(run_dir: Path, device_name: str, specs: list[str], limit: int | None, seed: int | None,
                       checkpoint: bool = False, quantize: str | None = None, group: int | None = None
                       ) -> dict[str, Any]:
    """Downstream tasks (flopwise/evaluate/tasks) on the run's model: built-in ones made from the run's own
    held-out text, task files, lm-eval task YAMLs.  ``seed`` (default: the run's) draws the built-in tasks'
    examples and the bootstrap; ``quantize``/``group`` as in evaluate_run."""
    run_config = load_run_config(run_dir)
    check_task_names(specs, "--tasks")  # before any model or data is loaded
    seed = run_config.train.seed if seed is None else seed
    model, tokenizer, device, group = load_evaluated_model(run_dir, run_config, device_name, checkpoint, quantize,
                                                           group)
    tasks = resolve_tasks(specs, lambda: run_heldout_text(run_config, tokenizer), seed, limit)
    task_model = TaskModel(model, tokenizer, device, choose_dtype(run_config.train.precision, device),
                           run_config.optim.batch_size)
    results = evaluate_tasks(tasks, task_model, seed)
    extra = {} if quantize is None else {"quantize": quantize, "group": group}
    return {"tasks": results, "seed": seed, "limit": limit, "checkpoint": checkpoint, **extra}


def run_heldout_text(run_config: RunConfig, tokenizer: Tokenizer) -> HeldoutText:
    """The held-out documents of the data a run trained on, as text (for the built-in tasks)."""
    corpus = prepare_data(run_config.data, run_config.train.seed, tokenizer).corpus
    return HeldoutText.from_corpus(corpus, tokenizer, uses_builtin_corpus(run_config.data.sources))
