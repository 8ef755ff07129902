"""The one protocol through which every training method enters a run.

A method is a class with a ``name`` (its key in ``methods.use`` and its section ``[methods.<name>]``),
a ``Config`` (that section's schema, validated by pydantic before anything else happens) and the hooks
it needs; every hook does nothing by default.  The session, the optimizer builder, the memory
estimator and the training loop call the hooks of the methods in use through ``MethodStack``
(flopwise/methods/stack.py) and never name a method.

What a method declares, read by the resolve stage (flopwise/resolve.py) and by evaluation and export, so
that no module outside flopwise/methods/ names a method:
- ``conflicts``: the methods it cannot be combined with, and why;
- ``stages``: the stages it applies to (None: all; the methods that act on pretraining's corpus, loss or
  step shapes: pretraining only);
- ``progressive``: the default recipe adds it to a new run (``methods.progressive``);
- ``survives_extension``: a finished run that used it can be extended to a larger budget;
- ``saves_memory``, ``keeps_gradients``, ``trains_embedding``, ``matmul_dtype``: what it does to memory,
  gradients, the embedding and the matmuls' dtype;
- ``legacy_keys`` / ``legacy_switch``: where its settings lived in older config.toml files.

Hooks, in the order a run meets them:
- ``check`` (class): refuse, in one line, settings that cannot work with the run being resolved (its model
  shape, optimizer and precision: ``RunView``) and the process world, before any data is read.  The resolve
  stage calls it once per method.
- ``implied`` (class): whether the data section or the run already asks for the method (``--data NAME=PATH:W``
  asks for ``mixture``, ``model.mtp_tokens`` for ``mtp``), so the resolve stage adds it to ``methods.use``.
- ``train_shape`` (class): the model shape the run trains, given the imported one (``--init-from``): width pruning's
  narrower model, so that plan.json, the FLOPs, the memory estimate and the checkpoints all see it.
- ``memory`` (class): its part of the peak-memory estimate, as ``MemoryTraits``.
- ``average_block_density`` (class): the share of the block Linears' weights that are nonzero, averaged over
  the run (pruning), which the planner counts the model's parameters and FLOPs at.
- ``int4_group`` (class): the int4 group its model is meant for (``flopwise eval --quantize int4`` rounds to it).
- ``legacy_state`` (class): its checkpoint state where an older checkpoint kept it.
- ``calibration_windows`` (class) / ``fill_from``: where ``train_shape`` changed the shape, fill the new run's model
  from the imported one, given that many windows of the run's training data (scored by a forward pass).
- ``configure``: change the model before the optimizer is built (factorize, wrap, freeze).
- ``shape_optimizer``: change the optimizer the builder makes (update rules, state precision, hooks).
- ``setup``: load what it needs once the data is ready (a teacher, a reference run's losses).
- ``sampler_options``: mixture weights and window difficulties for the sampler.
- ``attach``: receive the sampler the run draws from.
- ``step_shape`` / ``shape_breakpoints``: what a step trains at budget progress p (global windows per
  micro-batch, window length, blocks run, share of block weights pruned): progressive training's and
  pruning's schedules, read by the budget's step counting as well as by the step itself.
- ``reshape``: make the model and optimizer train at the step's shape (stack the blocks at a growth point,
  prune to the step's sparsity).
- ``on_progress``: act at budget progress p before each step's forward (start fake quantization).
- ``next_batch``: choose a micro-batch (SALT's selection); the first method that returns one wins.
- ``loss``: change the per-sequence loss of a micro-batch, in ``methods.use``'s registry order.
- ``token_loss``: change the per-token loss of a post-training stage's micro-batch (SFT's), whose objective
  averages it over its target mask (a teacher's term over the assistant's tokens only).
- ``before_step`` / ``lr_factor`` / ``after_step``: act around each optimizer step.
- ``take_extra_flops``: FLOPs spent beyond the model's own step since the last call (a teacher).
- ``expected_extra_flops``: those FLOPs a step of so many tokens is expected to spend, for the budget's plan of
  the steps left (a FLOP budget then ends annealed at its limit).
- ``log_fields``: extra fields of each logged training event.
- ``state_dict`` / ``load_state_dict``: what exact resume needs beyond the step count and the seed;
  ``tensor_state`` / ``load_tensor_state``: its tensors (a weight average), kept in the checkpoint's
  ``methods.safetensors``.
- ``finish``: make the model the run's final one, before the final evaluation and ``final/`` (a weight
  average replaces the trained weights).

Everything a method does is a function of the step count, budget progress p, its config and the run's
seed, plus its saved state, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from flopwise.data.config import DataSection
from flopwise.data.sampler import Batch, PackedSampler
from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.model.config import ModelConfig
from flopwise.optim.config import OptimSection
from flopwise.optim.schedules import Schedule
from flopwise.optim.spec import OptimizerSpec
from flopwise.section import Section

if TYPE_CHECKING:
    from flopwise.data.pipeline import PreparedData
    from flopwise.runtime import Ranks

PRETRAIN = ("pretrain",)  # ``stages`` of the methods that act on pretraining's corpus, loss or step shapes


class MethodConfig(Section):
    """A method's config section, ``[methods.<name>]``; empty for a method without settings."""


