"""A batch-size schedule: smaller global batches early, the full optim.batch_size from budget progress
``until`` on.  Early in training the batch that still uses every token well is small (the gradient noise
scale grows as the loss falls; McCandlish et al. 2018); modded-nanoGPT and the Power scheduler (Shen et
al. 2024) grow the batch during the run, and nanochat sets it from the token budget (B ~ D^0.383).

Each stage is the full batch halved a whole number of times, doubling at even steps of p, so a stage's
windows still split evenly over the ranks: every rank draws its share of the same global windows and
gradient accumulation keeps its number of micro-batches, so a stage trains on the same windows with the
same mean gradient on any number of processes.  The learning rate of a stage is scaled by
(batch / full batch) ** e, ``lr_scaling``: sqrt (e = 1/2, the square-root rule of adaptive optimizers;
Malladi et al. 2022), linear (e = 1, SGD's rule; Goyal et al. 2017) or none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from flopwise.data.sampler import PackedSampler
from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Method, RunView, StepShape, World
from flopwise.methods.stages import StagesConfig

EXPONENTS = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


class BatchScheduleConfig(StagesConfig):
    """``start``: the first global batch as a share of optim.batch_size (1/2, 1/4, ...); ``until``: the budget
    progress from which the batch is full; ``lr_scaling``: how the learning rate follows the batch."""

    start: float = 0.5  # the least costly of those measured; none beat the fixed batch on a CPU
    until: float = 0.25
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"


class BatchSchedule(Method):
    """Draws fewer windows per micro-batch until ``until``, at a learning rate scaled to the batch."""

    name: ClassVar[str] = "batch_schedule"
    stages = PRETRAIN
    progressive = True
    survives_extension = False
    Config = BatchScheduleConfig
    conflicts = {"salt": "SALT picks its own batch of windows from a fixed number of candidates"}

    def __init__(self, config: BatchScheduleConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.lr_multiplier = 1.0
        self.full = 1
        self.current: int | None = None

    @classmethod
    def check(cls, config: BatchScheduleConfig, run: RunView, world: World | None) -> None:
        first = config.first(run.optim.batch_size, "optim.batch_size")
        ranks = world.size if world is not None else 1
        if first % ranks:
            raise FlopwiseError(f"methods.batch_schedule.start={config.start:g} makes the first global batch {first} "
                                f"windows, which do not split over {ranks} processes: raise start or optim.batch_size")

    def step_shape(self, shape: StepShape, p: float) -> StepShape:
        return dataclasses.replace(shape, batch_size=self.config.value(shape.batch_size, p))

    def shape_breakpoints(self) -> tuple[float, ...]:
        return self.config.breakpoints()

    def attach(self, sampler: PackedSampler) -> None:
        self.full = sampler.batch_size * sampler.world_size

    def reshape(self, shape: StepShape, model: Any, optimizer: Any) -> None:
        self.current = shape.batch_size
        self.lr_multiplier = (shape.batch_size / self.full) ** EXPONENTS[self.config.lr_scaling]

    def lr_factor(self, step: int) -> float:
        return self.lr_multiplier

    def log_fields(self) -> dict[str, Any]:
        return {"batch_size": self.current} if self.current is not None else {}
