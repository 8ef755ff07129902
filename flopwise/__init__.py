"""flopwise: train the best language model a fixed budget allows.

The Python API (flopwise/api.py) is loaded on first use, so ``import flopwise`` stays light for the CLI."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "resume", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "resume"):
        from flopwise import api

        return getattr(api, name)
    if name in ("RunConfig", "load_config"):
        from flopwise import config

        return getattr(config, name)
    raise AttributeError(f"module 'flopwise' has no attribute {name!r}")
