"""A run's trained model: loading it (final or newest checkpoint), evaluating, sampling, exporting."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_model

from flopwise.config import RunConfig, load_run_config
from flopwise.data.pipeline import prepare_data
from flopwise.data.sources import uses_builtin_corpus
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import Evaluator
from flopwise.evaluate.tasks.builtin import HeldoutText
from flopwise.evaluate.tasks.engine import evaluate_tasks
from flopwise.evaluate.tasks.resolve import check_task_names, resolve_tasks
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.methods.dense import block_linears, build_model, plain_model
from flopwise.methods.qat import QATConfig, check_group
from flopwise.methods.stack import MethodStack
from flopwise.model.gpt import GPT
from flopwise.model.hf import WEIGHTS, load_weights_into, require_llama_style, save_hf_folder
from flopwise.model.chatml import chat_files
from flopwise.model.int4 import fake_quantize
from flopwise.rundir import check_output, planned_model_config, require_run_dir
from flopwise.runtime import choose_device, choose_dtype
from flopwise.train.checkpoint import list_checkpoints, newest_intact, reading_checkpoints


def load_final_model(run_dir: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer in ``run_dir/final`` (a Hugging Face folder written when a run
    spends its budget), at the sequence length it was trained with."""
    final = run_dir / "final"
    if not (final / WEIGHTS).is_file():
        load_run_config(run_dir)  # a clear error if this is not a run at all
        raise FlopwiseError(f"run '{run_dir}' has no final model yet: finish it with flopwise train --resume "
                            f"{run_dir}, or use --checkpoint for its newest checkpoint")
    model = GPT(planned_model_config(run_dir))
    load_weights_into(model, final, as_stored=True)  # evaluated and exported as it trained
    return model.to(device).eval(), Tokenizer.load(final / "tokenizer.json")


def load_checkpoint_model(run_dir: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The weights of a run's newest checkpoint (for a run that was interrupted or is still going)."""
    config = load_run_config(run_dir)
    model = build_model(planned_model_config(run_dir), MethodStack(config).configure)  # as trained: factorized, adapted
    directory = run_dir / "checkpoints"
    with reading_checkpoints(directory):  # a live run does not prune it away meanwhile
        checkpoint = newest_intact(run_dir, list_checkpoints(directory), _warn)
        load_model(model, str(checkpoint.path / "model.safetensors"), strict=True)
    return plain_model(model).to(device).eval(), Tokenizer.load(run_dir / "tokenizer.json")


def _warn(line: str) -> None:
    print(f"flopwise: warning: {line}", file=sys.stderr)


def load_run_model(run_dir: Path, device: torch.device, checkpoint: bool = False) -> tuple[GPT, Tokenizer]:
    return load_checkpoint_model(run_dir, device) if checkpoint else load_final_model(run_dir, device)


def export_run(run_dir: Path, folder: Path, checkpoint: bool = False) -> Path:
    """Write the run's model as a ``transformers`` folder (LlamaForCausalLM, or Qwen3ForCausalLM
    with QK-norm): safetensors, config.json, generation_config.json and tokenizer files."""
    require_run_dir(run_dir)  # before the model's shape is read: a folder that is no run is named as such
    check_output("--to", folder, folder=True)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FlopwiseError(f"--to '{folder}' exists and is not an empty folder: choose a new folder")
    require_llama_style(planned_model_config(run_dir))
    model, tokenizer = load_run_model(run_dir, torch.device("cpu"), checkpoint)
    save_hf_folder(model, tokenizer, folder, **chat_files(load_run_config(run_dir).posttrain.stage))
    return folder


def load_evaluated_model(run_dir: Path, run_config: RunConfig, device_name: str, checkpoint: bool,
                         quantize: str | None, group: int | None
                         ) -> tuple[GPT, Tokenizer, torch.device, int | None]:
    """The run's model as ``eval`` scores it: final or newest checkpoint, rounded to int4 when asked (the
    int4 group checked first, before anything is loaded); with the device and the group used."""
    if quantize is not None:
        group = group if group is not None else int4_group(run_config)
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
    the result then records both."""
    run_config = load_run_config(run_dir)
    model, tokenizer, device, group = load_evaluated_model(run_dir, run_config, device_name, checkpoint, quantize,
                                                           group)
    corpus = prepare_data(run_config.data, run_config.train.seed, tokenizer).corpus
    evaluator = Evaluator(corpus, tokenizer.token_bytes(), model.config.seq_len, run_config.optim.batch_size,
                          device, choose_dtype(run_config.train.precision, device))
    result = evaluator(model, max_tokens)
    return result if quantize is None else {**result, "quantize": quantize, "group": group}


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


def int4_group(run_config: RunConfig) -> int:
    """The int4 group a run's model is meant for: its qat group, else the default one."""
    return run_config.methods.qat.group if "qat" in run_config.methods.use else QATConfig().group


def check_int4(run_dir: Path, quantize: str, group: int) -> None:
    """Refuse, in one line, a quantization other than int4, or a group that does not fit the run's model
    (before any model or data is loaded)."""
    if quantize != "int4":
        raise FlopwiseError(f"--quantize {quantize} is unknown: int4 is the one quantization there is")
    if group < 1:
        raise FlopwiseError(f"--group {group} must be a positive number of input columns per int4 scale, e.g. 32")
    check_group(planned_model_config(run_dir), group, f"--group {group}")


@torch.no_grad()
def round_to_int4(model: GPT, group: int) -> None:
    """Round every block Linear's weight to int4 in place (round-to-nearest, one scale per ``group``
    input columns), as a 4-bit export would; embeddings, head and norms stay as they are."""
    for _, _, _, linear in block_linears(model):
        linear.weight.copy_(fake_quantize(linear.weight, group))


def check_sampling(max_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling settings, refused in one line (``flopwise sample`` checks them before loading a model)."""
    if max_tokens < 1:
        raise FlopwiseError(f"--max-tokens {max_tokens} must be a positive number of tokens to generate")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise FlopwiseError(f"--temperature {temperature} must be 0 (greedy) or a positive number, e.g. 0.8")
    if top_p is not None and not 0 < top_p <= 1:
        raise FlopwiseError(f"--top-p {top_p} must lie in (0, 1], e.g. 0.9")
    if top_k is not None and top_k < 1:
        raise FlopwiseError(f"--top-k {top_k} must be 0 (off) or a positive number of tokens, e.g. 50")


def stream_sample(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int) -> Iterator[str]:
    """Pieces of text as they are sampled (a piece is held back while it ends inside a UTF-8 character)."""
    check_sampling(max_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    ids = tokenizer.encode_batch([prompt])[0] if prompt else [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    shown = ""
    for token in model.stream(idx, max_tokens, temperature, top_k, top_p, generator):
        new_tokens.append(int(token))
        text = tokenizer.decode(new_tokens)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new_tokens)
    if text != shown:
        yield text[len(shown):]
