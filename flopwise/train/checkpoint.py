"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` written under a temporary name and
renamed into place only when complete, so a crash or ``kill -9`` mid-write never leaves a
folder that loads wrong.  Loading reads only safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flopwise.atomic import fsync, json_text
from flopwise.errors import FlopwiseError
from flopwise.runtime import Ranks, full_state, load_full_state

STATE_FILE = "state.json"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def pinned(self) -> bool:
        """Pinned checkpoints (the last one before the decay) survive keep-last-K pruning."""
        return bool(self.state.get("pinned"))


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int, ranks: Ranks = Ranks()) -> Path:
    """Write model, optimizer and JSON state for ``step``; then prune to the newest ``keep``.

    Every rank must call this (gathering FSDP shards is a collective); only rank 0 writes."""
    model_state, optimizer_state = full_state(model, optimizer)
    final = directory / f"{_PREFIX}{step:08d}"
    if ranks.is_main:
        _write_checkpoint(directory, final, model_state, optimizer_state, dict(state, step=step))
        _prune(directory, keep)
    ranks.barrier()
    return final


def _write_checkpoint(directory: Path, final: Path, model_state: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any], state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory / f"{_TMP_PREFIX}{final.name}"
    tmp.mkdir()
    save_file({name: t.contiguous() for name, t in model_state.items()}, str(tmp / "model.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / STATE_FILE).write_text(json_text( dict(state, optimizer=meta, torch_rng=torch.get_rng_state().tolist())))
    for file in tmp.iterdir():
        fsync(file)
    if final.exists():  # a step re-run after a crash: replace the older copy whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(directory)


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in sorted(directory.glob(_PREFIX + "*")) if directory.is_dir() else []:
        state_path = path / STATE_FILE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            found.append(CheckpointInfo(path=path, step=int(state["step"]), state=state))
    return sorted(found, key=lambda info: info.step)


def load_checkpoint(info: CheckpointInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place (on any number of ranks) and return the JSON state."""
    model_state = load_file(str(info.path / "model.safetensors"))
    optimizer_state = _unflatten_optimizer(load_file(str(info.path / "optimizer.safetensors")), info.state["optimizer"])
    load_full_state(model, optimizer, model_state, optimizer_state)
    torch.set_rng_state(torch.tensor(info.state["torch_rng"], dtype=torch.uint8))
    return info.state


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict into tensors named ``<param>.<key>`` (e.g.
    ``layers.0.mlp.up_proj.weight.exp_avg``) and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(param, {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        param, key = name.rsplit(".", 1)  # state keys (exp_avg, step, ...) contain no dots
        state.setdefault(param, {})[key] = tensor
    for param, values in meta["scalars"].items():
        state.setdefault(param, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _prune(directory: Path, keep: int) -> None:
    checkpoints = list_checkpoints(directory)
    pinned = [info for info in checkpoints if info.pinned]
    protected = {info.path for info in checkpoints[-keep:]} | ({pinned[-1].path} if pinned else set())
    for info in checkpoints:
        if info.path not in protected:
            shutil.rmtree(info.path, ignore_errors=True)


def require_checkpoint(run_dir: Path, checkpoints: list[CheckpointInfo]) -> CheckpointInfo:
    if not checkpoints:
        raise FlopwiseError(f"run folder '{run_dir}' has no complete checkpoint to resume from: start a new run")
    return checkpoints[-1]
