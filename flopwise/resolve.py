"""The resolve stage: what the user wrote becomes one frozen ``ResolvedRun``, once, before any data is read.

``resolve(config, world)`` settles, in this order:
1. the stage (``posttrain.stage``) and its own refusals (flopwise/stages/);
2. the model shape: the config's, an imported model's (``--init-from``; as the methods change it: a width-pruned
   one), a post-training start's, or a resumed run's as plan.json records it;
3. the methods: those the user named, those the data or the model implies (``--data NAME=PATH:W`` implies
   ``mixture``, ``model.mtp_tokens`` implies ``mtp``), the default recipe's progressive ones for a new run where
   they apply, and those ``memory.limit`` chooses (for a BPE tokenizer still to be trained on the data, against its
   vocabulary's bound ``data.vocab_size``); each method's conflicts and ``check`` run once, against the resolved
   shape (``RunView``) and the processes;
4. the compute dtype, and the notes the user is shown.

Every entry point calls it: ``train``, ``sft``, ``dpo`` (through flopwise/api.py), ``plan``, ``scan``, ``memory``,
``data``, sweep trials and ``bench`` (through the API).  The resolved config is what config.toml records, so a
resume rebuilds the same run; resolving it again (``new=False``) adds nothing and checks the processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.methods.base import RunView, World
from flopwise.methods.choose import settle_memory_methods
from flopwise.methods.registry import BY_NAME, METHODS
from flopwise.methods.stack import check_method, in_registry_order, train_shape
from flopwise.model.config import ModelConfig
from flopwise.size import SizePlan, int4_training, plan_size
from flopwise.stages import stage_class


@dataclass(frozen=True)
class ResolvedRun:
    """A run as it will train.  ``config``: as config.toml records it (the methods resolved); ``model``: the
    shape it builds (until a BPE tokenizer is trained on the data, ``vocab_known`` is False and the vocabulary
    is ``data.vocab_size``, its bound); ``compute_dtype``: fp32 or bf16 on the device it resolved for;
    ``world``: the processes (None: a run only planned), ``rank_batch`` the windows (or rows) of a micro-batch
    on each of them; ``notes``: what the user is told."""

    config: RunConfig
    model: ModelConfig
    compute_dtype: str
    rank_batch: int
    world: World | None = None
    notes: tuple[str, ...] = ()
    vocab_known: bool = True
    size: dict[str, Any] | None = None  # what the size budget chose (flopwise/size.py SizePlan), for plan.json

    @property
    def stage(self) -> str:
        return self.config.posttrain.stage

    @property
    def methods(self) -> list[str]:
        return list(self.config.methods.use)

    @property
    def frozen_embedding(self) -> str | None:
        """Why the embedding cannot learn new rows (the method that freezes it), or None."""
        frozen = [name for name in self.methods if not BY_NAME[name].trains_embedding]
        return f"methods.use '{frozen[0]}' freezes it" if frozen else None


def resolve(config: RunConfig, world: World | None = None, *, new: bool = True, extendable: bool = False,
            settle_memory: bool = True, model: ModelConfig | None = None) -> ResolvedRun:
    """``config`` resolved for the processes ``world`` (None: a run only planned, on this machine's device).
    ``new``: a new run (False: a resumed one, whose config.toml is resolved already: no default method is added,
    and ``model`` gives its shape as plan.json records it); ``extendable``: the run will be extended to larger
    budgets (the scan's and the replay planner's pilots), so no method whose schedule follows the original
    budget's share may join it; ``settle_memory``: choose or check methods under ``memory.limit`` (``flopwise
    memory`` shows every candidate instead)."""
    stage = stage_class(config.posttrain.stage)
    stage.check(config, world, new)
    rank_batch = process_batch(config.optim.batch_size, world)
    values: dict[str, Any] = {}
    vocab_known = True
    if model is None:
        shape = stage.shape(config)
        model, vocab_known, values = shape.model, shape.vocab_known, dict(shape.settles)
        if config.model.init_from:  # the methods may train another shape than the imported one (width pruning)
            model = train_shape(config.methods.use, config.methods, model)
    dtype = compute_dtype(config, world)
    view = RunView(model, config.optim, config.train.precision, bool(config.model.init_from), stage.name)
    sections = config.methods
    use = list(config.methods.use)
    use += [m.name for m in METHODS if m.name not in use and m.implied(getattr(sections, m.name), config.data, view)]
    for name in in_registry_order(use):
        check_method(name, use, sections, view, world)
    fixed = unextendable(use)
    if extendable and fixed:
        raise FlopwiseError(f"methods.use '{fixed[0]}' follows the share of the original budget, so a run using it "
                            "cannot be extended to a larger one, and this run will be: drop it")
    notes: list[str] = []
    size_plan = None
    if new and config.budget.size is not None:
        size_plan, use = _fit_size(config, model, use, view, world)
        values["artifact.precision"] = size_plan.precision
        notes.append(size_plan.note())
    if new and config.methods.progressive and not extendable:
        use, note = _add_progressive(use, sections, view, world)
        notes += [note] if note else []
    optim_name = config.optim.name
    if settle_memory and config.memory.limit is not None:
        settled = settle_memory_methods(use, sections, config.optim, model, rank_batch, dtype, config.memory.limit)
        if settled.optimizer != optim_name:
            optim_name = settled.optimizer
            view = dataclasses.replace(view, optim=config.optim.model_copy(update={"name": optim_name}))
        for name in settled.added:
            check_method(name, [*use, *settled.added], sections, view, world)
        use += list(settled.added)
        notes.append(settled.note)
    if use != list(config.methods.use):
        values["methods.use"] = use
    if optim_name != config.optim.name:
        values["optim.name"] = optim_name
    resolved = config.replace(**values) if values else config
    return ResolvedRun(resolved, model, dtype, rank_batch, world, tuple(notes), vocab_known,
                       None if size_plan is None else size_plan.to_dict())


def _fit_size(config: RunConfig, model: ModelConfig, use: list[str], view: RunView, world: World | None
              ) -> tuple[SizePlan, list[str]]:
    """The precision final/ is stored in under the size budget (flopwise/size.py), and ``use`` with the method
    that trains for int4 added where int4 is chosen."""
    trainer, group = int4_training(config.methods)
    chosen = config.artifact.precision if "precision" in config.artifact.model_fields_set else None
    plan = plan_size(model, config.budget.size, group, chosen)
    if plan.precision == "int4" and trainer not in use:
        check_method(trainer, [*use, trainer], config.methods, view, world)
        return dataclasses.replace(plan, qat_added=True), [*use, trainer]
    return plan, use


def process_batch(batch_size: int, world: World | None) -> int:
    """The global batch split over the processes: one process's micro-batch (refused where it does not split)."""
    size = world.size if world is not None else 1
    if batch_size % size:
        raise FlopwiseError(f"optim.batch_size={batch_size} is the global batch and must split evenly over "
                            f"{size} processes: use a multiple of {size}")
    return batch_size // size


