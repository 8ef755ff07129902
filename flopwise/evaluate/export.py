"""``flopwise export``: a run's model as a ``transformers`` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from flopwise.config import load_run_config
from flopwise.errors import FlopwiseError
from flopwise.evaluate.load import load_run_model
from flopwise.model.chatml import chat_files
from flopwise.model.hf import ExportKind, save_hf_folder
from flopwise.rundir import check_output, require_run_dir


def export_run(run_dir: Path, folder: Path, checkpoint: bool = False) -> ExportKind:
    """Write the run's model as a ``transformers`` folder (LlamaForCausalLM, Qwen3ForCausalLM with QK-norm,
    or flopwise's own modeling code for any other model): safetensors, config.json, generation_config.json
    and tokenizer files; which kind it wrote."""
    require_run_dir(run_dir)  # before the model is read: a folder that is no run is named as such
    check_output("--to", folder, folder=True)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FlopwiseError(f"--to '{folder}' exists and is not an empty folder: choose a new folder")
    model, tokenizer = load_run_model(run_dir, torch.device("cpu"), checkpoint)
    return save_hf_folder(model, tokenizer, folder, **chat_files(load_run_config(run_dir).posttrain.stage))
