"""``[posttrain]``: what `flopwise sft` and `flopwise dpo` train on and how; a pretraining run leaves it unset.

The starting model is ``model.init_from`` (a finished run folder, or a Hugging Face folder or hub id), as for
continued pretraining; the budget, optimizer, schedule and methods are the run's usual sections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from flopwise.section import Section, in_range, one_or_many


# Config values a stage starts from where the user set none: DPO moves a tuned model by small steps, so its
# learning rates are a tenth of pretraining's (bench/posttrain.py: at pretraining's, the held-out DPO loss rose).
STAGE_DEFAULTS: dict[str, dict[str, float]] = {"sft": {}, "dpo": {"optim.lr": 1e-3, "optim.muon_lr": 5e-3}}


class PostTrainSection(Section):
    """``stage``: pretrain (a `flopwise train` run), sft or dpo.  ``data``: JSONL files (conversations for sft,
    preference pairs for dpo); empty: the built-in data from the standard library.  ``pack``: several
    conversations per window, each attending only to itself (sft).  ``beta``: DPO's strength of the pull
    towards the reference.  ``heldout``: the share of each file's records held out (the built-in data is
    held out by package); ``heldout_max``: at most this many held-out records are scored."""

    stage: Literal["pretrain", "sft", "dpo"] = "pretrain"
    data: list[str] = []
    pack: bool = True
    beta: float = 0.1
    heldout: float = 0.05
    heldout_max: int = 256

    _lists = field_validator("data", mode="before")(one_or_many)
    _beta = in_range("beta", low=0, above=True)
    _share = in_range("heldout", low=0, high=1, above=True, below=True)
    _count = in_range("heldout_max", low=1)
