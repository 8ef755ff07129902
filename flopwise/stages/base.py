"""What a stage is: the seams in which pretraining, SFT and DPO (and next RL) differ.

The session (flopwise/session.py) runs every stage the same way: it resolves the run, builds the methods, the
model and the optimizer, runs the loop with its meter and checkpoints, and writes the run folder.  A stage
supplies only what is its own:

- ``check`` and ``shape`` (class): its refusals and the model shape it trains, for the resolve stage;
- ``prepare``: its data, the tokenizer, and what one optimizer step spends;
- ``initial_weights``: the weights a new run starts from (``--init-from``, a post-training start);
- ``build``: the methods' setup, its sampler and objective, and its evaluation.

A new stage is a subclass and one line in flopwise/stages/__init__.py; it overrides nothing of the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.model.config import ModelConfig
from flopwise.runtime import Ranks
from flopwise.train.callbacks import EvalFields
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import Objective, Sampler

if TYPE_CHECKING:
    from flopwise.config import RunConfig
    from flopwise.methods.base import World
    from flopwise.methods.stack import MethodStack
    from flopwise.model.gpt import GPT


@dataclass(frozen=True)
class Shape:
    """The model shape a stage trains, as the config and the starting model give it before any data is read.
    ``vocab_known``: False where a tokenizer trained on the data decides the vocabulary (``model.vocab_size``
    is then its bound); ``settles``: config values the shape decides (an imported model's tokenizer)."""

    model: ModelConfig
    vocab_known: bool = True
    settles: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """What a stage reads of the run it serves: the resolved config and model shape (``vocab_known``: False
    while a tokenizer trained on the data is to decide its vocabulary), where it computes, its processes and
    the micro-batch on each of them (``rank_batch``: the global batch split over them), and the display its
    messages go to.  ``frozen_embedding``: why the embedding cannot learn new rows, where a
    method freezes it."""

    config: RunConfig
    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    display: ProgressDisplay
    rank_batch: int
    vocab_known: bool = True
    frozen_embedding: str | None = None


@dataclass
class Prepared:
    """What a stage's data gives the run: the tokenizer, the model shape with its vocabulary, what one optimizer
    step spends (all processes together; ``flops_per_step`` includes a reference model's forward), the line that
    tells the user, and what plan.json keeps of the data."""

    tokenizer: Tokenizer
    model: ModelConfig
    tokens_per_step: int
    flops_per_step: float
    description: str
    record: dict[str, Any]


@dataclass
class StageEvaluation:
    """How a stage measures its model: ``during`` the run at each evaluation mark (given the tokens trained so far,
    which may size its sample), and a ``final`` evaluation;
    ``fields`` turns a result into its eval event's fields and a display line.  ``scores_start``: the starting
    model is scored at step 0 (what the budget bought over it); ``tasks``: the run's tasks, scored beside each
    evaluation (None: none); ``forecasts``: the loss forecast (a law of pretraining) applies."""

    during: Callable[[float], dict[str, Any]]
    final: Callable[[], dict[str, Any]]
    fields: EvalFields
    scores_start: bool = False
    tasks: Callable[[], dict[str, Any]] | None = None
    forecasts: bool = True


@dataclass
class StageLoop:
    """What a stage gives the loop: the sampler it draws from (its order is checkpointed), the objective that
    scores a batch (None: the methods' own, on the sampler's packed windows) and the evaluation.
    ``expected_extra_flops``: what a step is expected to spend beyond the FLOPs ``prepare`` said, where its objective
    meters more as it runs (RL's rollouts, whose length is known only once sampled): the loop plans the budget's
    remaining steps with it; the meter counts what was spent."""

    sampler: Sampler
    objective: Objective | None
    evaluation: StageEvaluation
    expected_extra_flops: Callable[[], float] | None = None


class Stage:
    """Base class of a stage; see the module docstring for the seams."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # config values a new run starts from where the user set none
    memory_note: ClassVar[str | None] = None  # what the memory estimate leaves out for this stage

    def __init__(self, context: StageContext) -> None:
        self.context = context

    @classmethod
    def check(cls, config: RunConfig, world: World | None, new: bool) -> None:
        """Refuse, in one line, settings this stage cannot run with, before any data is read."""

    @classmethod
    def shape(cls, config: RunConfig) -> Shape:
        """The model shape this stage trains for ``config``."""
        raise NotImplementedError

    def prepare(self, tokenizer: Tokenizer | None, planned: ModelConfig | None) -> Prepared:
        """Read the data.  A resumed run passes its saved tokenizer and the shape plan.json records."""
        raise NotImplementedError

    def initial_weights(self, model: GPT, methods: MethodStack) -> None:
        """Load the weights a new run starts from (a resumed run loads its checkpoint instead); ``methods`` fill a
        model whose shape they changed from the imported one (``Method.fill_from``)."""

    def build(self, model: GPT, methods: MethodStack) -> StageLoop:
        """The methods' setup, the sampler and objective, and the evaluation of ``model`` (the plain model)."""
        raise NotImplementedError
