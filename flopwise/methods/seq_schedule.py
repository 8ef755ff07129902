"""A sequence-length schedule: short windows early, the full model.seq_len from budget progress
``until`` on (modded-nanoGPT grows its attention window during the run; Li et al. 2022, "The
Stability-Efficiency Dilemma", warm the sequence length up for GPT pre-training).

The sampler keeps drawing full windows, in the order it always does, and each is cut into consecutive
windows of the stage's length: the step trains on the same tokens (tokens per step are held) with
shorter context, so the data order and its resume are those of a run without the schedule.  A shorter
window costs less attention, metered at the length actually trained (the attention term of
flopwise/model/flops.py scales with it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from flopwise.methods.base import PRETRAIN, Method, RunView, StepShape, World
from flopwise.methods.stages import StagesConfig


class SeqScheduleConfig(StagesConfig):
    """``start``: the first window length as a share of model.seq_len (1/2, 1/4, ...); ``until``: the budget
    progress from which windows are full.  Measured defaults (bench/RESULTS.md#progressive-training)."""

    start: float = 0.125


class SeqSchedule(Method):
    """Cuts each full window into shorter ones until ``until``."""

    name: ClassVar[str] = "seq_schedule"
    stages = PRETRAIN
    progressive = True
    survives_extension = False
    Config = SeqScheduleConfig
    conflicts = {"salt": "SALT scores and picks full windows itself"}

    def __init__(self, config: SeqScheduleConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.current: int | None = None

    @classmethod
    def check(cls, config: SeqScheduleConfig, run: RunView, world: World | None) -> None:
        config.first(run.model.seq_len, "model.seq_len")

    def step_shape(self, shape: StepShape, p: float) -> StepShape:
        return dataclasses.replace(shape, seq_len=self.config.value(shape.seq_len, p))

    def shape_breakpoints(self) -> tuple[float, ...]:
        return self.config.breakpoints()

    def reshape(self, shape: StepShape, model: nn.Module, optimizer: Any) -> None:
        self.current = shape.seq_len

    def log_fields(self) -> dict[str, Any]:
        return {"seq_len": self.current} if self.current is not None else {}
