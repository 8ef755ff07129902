"""Every method a run can use, in the order their hooks run.  Adding a method is one line here.

The order matters where hooks compose: a static mixture sets the weights an online mixture starts
from, and SALT's distillation term is mixed in before sample reweighting multiplies the result.
"""

from __future__ import annotations

from flopwise.methods.base import Method
from flopwise.methods.checkpointing import ActivationCheckpointing
from flopwise.methods.curriculum import Curriculum
from flopwise.methods.eight_bit import EightBitStates
from flopwise.methods.galore import GaLore
from flopwise.methods.layerwise import PerLayerUpdates
from flopwise.methods.lisa import LISA
from flopwise.methods.lora import LoRA
from flopwise.methods.mixture import StaticMixture
from flopwise.methods.online_mixture import OnlineMixture
from flopwise.methods.reweight import SampleReweighting
from flopwise.methods.salt import Salt
from flopwise.methods.sltrain import SLTrain

METHODS: tuple[type[Method], ...] = (
    EightBitStates,
    ActivationCheckpointing,
    PerLayerUpdates,
    GaLore,
    SLTrain,
    LISA,
    LoRA,
    StaticMixture,
    OnlineMixture,
    Curriculum,
    Salt,
    SampleReweighting,
)

BY_NAME: dict[str, type[Method]] = {method.name: method for method in METHODS}
MEMORY_METHODS: tuple[str, ...] = tuple(method.name for method in METHODS if method.saves_memory)