@dataclass(frozen=True)
class World:
    """The processes a run trains on: their number, how they share the model, and the device each
    computes on (None where only the config is checked)."""

    size: int = 1
    parallel: str = "ddp"
    device: torch.device | None = None


@dataclass(frozen=True)
class RunView:
    """What a method's ``check`` reads of the run being resolved: the model shape it resolves to (an imported
    model's where ``imported``), its optimizer section, the precision asked for (``train.precision``: auto,
    fp32 or bf16) and its stage.  The resolve stage (flopwise/resolve.py) builds it; no method reads the whole
    run config."""

    model: ModelConfig
    optim: OptimSection
    precision: str = "auto"
    imported: bool = False
    stage: str = "pretrain"


@dataclass
class SamplerOptions:
    """The sampler's data order: domain ``weights`` (None: each domain in proportion to its tokens),
    ``difficulty`` of windows by their start offsets and the ``pacing`` of the easiest share by p."""

    weights: list[float] | None = None
    difficulty: Callable[[np.ndarray], np.ndarray] | None = None
    pacing: Callable[[float], float] | None = None


@dataclass
class RunResources:
    """What a method may read of its run at ``setup``: the prepared data and the sources it came from,
    the window length, the tokenizer (as JSON) and the model's vocabulary, the device, precision and processes,
    a way to tell the user, and ``shared``, where methods keep what several of them load once (a teacher that
    SALT and the curriculum both use: flopwise/methods/teacher.py).  ``data`` is None in post-training,
    whose stages take only the methods that do not read the corpus (``Method.stages``); ``schedule``: the
    learning-rate schedule, for a method that follows its phases (None where the stage gives none)."""

    data: PreparedData | None
    sources: list[str]
    seq_len: int
    tokenizer_json: str
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    message: Callable[[str], None]
    shared: dict[str, Any] = field(default_factory=dict)
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Calibration:
    """What ``fill_from`` scores an imported model on: ``windows`` [N, T] of the run's training tokens, run
    ``batch_size`` at a time, by each of ``processes`` processes alike (so that all of them fill the same model)."""

    windows: torch.Tensor
    batch_size: int
    processes: int = 1


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step trains at: ``batch_size`` windows of model.seq_len tokens per micro-batch over
    all ranks, each trained as consecutive windows of ``seq_len`` tokens, through the first ``n_layers``
    blocks, with ``block_sparsity``, the share of the blocks' matmul weights pruned to zero (counted out of its
    FLOPs).  The run's own shape unless progressive methods change it as budget progress p grows."""

    batch_size: int
    seq_len: int
    n_layers: int
    block_sparsity: float = 0.0


@dataclass
class StepOutputs:
    """One micro-batch's forward, for ``loss`` hooks: its batch, inputs on the device, the logits and
    each sequence's mean cross-entropy (fp32)."""

    batch: Batch
    inputs: torch.Tensor
    logits: torch.Tensor
    sequence: torch.Tensor


