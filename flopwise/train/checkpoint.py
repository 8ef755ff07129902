"""Atomic, verified, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` written under a temporary name and
renamed into place only when complete, so a crash or ``kill -9`` mid-write never leaves a
folder that loads wrong.  Its ``manifest.json`` holds the size and SHA-256 of every other file:
a checkpoint whose bytes changed on disk afterwards (a flipped bit, a truncated copy) or that has
no manifest (so nothing vouches for it) is found before it is loaded, and resume falls back to the
newest intact one.  A new checkpoint's files
are hashed as written and checked on disk against the manifest's sizes after the rename, before
older ones are pruned.  Loading reads only safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flopwise.atomic import fsync, json_text
from flopwise.errors import FlopwiseError
from flopwise.manifest import MANIFEST_FILE, Checksums, files_record, problem
from flopwise.runtime import Ranks, full_state, load_full_state

STATE_FILE = "state.json"
METHODS_FILE = "methods.safetensors"  # the methods' tensors (a weight average), where they have any
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
_PRUNE_LOCK = ".prune.lock"  # readers hold it shared while loading; pruning holds it exclusively


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    state: dict[str, Any]
    problem: str | None = None  # why the checkpoint cannot be used (unreadable state.json); None: looks complete

    @property
    def pinned(self) -> bool:
        """Pinned checkpoints (the last one before the decay) survive keep-last-K pruning."""
        return bool(self.state.get("pinned"))


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int, ranks: Ranks = Ranks(),
                    method_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model, optimizer, the methods' tensors (``method_tensors``, rank 0's) and JSON state for ``step``;
    then prune to the newest ``keep``.

    Every rank must call this (gathering FSDP shards is a collective); only rank 0 writes."""
    model_state, optimizer_state = full_state(model, optimizer)
    final = directory / f"{_PREFIX}{step:08d}"
    if ranks.is_main:
        _write_checkpoint(directory, final, model_state, optimizer_state, dict(state, step=step), method_tensors or {})
        _prune(directory, keep, step)
    ranks.barrier()
    return final


def _write_checkpoint(directory: Path, final: Path, model_state: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any], state: dict[str, Any],
                      method_tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory / f"{_TMP_PREFIX}{final.name}"
    try:
        tmp.mkdir()
        save_file({name: t.contiguous() for name, t in model_state.items()}, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if method_tensors:
            save_file({name: t.detach().cpu().contiguous() for name, t in method_tensors.items()},
                      str(tmp / METHODS_FILE))
        (tmp / STATE_FILE).write_text(json_text(dict(state, optimizer=meta, torch_rng=torch.get_rng_state().tolist())))
        (tmp / MANIFEST_FILE).write_text(json_text(files_record(tmp, sorted(file.name for file in tmp.iterdir()))))
        for file in tmp.iterdir():
            fsync(file)
        with _locked(directory, exclusive=True):  # a reader never sees the older copy half-deleted
            if final.exists():  # a step re-run after a crash: replace the older copy whole
                shutil.rmtree(final)
            os.replace(tmp, final)
        fsync(directory)
    except BaseException:  # a full disk, an interrupt: no partial temporary folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    problem = verify_checkpoint(final, checksums=False)  # the manifest's hashes were just read back from it
    if problem is not None:
        raise FlopwiseError(f"checkpoint '{final}' is not on disk as written ({problem}): the disk may be "
                            "failing; the older checkpoints are kept")


def verify_checkpoint(path: Path, checksums: bool = True) -> str | None:
    """Why the checkpoint folder at ``path`` is not intact (no manifest, a file missing, truncated or, with
    ``checksums``, changed since it was written), or None.  A checkpoint without a manifest is not taken on
    trust: every checkpoint flopwise writes has one, so a missing one means the folder was damaged or
    assembled by hand."""
    return problem(path, Checksums.ALL if checksums else Checksums.NONE)


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Checkpoint folders, oldest first; one whose state.json cannot be read is listed with its problem."""
    found = []
    for path in sorted(directory.glob(_PREFIX + "*")) if directory.is_dir() else []:
        state_path = path / STATE_FILE
        if not state_path.is_file():
            continue  # not a checkpoint (a stray folder); the temporary ones have another prefix
        try:
            state = json.loads(state_path.read_text())
            found.append(CheckpointInfo(path=path, step=int(state["step"]), state=state))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            step = int(path.name.removeprefix(_PREFIX)) if path.name.removeprefix(_PREFIX).isdigit() else -1
            found.append(CheckpointInfo(path=path, step=step, state={}, problem=f"{STATE_FILE} is unreadable"))
    return sorted(found, key=lambda info: info.step)


def newest_intact(run_dir: Path, checkpoints: list[CheckpointInfo], say: Callable[[str], None]) -> CheckpointInfo:
    """The newest checkpoint that verifies; each newer one that does not is named through ``say``, one line each."""
    problems: list[tuple[Path, str]] = []  # newest first
    for info in reversed(checkpoints):
        problem = info.problem or verify_checkpoint(info.path)
        if problem is None:
            for path, problem in problems:
                say(f"checkpoint '{path}' is corrupt ({problem}): skipping it")
            return info
        problems.append((info.path, problem))
    if checkpoints:
        raise FlopwiseError(f"run folder '{run_dir}' has no intact checkpoint (all {len(checkpoints)} are corrupt, "
                            f"the newest: {problems[0][1]}): start a new run")
    raise FlopwiseError(f"run folder '{run_dir}' has no complete checkpoint to resume from: start a new run")


@contextlib.contextmanager
def reading_checkpoints(directory: Path) -> Iterator[None]:
    """Hold off pruning while a reader (eval, sample, export --checkpoint) loads a checkpoint of a live run."""
    with _locked(directory, exclusive=False):
        yield


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """``checkpoints/.prune.lock``, shared (readers) or exclusive (pruning, replacing).  A reader that cannot
    create or open it (a read-only copy of a run) and platforms without fcntl go without: no writer is there."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = directory / _PRUNE_LOCK
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_CREAT if os.access(directory, os.W_OK) else 0), 0o644)
    except OSError as err:
        if exclusive or err.errno not in (errno.ENOENT, errno.EACCES, errno.EROFS):
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def load_checkpoint(info: CheckpointInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place (on any number of ranks) and return the JSON state."""
    model_state = load_file(str(info.path / "model.safetensors"))
    optimizer_state = _unflatten_optimizer(load_file(str(info.path / "optimizer.safetensors")), info.state["optimizer"])
    load_full_state(model, optimizer, model_state, optimizer_state)
    torch.set_rng_state(torch.tensor(info.state["torch_rng"], dtype=torch.uint8))
    return info.state


def load_method_tensors(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The methods' tensors of a checkpoint, on the CPU (none where its methods kept none)."""
    path = info.path / METHODS_FILE
    return load_file(str(path)) if path.is_file() else {}


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


def _prune(directory: Path, keep: int, newest: int) -> None:
    """Keep the newest ``keep`` checkpoints up to step ``newest`` (just written and verified) and the newest
    pinned one; remove the rest, and any of a later step: corrupt ones a resume skipped, which this run is
    now re-writing."""
    checkpoints = list_checkpoints(directory)
    kept = [info for info in checkpoints if info.problem is None and info.step <= newest]
    pinned = [info for info in kept if info.pinned]
    protected = {info.path for info in kept[-keep:]} | ({pinned[-1].path} if pinned else set())
    with _locked(directory, exclusive=True):
        for info in checkpoints:
            if info.path not in protected:
                shutil.rmtree(info.path, ignore_errors=True)
