"""Progressive training in the default recipe: with ``methods.progressive = true`` (the default) and no
progressive method named in ``methods.use``, a pretraining run adds all of them, each with its own
default settings, as the bench measured them to win (bench/RESULTS.md#progressive-training).  One that cannot
apply to the run (depth growth under torchrun or from an imported model, say) is left out, and the run
says why in one line.  The resolved list is what config.toml records, so a resume rebuilds the same run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.methods.stack import check_methods

if TYPE_CHECKING:
    from flopwise.config import RunConfig

PROGRESSIVE = ("grow_depth", "seq_schedule", "batch_schedule")


def resolve_progressive_methods(config: RunConfig, world: World) -> tuple[RunConfig, str | None]:
    """``config`` with the default progressive methods added where they apply, and what to tell the user."""
    if not config.methods.progressive or any(name in PROGRESSIVE for name in config.methods.use):
        return config, None
    added, left_out = [], []
    for name in PROGRESSIVE:
        try:  # validating the config checks what it can alone; check_methods adds the processes
            check_methods(config.replace(**{"methods.use": [*config.methods.use, *added, name]}), world)
        except FlopwiseError as err:
            left_out.append(f"{name} left out ({err})")
            continue
        added.append(name)
    if not added and not left_out:
        return config, None
    note = ("progressive: " + ", ".join(added) + " (the default recipe; methods.progressive=false turns it off)"
            if added else "progressive: none")
    if left_out:
        note += "; " + "; ".join(left_out)
    return config.replace(**{"methods.use": [*config.methods.use, *added]}), note