@dataclass
class TokenOutputs:
    """One micro-batch's forward in a stage that scores chosen tokens only (SFT), for ``token_loss`` hooks: the
    inputs and targets on the device [B, T], where packed sequences start (``segments``, None: unpacked), the
    logits [B, T, V] and the ``mask`` [B, T] of the tokens its loss counts."""

    inputs: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None
    logits: torch.Tensor
    mask: torch.Tensor


class Method:
    """Base class: every hook does nothing.  Subclasses set ``name`` and, if they have settings, ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    conflicts: ClassVar[dict[str, str]] = {}  # another method's name -> why the two cannot be combined
    stages: ClassVar[tuple[str, ...] | None] = None  # the stages it applies to; None: every stage
    progressive: ClassVar[bool] = False  # the default recipe adds it to a new run (methods.progressive)
    survives_extension: ClassVar[bool] = True  # False: its schedule follows the original budget's share
    saves_memory: ClassVar[bool] = False  # a memory method: checked against memory.limit, timed by the probe
    keeps_gradients: ClassVar[bool] = True  # False: gradients are used up in backward (none left to clip)
    trains_embedding: ClassVar[bool] = True  # False: the embedding is frozen (new tokens could not learn)
    matmul_dtype: ClassVar[str | None] = None  # the dtype its matmuls compute in, where not the run's
    legacy_keys: ClassVar[dict[str, str]] = {}  # a key of older config.toml files -> this section's key
    legacy_switch: ClassVar[tuple[str, Any] | None] = None  # the older key that turned it on, and its "off"

    def __init__(self, config: MethodConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    # -- before anything is built ---------------------------------------------------------------

    @classmethod
    def check(cls, config: MethodConfig, run: RunView, world: World | None) -> None:
        """Raise FlopwiseError if this method cannot run with ``run``.  ``world``: None while a run is only planned
        (``flopwise memory`` and ``plan`` may estimate any set), the processes of a run about to train."""

    @classmethod
    def implied(cls, config: MethodConfig, data: DataSection, run: RunView) -> bool:
        """Whether the data section, or the run being resolved (its model shape and stage), asks for this method."""
        return False

    @classmethod
    def train_shape(cls, config: MethodConfig, model: ModelConfig) -> ModelConfig:
        """The shape a run trains given the imported model's ``model`` (``--init-from``); a method that returns
        another one fills the run's model from the imported one in ``fill_from``."""
        return model

    @classmethod
    def calibration_windows(cls, config: MethodConfig) -> int:
        """How many windows of training data ``fill_from`` needs (0: none)."""
        return 0

    @classmethod
    def memory(cls, config: MethodConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        """Record in ``traits`` what this method changes in a training step's memory."""

    @classmethod
    def average_block_density(cls, config: MethodConfig) -> float:
        """The share of the block Linears' weights that are nonzero, averaged over budget progress p in [0, 1]."""
        return 1.0

    @classmethod
    def int4_group(cls, config: MethodConfig) -> int | None:
        """The int4 group (input columns per scale) the trained model is meant to be rounded to, if any."""
        return None

    @classmethod
    def weights_config(cls, weights: dict[str, float]) -> dict[str, Any] | None:
        """The config values (dotted keys) that make a run sample its domains by ``weights``, if this method is
        how a run does that."""
        return None

    @classmethod
    def legacy_state(cls, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """This method's state in a checkpoint written before the methods kept theirs under ``methods``."""
        return None

    @classmethod
    def refuse_in_parallel(cls, world: World | None, reason: str) -> None:
        """One-line refusal of a method that runs in one process only."""
        if world is not None and world.size > 1:
            raise FlopwiseError(f"methods.use '{cls.name}' runs in one process only (it {reason}): "
                                "run without torchrun, or drop it")

    @classmethod
    def refuse_sharded(cls, world: World | None) -> None:
        """One-line refusal of a method that needs whole local tensors, under FSDP."""
        if world is not None and world.size > 1 and world.parallel == "fsdp":
            raise FlopwiseError(f"methods.use '{cls.name}' is not supported with --parallel fsdp (FSDP2 shards "
                                "already save its memory): use --parallel ddp, or drop it")

    # -- building the run -----------------------------------------------------------------------

    def fill_from(self, imported: nn.Module, model: nn.Module, calibration: Calibration) -> bool:
        """Fill ``model`` (the shape ``train_shape`` chose) from the ``imported`` model, scoring it on
        ``calibration``; True where this method did (a method that changes no shape returns False)."""
        return False

    def configure(self, model: nn.Module) -> None:
        """Change the model before the optimizer is built (factorize, wrap or freeze modules)."""

    def shape_optimizer(self, spec: OptimizerSpec, model: nn.Module) -> None:
        """Change what the optimizer builder makes."""

    def domain_weights(self, sources: Sequence[str], domains: Sequence[str]) -> list[float] | None:
        """The weights of the data's ``domains`` (read from ``sources``) that the sampler starts from, where this
        method sets them from the config alone (``flopwise data`` shows them)."""
        return None

    def setup(self, run: RunResources) -> None:
        """Load what the method needs once the data is ready."""

    def sampler_options(self, options: SamplerOptions) -> None:
        """Set the sampler's weights or difficulty."""

    def attach(self, sampler: PackedSampler) -> None:
        """Receive the sampler the run draws from."""

    # -- each step ------------------------------------------------------------------------------

    def step_shape(self, shape: StepShape, p: float) -> StepShape:
        """The shape of a step taken at budget progress ``p`` (the share spent before it), given the one the
        methods before this one chose (the run's own, ``full``, first).  A pure function of ``p``: the budget
        counts the steps still to come from it."""
        return shape

    def shape_breakpoints(self) -> tuple[float, ...]:
        """The values of p where ``step_shape`` changes (it is constant in between)."""
        return ()

    def reshape(self, shape: StepShape, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Train at ``shape`` from this step on (called before every step with its shape)."""

    def on_progress(self, step: int, p: float) -> None:
        """Act before step ``step + 1``'s forward, at budget progress ``p`` (the schedule's)."""

    def next_batch(self, sampler: PackedSampler, p: float) -> Batch | None:
        """A micro-batch of the method's choosing, or None to let the sampler give the next one."""
        return None

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        """The per-sequence loss ``total`` [batch] as this method changes it."""
        return total

    def token_loss(self, losses: torch.Tensor, outputs: TokenOutputs, step: int, p: float) -> torch.Tensor:
        """The per-token loss ``losses`` [B, T] (fp32) as this method changes it; the stage's objective averages it
        over ``outputs.mask``."""
        return losses

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Act before optimizer step ``step + 1`` (e.g. choose which layers train)."""

    def lr_factor(self, step: int) -> float:
        """A multiplier on the schedule's learning rate for the coming step (e.g. a re-warmup)."""
        return 1.0

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Act after ``step`` optimizer steps have been taken (e.g. refactorize, update the mixture)."""

    def take_extra_flops(self) -> float:
        """FLOPs spent beyond the model's step since the last call, all ranks together."""
        return 0.0

    def expected_extra_flops(self, tokens: float) -> float:
        """FLOPs beyond the model's own that a step training ``tokens`` tokens (all ranks) is expected to spend,
        once ``setup`` has run: the budget plans the steps left with them."""
        return 0.0

    def log_fields(self) -> dict[str, Any]:
        """Fields added to each logged training event."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state an exact resume needs (most methods need none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors an exact resume needs, by name (saved as safetensors, never pickled)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``tensor_state`` saved (on the CPU; the method moves them where it keeps them)."""

    def finish(self, model: nn.Module) -> None:
        """Make ``model`` the run's final model once its last step is done, before the final evaluation and
        ``final/`` are written (a resume of a run interrupted there calls it again)."""


def default_rank(rank: int | None, d_model: int) -> int:
    """A method's rank (GaLore, SLTrain): the one set, else d_model // 4, the papers' ratio (512 for
    d_model 2048 in both GaLore's and SLTrain's 1B runs)."""
    return rank or d_model // 4
