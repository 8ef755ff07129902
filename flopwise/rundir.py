"""What a run folder holds and how to read it, without building anything; who may write it.

``runs/<name>/`` holds ``config.toml`` (the resolved config), ``plan.json`` (the model shape, costs and
data summary), ``metrics.jsonl`` (one JSON object per event), ``tokenizer.json``, ``checkpoints/`` and,
once finished, ``final/`` (a Hugging Face folder).  Every file is JSON, TOML or safetensors.  ``.lock``
is held by the one process writing the run and names it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flopwise.errors import FlopwiseError, warn

if TYPE_CHECKING:  # imported where a shape is read: the CLI takes the lock here before numpy is imported
    from flopwise.model.config import ModelConfig

CONFIG_FILE = "config.toml"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".lock"  # held by the one process that writes the run; it names that process
# what a new run writes before config.toml (and write_atomic's temporary files): all that a run killed before it
# became one leaves, which the next new run in the folder replaces
UNSTARTED_ENTRIES = (LOCK_FILE, TOKENIZER_FILE, PLAN_FILE, ".*.tmp")
# what flopwise writes into a run folder (the run, --log, `flopwise eval`): what --overwrite deletes first
RUN_ENTRIES = (CONFIG_FILE, PLAN_FILE, METRICS_FILE, TOKENIZER_FILE, "checkpoints", "final", "tensorboard", "wandb",
               "wandb.json", "eval*.json", "tasks*.json", ".*.tmp")


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def require_run_dir(run_dir: Path) -> None:
    if not is_run_dir(run_dir):
        raise FlopwiseError(f"'{run_dir}' is not a flopwise run folder (no {CONFIG_FILE}): "
                            "give the --out folder of an earlier `flopwise train`")


def planned_model_config(run_dir: Path) -> ModelConfig:
    """The model shape a run was planned with (``plan.json``), which resume and loading reuse."""
    from flopwise.model.config import ModelConfig

    plan = run_dir / PLAN_FILE
    if not plan.is_file():
        raise FlopwiseError(f"run folder '{run_dir}' has no {PLAN_FILE}: it was never started, so start a new run")
    try:
        return ModelConfig.from_dict(json.loads(plan.read_text(encoding="utf-8"))["model"])
    except (ValueError, KeyError, TypeError, FlopwiseError) as err:  # not UTF-8, not JSON, no or a wrong shape
        cause = f"no {err} key" if isinstance(err, KeyError) else (str(err).splitlines() or [repr(err)])[0]
        raise FlopwiseError(f"'{plan}' is damaged ({cause}): it holds the model shape the run's checkpoints were saved "
                            "with, so restore it from a copy of the run folder, or start a new run") from None


def first_few(items: list[Any], shown: int = 3) -> str:
    """'a, b, c and 4 more': the first ``shown`` of ``items``, then how many were not named, for one line."""
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete events of a ``metrics.jsonl``.  A last line cut short (no newline after it: a crash mid-write,
    or a live run's next event) is left out without a word, as expected; any other line that is not a JSON
    object in UTF-8 (a damaged file) is left out too, named in one warning line on stderr, so that one bad
    line costs that event, not the run's whole record."""
    lines = path.read_bytes().split(b"\n")
    events, damaged = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            event = None
        if isinstance(event, dict):
            events.append(event)
        elif number < len(lines):  # followed by a newline: written whole, damaged since
            damaged.append(number)
    if damaged:
        warn(f"'{path}' line{'s' if len(damaged) > 1 else ''} {first_few(damaged)}: not a JSON event in UTF-8 "
             "(the file is damaged): skipped")
    return events


@contextlib.contextmanager
def writing(run_dir: Path, new: bool, overwrite: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` as its one writer (an exclusive lock), for a ``new`` run or a resumed one.

    A second writer is refused in one line naming the holder.  Under torchrun only global rank 0 holds
    it.  A new run is refused a folder that holds a run, or files that it would replace, prune or append to
    (``overwrite``: the run files there are deleted instead).  A new run that ends without its run files (a bad
    config, an interrupt before config.toml) removes, while it still holds the lock, the folder it created and
    the parents it created that are left empty."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if not new:
        require_run_dir(run_dir)
    check_output("--out", run_dir, folder=True)
    if new and not overwrite:
        _refuse_other_files(run_dir)  # before the lock file is made: a folder that is no run's is left as it was
    created = _first_missing(run_dir) if new else None
    run_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(run_dir) as handle:
        try:
            if new:
                _make_room(run_dir, overwrite)
            yield
        finally:
            if created is not None and not is_run_dir(run_dir):
                _remove_created(run_dir, created)
            elif handle is not None:
                handle.truncate(0)


def _refuse_other_files(run_dir: Path) -> None:
    """Refuse a folder that holds no run but files a new run would replace, prune or append to (what a run killed
    before it became one left is replaced: it is that run's)."""
    if not run_dir.is_dir() or is_run_dir(run_dir):
        return
    found = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in run_dir.iterdir()
                   if not any(fnmatch(entry.name, pattern) for pattern in UNSTARTED_ENTRIES))
    if found:
        raise FlopwiseError(f"'{run_dir}' is not empty ({first_few(found)}) and holds no run (no {CONFIG_FILE}): "
                            "choose another --out, or add --overwrite to start the run there (the run files in it "
                            "are deleted first)")


def _make_room(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a run, or with ``overwrite`` delete the run files there.  Under the lock: a run
    that is writing the folder is refused as in use, and nothing is deleted under it."""
    if overwrite:
        for entry in sorted({path for pattern in RUN_ENTRIES for path in run_dir.glob(pattern)}):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif is_run_dir(run_dir):
        raise FlopwiseError(f"'{run_dir}' already holds a run: resume it with --resume {run_dir}, "
                            "replace it with --overwrite, or choose another --out")


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[Any]:
    """The run folder's lock file, locked and naming this process; None where the platform or the filesystem
    has no file locks (said once, on stderr: nothing then stops a second writer)."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    with (run_dir / LOCK_FILE).open("a+", encoding="utf-8") as handle:
        try:
            if fcntl is None:
                raise OSError(errno.ENOTSUP, "no fcntl")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FlopwiseError(f"run folder '{run_dir}' is in use by {holder}: wait for it to end, or choose "
                                "another --out") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            warn(f"'{run_dir}' is on a filesystem or platform without file locks: nothing stops a second process "
                 "from writing this run")
            yield None
            return
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} (since {since})")
        handle.flush()
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what mkdir(parents=True) creates), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


def _remove_created(run_dir: Path, created: Path) -> None:
    """Remove ``run_dir`` (created by this process), then each parent up to ``created`` while it is empty: a
    parent another run has meanwhile written into stays."""
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder == created or created in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def check_output(flag: str, path: Path | None, *, folder: bool) -> None:
    """Refuse, before any work is done, an output path that cannot be written: a file where a folder goes,
    a folder where a file goes, or a path under a file."""
    if path is None:
        return
    if folder and path.exists() and not path.is_dir():
        raise FlopwiseError(f"{flag} '{path}' is a file, not a folder: choose a folder path")
    if not folder and path.is_dir():
        raise FlopwiseError(f"{flag} '{path}' is a folder: give a file path, e.g. {path / 'out.json'}")
    for parent in path.parents:
        if parent.is_symlink() and not parent.exists():
            raise FlopwiseError(f"{flag} '{path}': '{parent}' is a broken or looping symbolic link: fix the path")
        if parent.exists():
            if not parent.is_dir():
                raise FlopwiseError(f"{flag} '{path}': '{parent}' is a file, not a folder: fix the path")
            return
