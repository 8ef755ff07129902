"""The sweep's Optuna journal file, read and appended so that a damaged file stops the sweep in one line and a
crash's cut-off last record is never written onto.

Optuna's ``JournalFileBackend`` skips a last line without its newline (a record a crash cut off: it was never
whole, so it never happened), but its next append goes onto the end of that cut line, which turns two records
into one undecodable line and the journal is unreadable from then on.  Here each append first drops such a
cut record, under the journal's own lock (so no live writer is mid-record); the lock is Optuna's, which works
on NFS.  Bytes that are not records (random bytes, an undecodable line) are refused with the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError, warn
from flopwise.sweep.optuna_dep import require_optuna

RECORD_START = b'{"op_code":'  # how Optuna writes every record: compact JSON, ASCII, the op code first
TAIL_CHUNK = 1 << 16


def journal_storage(path: Path) -> Any:
    """An Optuna ``JournalStorage`` on the journal file ``path`` (created if missing), checked whole first."""
    optuna = require_optuna()
    check_journal(path)
    return optuna.storages.JournalStorage(SafeJournalFile(path))


def check_journal(path: Path) -> None:
    """Refuse a journal with a line that is not an Optuna record; a cut-off last record is allowed (a crash's)."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.endswith(b"\n") and not _is_record(line):
                raise damaged(path, number)
            if not line.endswith(b"\n") and not _is_cut_record(line):
                raise damaged(path, number)


def damaged(path: Path, line: int) -> FlopwiseError:
    return FlopwiseError(f"'{path}' line {line} is not an Optuna journal record (the file is damaged): restore "
                         "it from a backup, or start the sweep again with another --out (and --storage)")


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not UTF-8, or not JSON
        return False
    return isinstance(record, dict) and "op_code" in record


def _is_cut_record(tail: bytes) -> bool:
    """A start of a record cut off by a crash: ASCII that begins as every record begins."""
    return tail.isascii() and (tail.startswith(RECORD_START) or RECORD_START.startswith(tail))


class SafeJournalFile:
    """Optuna's ``JournalFileBackend`` (its reading, its NFS-safe lock) with appends that first drop a cut-off
    last record, and reads that name the file and line of a damaged record."""

    def __init__(self, path: Path) -> None:
        journal = require_optuna().storages.journal
        self.path = path
        self._lock = journal.JournalFileSymlinkLock(str(path))
        self._backend = journal.JournalFileBackend(str(path), lock_obj=self._lock)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        number = log_number_from
        try:
            for record in self._backend.read_logs(log_number_from):
                number += 1
                if not isinstance(record, dict) or "op_code" not in record:
                    raise damaged(self.path, number)
                yield record
        except ValueError:  # Optuna's reader met an undecodable line before the last
            raise damaged(self.path, number + 1) from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
        self._lock.acquire()
        try:
            drop_cut_record(self.path)
            with self.path.open("ab") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            self._lock.release()


def drop_cut_record(path: Path) -> int:
    """Cut the journal back to its last whole record where it ends inside one (a crash mid-append); the number
    of bytes dropped.  Bytes after the last newline that are not a record's start are damage, not a crash's."""
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0 or _read_at(handle, size - 1, 1) == b"\n":
            return 0  # empty, or it ends with a whole record
        end = size
        while end > 0:
            start = max(0, end - TAIL_CHUNK)
            newline = _read_at(handle, start, end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        handle.seek(end)
        tail = handle.read()
        if not _is_cut_record(tail):
            raise damaged(path, _line_count(path))
        handle.truncate(end)
        os.fsync(handle.fileno())
    warn(f"'{path}' ended inside a record (a crash mid-write): dropped its {len(tail)} cut-off bytes")
    return len(tail)


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


def _line_count(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)
