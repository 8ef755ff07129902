"""The stages of the one engine, by ``posttrain.stage``: each differs from the others only in its seams (the
model it starts from, its data, its objective, its evaluation: flopwise/stages/base.py), and the session runs
every stage the same way.  Adding a stage is one line here: its class's import path."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flopwise.errors import FlopwiseError

if TYPE_CHECKING:
    from flopwise.stages.base import Stage

REGISTERED = {
    "pretrain": "flopwise.stages.pretrain.PretrainStage",
    "sft": "flopwise.stages.posttrain.SFTStage",
    "dpo": "flopwise.stages.posttrain.DPOStage",
    "rl": "flopwise.stages.rl.RLStage",
}


def stage_class(name: str) -> type[Stage]:
    """The stage called ``name``; a one-line refusal naming the stages there are."""
    if name not in REGISTERED:
        raise FlopwiseError(f"posttrain.stage='{name}' is not a stage: choose one of {', '.join(REGISTERED)}")
    module, attribute = REGISTERED[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), attribute)
