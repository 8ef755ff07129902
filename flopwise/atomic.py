"""Whole-or-nothing file writes: a temporary file beside the target, fsynced, then renamed over it,
so a reader or a crash never sees half a file.  Torch-free, for modules that must import fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` via a temporary name and a rename (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json_text(data))
