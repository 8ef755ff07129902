"""The model-side memory methods a config names (``memory.methods``), built with its settings and
the run's seed; checkpointing (Chen et al. 2016), SLTrain (Han et al. 2024), LISA (Pan et al. 2024)
and LoRA (Hu et al. 2021).  The optimizer-side ones (8bit, galore, layerwise) are the optimizer
builder's; they appear here only to reject combinations that cannot work.
"""

from __future__ import annotations

from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.methods.base import TrainingMethod
from flopwise.methods.checkpointing import ActivationCheckpointing
from flopwise.methods.lisa import LISA
from flopwise.methods.lora import LoRA
from flopwise.methods.sltrain import SLTrain

# Each pair, and why it cannot work.
CONFLICTS: dict[tuple[str, str], str] = {
    ("sltrain", "lora"): "SLTrain replaces the dense weights that LoRA would adapt",
    ("lisa", "lora"): "LoRA freezes the blocks whose weights LISA would train",
    ("sltrain", "galore"): "GaLore projects the gradients of dense matrices, and SLTrain leaves none",
    ("lora", "galore"): "LoRA freezes the dense matrices whose gradients GaLore would project",
}


def check_combination(methods: list[str]) -> None:
    """Raise FlopwiseError for the first pair of ``methods`` that cannot be combined."""
    for (first, second), reason in CONFLICTS.items():
        if first in methods and second in methods:
            raise FlopwiseError(f"memory.methods cannot combine '{first}' and '{second}' ({reason}): "
                                f"keep one of them")


def memory_methods(config: RunConfig) -> list[TrainingMethod]:
    """The model-side methods of ``config.memory.methods``, each once, in the order given."""
    memory, seed = config.memory, config.train.seed
    check_combination(memory.methods)
    builders = {
        "checkpointing": ActivationCheckpointing,
        "sltrain": lambda: SLTrain(rank=memory.sltrain_rank, delta=memory.sltrain_delta, alpha=memory.sltrain_alpha,
                                   refactor_every=memory.sltrain_refactor_every, rewarmup=memory.sltrain_rewarmup,
                                   seed=seed),
        "lisa": lambda: LISA(layers=memory.lisa_layers, interval=memory.lisa_interval, seed=seed),
        "lora": lambda: LoRA(rank=memory.lora_rank, alpha=memory.lora_alpha, seed=seed),
    }
    return [builders[name]() for name in dict.fromkeys(memory.methods) if name in builders]
