"""Keep a bench's child processes on chosen cores, so that two timed arms can share this 2-core machine."""

from __future__ import annotations

import os


def pinned(cores: str | None) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that keep a process on ``cores`` with one torch thread per core."""
    if not cores:
        return [], dict(os.environ)
    threads = str(len(cores.split(",")))
    return ["taskset", "-c", cores], {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
