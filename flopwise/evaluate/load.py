"""A run's trained model, as evaluation, sampling, chat, export and the lm-eval adapter read it: the final model
(``final/``, a Hugging Face folder) or, for a run still going or interrupted, its newest intact checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model

from flopwise.config import load_run_config
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError, warn
from flopwise.methods.dense import build_model, plain_model
from flopwise.methods.stack import MethodStack
from flopwise.model.gpt import GPT
from flopwise.model.hf import WEIGHTS, DamagedWeights, load_weights_into
from flopwise.rundir import planned_model_config
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
    try:
        load_weights_into(model, final, as_stored=True)  # evaluated and exported as it trained
    except DamagedWeights as err:
        command = load_run_config(run_dir).posttrain.stage
        raise FlopwiseError(f"'{err.path}' is damaged ({err.cause}): use --checkpoint for the run's newest checkpoint, "
                            f"or delete {final} and run flopwise {'train' if command == 'pretrain' else command} "
                            f"--resume {run_dir} to train its last steps again and write it") from None
    return model.to(device).eval(), Tokenizer.load(final / "tokenizer.json")


def load_checkpoint_model(run_dir: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The weights of a run's newest checkpoint (for a run that was interrupted or is still going)."""
    config = load_run_config(run_dir)
    methods = MethodStack(config.methods, config.train.seed)
    model = build_model(planned_model_config(run_dir), methods.configure)  # as trained: factorized, adapted
    directory = run_dir / "checkpoints"
    with reading_checkpoints(directory):  # a live run does not prune it away meanwhile
        checkpoint = newest_intact(run_dir, list_checkpoints(directory), warn)
        load_model(model, str(checkpoint.path / "model.safetensors"), strict=True)
    return plain_model(model).to(device).eval(), Tokenizer.load(run_dir / "tokenizer.json")


def load_run_model(run_dir: Path, device: torch.device, checkpoint: bool = False) -> tuple[GPT, Tokenizer]:
    return load_checkpoint_model(run_dir, device) if checkpoint else load_final_model(run_dir, device)


