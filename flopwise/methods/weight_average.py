"""Weight averaging: the run's final model is an average of its weights over the last part of the run, not the
weights of its last step.

``ema``: an exponential moving average whose half-life is a share of the budget (each step's weight falls by
half over ``half_life`` of budget progress), so it covers the same part of the run at any budget;
``uniform``: the plain mean of every step's weights from ``start`` on, stochastic weight averaging
(Izmailov et al. 2018).  Averaging starts after ``start``, by default where the schedule's decay starts: an
average over the decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", section 4, compare averaging with the WSD cooldown; Sanyal et al. 2023, "Early Weight Averaging
meets High Learning Rates for LLM Pre-training", average at high rates instead, which ``start`` allows).

The average is kept in fp32 whatever the weights' dtype, is saved in each checkpoint (an exact resume continues
it), and becomes the model before the final evaluation, so ``final/`` and the final held-out loss are the
average's; the evaluations during the run score the trained weights.  It averages the parameters the optimizer
trains.  A change of depth (depth growth) while averaging restarts the average from the grown weights: the new
blocks have no history to average.  Each process of a DDP run keeps the same average; FSDP shards the weights,
so it is refused there.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunResources, RunView, StepShape, World
from flopwise.model.config import ModelConfig
from flopwise.section import in_range


class WeightAverageConfig(MethodConfig):
    """``kind``: ema or uniform; ``start``: the budget progress after which steps are averaged (unset: the
    schedule's decay start); ``half_life``: the EMA's, as a share of the budget."""

    kind: Literal["ema", "uniform"] = "ema"
    start: float | None = None
    half_life: float = 0.05

    _start = in_range("start", low=0, high=1, below=True)
    _half_life = in_range("half_life", low=0, above=True)


def ema_weight(p: float, previous_p: float, half_life: float) -> float:
    """The share of a new step's weights in the EMA, for a step that moved budget progress from ``previous_p``
    to ``p``: 1 - 0.5 ** ((p - previous_p) / half_life)."""
    return 1.0 - 0.5 ** ((p - previous_p) / half_life)


class WeightAverage(Method):
    """Averages the trained weights after ``start`` and makes the average the final model."""

    name: ClassVar[str] = "weight_average"
    stages = PRETRAIN
    Config = WeightAverageConfig

    def __init__(self, config: WeightAverageConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.start = config.start
        self.average: dict[str, torch.Tensor] = {}  # parameter name -> its fp32 average
        self.count = 0  # steps averaged since the average (re)started
        self.first_p = self.last_p = 0.0  # the budget progress of the first and the last of them
        self.p = 0.0  # the current step's
        self.depth: int | None = None  # the blocks the last step ran
        self.model: nn.Module | None = None
        self.message: Callable[[str], None] = print  # the run's display, once set up

    @classmethod
    def check(cls, config: WeightAverageConfig, run: RunView, world: World | None) -> None:
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: WeightAverageConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.averaged_weights = True

    def configure(self, model: nn.Module) -> None:
        self.model = model

    def setup(self, run: RunResources) -> None:
        if self.start is None:
            assert run.schedule is not None, "pretraining gives its methods the schedule"
            self.start = run.schedule.decay_start
        self.message = run.message

    def reshape(self, shape: StepShape, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.depth is not None and shape.n_layers != self.depth and self.count:
            self.average, self.count = {}, 0
        self.depth = shape.n_layers

    def on_progress(self, step: int, p: float) -> None:
        self.p = p

    @torch.no_grad()
    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.p <= self.start:
            return
        params = trained_parameters(model, optimizer)
        if not self.count:
            self.average = {name: param.detach().float().clone() for name, param in params.items()}
            self.first_p = self.p
        else:
            share = (1.0 / (self.count + 1) if self.config.kind == "uniform"
                     else ema_weight(self.p, self.last_p, self.config.half_life))
            for name, param in params.items():
                self.average[name].lerp_(param.detach().float(), share)
        self.count += 1
        self.last_p = self.p

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        assert self.count, "the last step (at p = 1) is always averaged"
        named = dict(model.named_parameters())
        for name, average in self.average.items():
            named[name].copy_(average)
        what = "mean" if self.config.kind == "uniform" else f"EMA (half-life {self.config.half_life:g} of the budget)"
        self.message(f"final weights: the {what} of the weights of the last {self.count} steps "
                     f"(budget progress {self.first_p:.3f} to {self.last_p:.3f})")

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first_p": self.first_p, "last_p": self.last_p, "depth": self.depth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.first_p, self.last_p = int(state["count"]), float(state["first_p"]), float(state["last_p"])
        self.depth = None if state["depth"] is None else int(state["depth"])

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return dict(self.average) if self.count else {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.count and not tensors:
            raise FlopwiseError(f"the checkpoint says {self.count} steps were averaged but holds no weight average "
                                "(methods.safetensors): resume from an intact checkpoint of this run")
        named = dict(self.model.named_parameters())
        self.average = {name: tensor.to(named[name].device, torch.float32) for name, tensor in tensors.items()}


def trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that ``optimizer`` updates, by name."""
    trained = {id(param) for group in optimizer.param_groups for param in group["params"]}
    return {name: param for name, param in model.named_parameters() if id(param) in trained}
