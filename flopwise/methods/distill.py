"""Knowledge distillation from a larger model's logits (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531), as Minitron retrains its pruned models (Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation", arXiv:2407.14679; Sreenivas et al. 2024, "LLM Pruning and
Distillation in Practice: The Minitron Approach", arXiv:2408.11796).

The student's loss mixes next-token cross-entropy with the forward KL from a frozen teacher's next-token
distribution to its own, token by token:

    loss = (1 - w) * CE(student, data) + w * T^2 * KL(teacher_T || student_T)

with w linear in budget progress p from ``weight`` (p = 0) to ``weight_end`` (p = 1).  In pretraining it acts on
each sequence's mean, as SALT does; in SFT on each assistant token, averaged over the same mask as the
cross-entropy.  The teacher is loaded read-only (flopwise/methods/teacher.py) and must share the student's
tokenizer; its forward FLOPs are metered and planned, so a FLOP budget counts the whole cost.

Defaults and what they rest on:

* weight = 1.0 (KD term only): Minitron found distillation with the logit KL alone better than mixing in the
  cross-entropy when retraining a compressed model (Muralidharan et al. 2024, Sec. 4 and its best practices),
  and Sreenivas et al. 2024 distil "with forward KL divergence loss only on the logits".  Hinton et al. weighted
  the soft targets well above the hard ones too; set ``weight`` below 1 to keep some cross-entropy (a teacher
  not much better than the student).
* weight_end = None (constant): neither paper fades the KD term; SALT (methods/salt.py) is the method that does.
* temperature = 1.0: Minitron's ablation of the KL's temperature found 1.0 best for LLM logits; Hinton's larger
  temperatures soften a confident classifier's outputs, which a language model's next-token distribution
  rarely needs.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunResources, RunView, StepOutputs, TokenOutputs, World
from flopwise.methods.teacher import MeteredTeacher, distillation_loss, teacher_folder, teacher_memory, token_kl
from flopwise.model.config import ModelConfig
from flopwise.section import in_range

FIELD = "methods.distill.teacher"


class DistillConfig(MethodConfig):
    """What distillation needs from the run's configuration; see the module docstring for the defaults' sources."""

    teacher: str | None = None     # a flopwise run folder (its final/ model) or a Hugging Face model folder
    weight: float = 1.0            # w at p = 0 in (1 - w) * CE + w * KD
    weight_end: float | None = None  # w at p = 1, linear in p from weight; None: w stays ``weight``
    temperature: float = 1.0       # applied to both teacher and student logits in the KD term

    _weights = in_range("weight", "weight_end", low=0, high=1)
    _temperature = in_range("temperature", low=0, above=True)


def weight_at(p: float, settings: DistillConfig) -> float:
    """The KD weight w at budget progress ``p``: linear from ``weight`` at p = 0 to ``weight_end`` at p = 1."""
    end = settings.weight if settings.weight_end is None else settings.weight_end
    return settings.weight + (end - settings.weight) * min(max(p, 0.0), 1.0)


class Distill(Method):
    """Mixes the teacher's logit KL into the loss of pretraining (per sequence) or SFT (per assistant token); the
    teacher's forward FLOPs are metered and expected by the budget."""

    name: ClassVar[str] = "distill"
    Config = DistillConfig
    stages = ("pretrain", "sft")  # DPO and RL score whole replies against their own reference: no token targets
    conflicts = {"salt": "both distil from a teacher into the loss; salt fades it and may select data"}

    @classmethod
    def check(cls, config: DistillConfig, run: RunView, world: World | None) -> None:
        if config.teacher is None:
            raise FlopwiseError("methods.use 'distill' needs methods.distill.teacher: a finished run folder or a "
                                "Hugging Face model folder with this run's tokenizer (--distill-from RUN)")
        teacher_folder(config.teacher, FIELD)

    @classmethod
    def memory(cls, config: DistillConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        if config.teacher is not None:
            teacher_memory(config.teacher, traits, FIELD)

    def setup(self, run: RunResources) -> None:
        self.teacher = MeteredTeacher(run, str(self.config.teacher), FIELD)

    def _teacher_logits(self, inputs: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        return self.teacher.logits(inputs, segments).to(inputs.device)

    def loss(self, total: torch.Tensor, outputs: StepOutputs, step: int, p: float) -> torch.Tensor:
        weight = weight_at(p, self.config)
        if weight <= 0:
            return total
        teacher = self._teacher_logits(outputs.inputs, outputs.batch.segments)
        return (1 - weight) * total + weight * distillation_loss(outputs.logits, teacher, self.config.temperature)

    def token_loss(self, losses: torch.Tensor, outputs: TokenOutputs, step: int, p: float) -> torch.Tensor:
        weight = weight_at(p, self.config)
        if weight <= 0:
            return losses
        teacher = self._teacher_logits(outputs.inputs, outputs.segments)
        return (1 - weight) * losses + weight * token_kl(outputs.logits, teacher, self.config.temperature)

    def expected_extra_flops(self, tokens: float) -> float:
        """The teacher's forward over every token of the step (none once the weight is 0 throughout)."""
        if self.config.weight == 0 and not self.config.weight_end:
            return 0.0
        return self.teacher.teacher.flops_per_token * tokens

    def take_extra_flops(self) -> float:
        return self.teacher.take_flops()
