"""The files of an exported model as a size budget counts them: the integer-stored tensors of an int8 or int4
artifact (flopwise/model/stored.py) under the remote code's names, and a folder's bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from flopwise.model.gpt import GPT
from flopwise.model.stored import quantize, stored_linears


def stored_tensors(model: GPT, precision: str, group: int) -> dict[str, torch.Tensor]:
    """The int artifact's tensors under modeling_flopwise.py's names (``model.``): each block Linear as
    ``weight`` (levels) and ``weight_scale``, every other weight in bf16."""
    linears = {f"{name}.weight": linear.weight for name, *_, linear in stored_linears(model)}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in linears:
            levels, scale = quantize(linears[name].detach().cpu(), precision, group)
            tensors[f"model.{name}"] = levels
            tensors[f"model.{name.removesuffix('.weight')}.weight_scale"] = scale
        else:
            tensors[f"model.{name}"] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    return tensors


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder``: the artifact a size budget caps."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
