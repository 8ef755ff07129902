"""The remote-code export: a model with options that no transformers architecture computes exactly is saved
with flopwise's own modeling code beside its weights, and loads with ``trust_remote_code=True``.

The folder gets modeling_flopwise.py (a transformers ``PreTrainedModel`` around the decoder),
configuration_flopwise.py and every module they import relatively (gpt.py, config.py), copied unchanged
from this package: the exported model runs the code that trained it, not a second copy of it.  Those
modules import only torch, transformers, the standard library and each other, so the folder loads where
flopwise is not installed.  ``config.json`` maps the Auto classes to them (``auto_map``), as remote-code
models on the Hugging Face hub do; transformers copies a module's relative imports along with it.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig

MODEL_TYPE = "flopwise"
ARCHITECTURE = "FlopwiseForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_flopwise.FlopwiseConfig",
            "AutoModelForCausalLM": f"modeling_flopwise.{ARCHITECTURE}"}
_HERE = Path(__file__).parent


def source_files() -> list[Path]:
    """modeling_flopwise.py, configuration_flopwise.py and the modules they import relatively, recursively:
    the files a remote-code folder carries (the closure transformers follows when it loads them)."""
    files: list[Path] = []
    pending = [_HERE / module.split(".", 1)[0] for module in AUTO_MAP.values()]
    while pending:
        path = pending.pop().with_suffix(".py")
        if path in files:
            continue
        files.append(path)
        pending += [_HERE / node.module for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]
    return sorted(files)


def copy_sources(folder: Path) -> None:
    for path in source_files():
        shutil.copyfile(path, folder / path.name)


def remote_config(cfg: ModelConfig, eos_id: int) -> dict[str, Any]:
    """``config.json``: the shape under ``flopwise`` (what the model is built from), the Auto classes' map,
    and the names transformers' tools read (lm-eval's context length, generate's end token).  The dtype
    transformers loads in is fp32 even for bf16-stored matrices: the decoder computes in fp32 whatever its
    weights' dtype (as flopwise evaluated it), and transformers would cast the fp32 norms and biases too."""
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": AUTO_MAP,
            "flopwise": cfg.to_dict(), "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "max_position_embeddings": cfg.context, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True, "torch_dtype": "float32",
            "dtype": "float32"}


def model_config_from_remote(config: dict[str, Any], source: Path, seq_len: int) -> ModelConfig:
    """The shape of a folder flopwise exported with remote code, at context ``seq_len`` as for an imported Llama
    (RoPE's longer context kept as max_positions); learned positions keep their own window (a table of seq_len
    rows), whose length the caller checks against its own."""
    path = source / "config.json"
    if not isinstance(config.get(MODEL_TYPE), dict):
        raise FlopwiseError(f"{path}: model_type is '{MODEL_TYPE}' but there is no '{MODEL_TYPE}' shape in it: "
                            "export the model again with flopwise")
    try:
        shape = ModelConfig.from_dict(config[MODEL_TYPE])
        if shape.positions == "rope":
            shape = replace(shape, seq_len=seq_len, max_positions=None if shape.context == seq_len else shape.context)
        shape.validate()
    except FlopwiseError as error:
        raise FlopwiseError(f"{path}: {error}") from None
    return shape
