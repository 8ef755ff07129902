"""A folder's ``manifest.json``: the size and SHA-256 of each of its files, recorded when the folder is written
and checked before it is used, so that bytes changed on disk afterwards (a truncated copy, a file overwritten
with zeros, a flipped bit) are found instead of trained on.  Checkpoints and token caches both keep one.
Torch-free, for modules that must import fast."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"


class Checksums(Enum):
    """Which files ``problem`` hashes: all (checkpoints, read whole anyway), none (a folder just written, its
    hashes read back from it), or only those whose modification time differs from the recorded one (token
    caches, memory-mapped and possibly many GB: a file written since it was recorded is hashed, an untouched
    one costs a stat)."""

    ALL = "all"
    NONE = "none"
    CHANGED = "changed"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry(path: Path, with_mtime: bool = False) -> dict[str, Any]:
    """One file's record: its size and SHA-256 and, ``with_mtime``, its modification time (ns)."""
    stat = path.stat()
    record: dict[str, Any] = {"bytes": stat.st_size, "sha256": sha256(path)}
    if with_mtime:
        record["mtime_ns"] = stat.st_mtime_ns
    return record


def files_record(folder: Path, names: list[str], with_mtime: bool = False) -> dict[str, Any]:
    """The manifest of ``folder``'s ``names``; callers may add keys of their own beside ``files``."""
    return {"files": {name: entry(folder / name, with_mtime) for name in names}}


def problem(folder: Path, checksums: Checksums) -> str | None:
    """Why ``folder`` does not match its manifest (no manifest, an unreadable one, a file missing, truncated or
    changed), or None."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return f"no {MANIFEST_FILE}, so it cannot be verified"
    try:
        files = {str(name): (int(record["bytes"]), str(record["sha256"]), record.get("mtime_ns"))
                 for name, record in json.loads(manifest.read_text(encoding="utf-8"))["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, (size, digest, mtime_ns) in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        stat = file.stat()
        if stat.st_size != size:
            return f"{name} is truncated ({stat.st_size:,} of {size:,} bytes)" if stat.st_size < size else \
                f"{name} has {stat.st_size:,} bytes, not the {size:,} written"
        hashed = checksums is Checksums.ALL or (checksums is Checksums.CHANGED and stat.st_mtime_ns != mtime_ns)
        if hashed and sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None