def compute_dtype(config: RunConfig, world: World | None) -> str:
    """``fp32`` or ``bf16``: what train.precision gives on the world's device (for 'auto', this machine's when
    the run is only planned)."""
    if config.train.precision != "auto":
        return config.train.precision
    import torch

    from flopwise.runtime import choose_device, choose_dtype

    device = world.device if world is not None and world.device is not None else choose_device(config.train.device)
    return "bf16" if choose_dtype("auto", device) == torch.bfloat16 else "fp32"


def _add_progressive(use: list[str], sections: Any, view: RunView, world: World | None) -> tuple[list[str], str | None]:
    """``use`` with the default recipe's progressive methods added where they apply to the run, and what to tell
    the user; nothing where the run names one itself."""
    candidates = [m.name for m in METHODS if m.progressive and (m.stages is None or view.stage in m.stages)]
    if not candidates or any(BY_NAME[name].progressive for name in use):
        return use, None
    added, left_out = [], []
    for name in candidates:
        try:
            check_method(name, [*use, *added], sections, view, world)
        except FlopwiseError as err:
            left_out.append(f"{name} left out ({err})")
            continue
        added.append(name)
    note = ("progressive: " + ", ".join(added) + " (the default recipe; methods.progressive=false turns it off)"
            if added else "progressive: none")
    if left_out:
        note += "; " + "; ".join(left_out)
    return [*use, *added], note


def unextendable(use: list[str]) -> list[str]:
    """The methods among ``use`` whose schedules follow the original budget's share, so that a run using them
    cannot be extended to a larger budget."""
    return [name for name in use if not BY_NAME[name].survives_extension]
