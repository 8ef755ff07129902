"""Loading a run's final model for evaluation and sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from flopwise.data.pipeline import prepare_data
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import Evaluator
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.train.device import choose_device, choose_dtype
from flopwise.train.session import load_run_config


def load_final_model(run_dir: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer in ``run_dir/final`` (written when a run spends its budget)."""
    final = run_dir / "final"
    if not (final / "model.safetensors").is_file():
        load_run_config(run_dir)  # a clear error if this is not a run at all
        raise FlopwiseError(f"run '{run_dir}' has no final model yet: finish it with flopwise train --resume {run_dir}")
    config = ModelConfig.from_dict(json.loads((final / "model.json").read_text()))
    model = GPT(config)
    load_model(model, str(final / "model.safetensors"), strict=True)
    return model.to(device).eval(), Tokenizer.load(final / "tokenizer.json")


def evaluate_run(run_dir: Path, device_name: str, max_tokens: int | None) -> dict[str, Any]:
    """Held-out evaluation of the final model on the run's own held-out split."""
    run_config = load_run_config(run_dir)
    device = choose_device(device_name)
    model, tokenizer = load_final_model(run_dir, device)
    corpus = prepare_data(run_config.data, run_config.train.seed, tokenizer).corpus
    evaluator = Evaluator(corpus, tokenizer.token_bytes(), model.config.seq_len, run_config.optim.batch_size,
                          device, choose_dtype(run_config.train.precision, device))
    return evaluator(model, max_tokens)


def sample_run(run_dir: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None, seed: int,
               device_name: str) -> str:
    """Prompt plus a sampled continuation from the final model."""
    if temperature <= 0:
        raise FlopwiseError(f"--temperature {temperature} must be positive (use --top-k 1 for greedy decoding)")
    device = choose_device(device_name)
    model, tokenizer = load_final_model(run_dir, device)
    ids = tokenizer.encode_batch([prompt])[0] if prompt else [tokenizer.eos_id]
    torch.manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k)
    new_tokens = out[0, idx.shape[1]:].tolist()
    return prompt + tokenizer.decode(new_tokens)
