"""A teacher: a frozen model that scores or distills into the run's student (SALT's small teacher, the
curriculum's scorer), loaded read-only from a flopwise run's ``final/`` or a Hugging Face folder (safetensors
only; never unpickled).  It must share the student's tokenizer exactly, since it is compared with the student
over the same token ids.  A run loads each source once: methods that name the same one share it
(``shared_teacher``).  The distillation term that SALT and ``distill`` mix into the loss is here too
(``token_kl``), and so is what a teacher adds to the memory estimate (``teacher_memory``)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from flopwise.errors import FlopwiseError
from flopwise.memory.traits import MemoryTraits
from flopwise.methods.base import RunResources
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters, forward_flops_per_token
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config
from flopwise.rundir import is_run_dir, planned_model_config
from flopwise.runtime import autocast


def shared_teacher(run: RunResources, source: str, field: str) -> Teacher:
    """The teacher at ``source`` for this run's student, loaded once per run (``field``: the setting naming
    it, for its errors)."""
    key = f"teacher:{source}"
    if key not in run.shared:
        run.shared[key] = Teacher.load(source, run.vocab_size, run.device, run.tokenizer_json, seq_len=run.seq_len,
                                       field=field)
    return run.shared[key]


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Token-level KL(teacher || student) of the next-token distributions at ``temperature``: [B, T] from logits
    [B, T, V] (the forward KL that Minitron distils with, Muralidharan et al. 2024).

    Computed in fp32; teacher logits of -inf (token ids the teacher lacks) have probability 0 and add
    nothing.  Scaled by temperature**2 (Hinton et al. 2015) so its gradient keeps its size across
    temperatures; at 1 it is the plain KL, which differs from the cross-entropy to the teacher's soft
    labels only by the teacher's entropy (a constant for the student).  The teacher side is detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1) * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """``token_kl`` averaged over the positions of each sequence: [B] from logits [B, T, V]."""
    return token_kl(student_logits, teacher_logits, temperature).mean(dim=-1)


def teacher_folder(source: str, field: str) -> Path:
    """The folder a teacher setting names, refused in one line where there is none (checked before any data is
    read, and again when the teacher is loaded)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FlopwiseError(f"{field}='{source}' is not a folder: give a flopwise run folder (with final/) "
                            "or a Hugging Face model folder (config.json + model.safetensors)")
    return folder


def teacher_memory(source: str, traits: MemoryTraits, field: str) -> None:
    """Record in ``traits`` the frozen teacher at ``source`` (its fp32 weights; its shape read from its folder)
    and the logit-sized fp32 tensors its distillation term keeps alive until backward: the teacher's logits, its
    probabilities and the student's log-probabilities (``token_kl``)."""
    folder = teacher_folder(source, field)
    config = _teacher_shape(folder, source, None, field)[1]
    traits.frozen_parameters += count_parameters(config)["total"]
    traits.kept_logits += 3


class MeteredTeacher:
    """The run's shared teacher as a method calls it (SALT, distill): its logits in the run's precision on its own
    device, with their forward FLOPs (all ranks) counted until the meter takes them."""

    def __init__(self, run: RunResources, source: str, field: str) -> None:
        self.teacher = shared_teacher(run, source, field)
        self.device = next(self.teacher.model.parameters()).device
        self.dtype, self.ranks = run.dtype, run.ranks
        self.flops = 0.0

    def logits(self, inputs: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits of ``inputs`` (on the teacher's device), attending within ``segments`` if given."""
        with autocast(self.device, self.dtype):
            logits = self.teacher.logits(inputs.to(self.device), None if segments is None else segments.to(self.device))
        self.flops += self.teacher.flops_per_token * inputs.numel() * self.ranks.world_size
        return logits

    def take_flops(self) -> float:
        """The FLOPs counted since the last call."""
        flops, self.flops = self.flops, 0.0
        return flops


class Teacher:
    """The frozen small model, loaded read-only (safetensors only; never unpickle)."""

    def __init__(self, model: GPT, vocab_size: int, seq_len: int, source: Path) -> None:
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size  # the student's: logits are padded to it
        self.source = source
        self.config: ModelConfig = model.config
        self.num_parameters = count_parameters(self.config)["total"]
        # forward FLOPs per token at the student's window length: 2 * matmul weights (head included) plus
        # attention's QK^T and AV products (flopwise.model.flops' convention, one third of training)
        self.flops_per_token: float = forward_flops_per_token(replace(self.config, seq_len=seq_len))

    @classmethod
    def load(cls, source: str, vocab_size: int, device: torch.device, student_tokenizer_json: str,
             seq_len: int | None = None, *, field: str) -> Teacher:
        """The teacher from a flopwise run folder (its ``final/``) or a Hugging Face folder, for a student
        whose model has ``vocab_size`` ids and whose tokenizer is ``student_tokenizer_json``.
        ``seq_len``: the student's window length (default: the teacher's own context); ``field``: the setting
        that named it, which its errors name."""
        folder = teacher_folder(source, field)
        weights, cfg = _teacher_shape(folder, source, seq_len, field)
        _check_tokenizer(folder, weights, source, student_tokenizer_json, field)
        student_tokens = _vocab_of(student_tokenizer_json)
        if cfg.vocab_size > vocab_size or cfg.vocab_size < student_tokens:
            raise FlopwiseError(f"{field}='{source}' has vocab_size {cfg.vocab_size} but the student's model has "
                                f"{vocab_size} ids and its tokenizer {student_tokens} tokens: train the teacher "
                                "with the same data.tokenizer as the student")
        if seq_len is not None and seq_len > cfg.context:
            raise FlopwiseError(f"{field}='{source}' has a context of {cfg.context} tokens, shorter than the "
                                f"student's seq_len {seq_len}: use a teacher trained on windows at least as long")
        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to_empty(device=device)
        if model.rope is not None:  # buffers are not in the checkpoint: rebuild them on the device
            model.rope = type(model.rope)(cfg.head_dim, cfg.context, cfg.rope_theta).to(device)
        try:
            load_weights_into(model, weights)
        except FlopwiseError as error:
            raise FlopwiseError(f"{field}='{source}': {error}") from None
        return cls(model, vocab_size, seq_len or cfg.seq_len, folder)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, vocab_size] of token ids x [B, T] (no grad, eval mode); ids the
        teacher lacks (a student vocab padded past the tokenizer) get -inf.  ``segments``: where packed
        sequences start, as the student sees them (GPT.logits), so the teacher attends within them too."""
        self.model.eval()
        out = self.model(x, segments=segments)[0]
        missing = self.vocab_size - out.shape[-1]
        return F.pad(out, (0, missing), value=-math.inf) if missing else out

    @torch.no_grad()
    def sequence_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The teacher's mean next-token cross-entropy of each sequence: [B]."""
        return self._token_losses(self.logits(x), y).mean(dim=-1)

    @torch.no_grad()
    def selection_scores(self, x: torch.Tensor, y: torch.Tensor, top_k: int = 10) -> torch.Tensor:
        """SALT_DS scores [B] (the paper's Eq. 10): the median per-token loss over the positions whose
        target is among the teacher's ``top_k`` predictions; NaN where no position is (nothing learnable).
        The median of an even count is the lower middle value (torch.nanmedian)."""
        return self.scores_from_logits(self.logits(x), y, top_k)

    @staticmethod
    def scores_from_logits(logits: torch.Tensor, y: torch.Tensor, top_k: int) -> torch.Tensor:
        """``selection_scores`` from teacher logits already computed (e.g. for the KD term too)."""
        losses = Teacher._token_losses(logits, y)
        target = logits.float().gather(-1, y.unsqueeze(-1)).squeeze(-1)
        rank = (logits.float() > target.unsqueeze(-1)).sum(dim=-1)  # tokens strictly more likely
        learnable = rank < top_k
        return torch.where(learnable, losses, torch.nan).nanmedian(dim=-1).values

    @staticmethod
    def _token_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return flat.view(y.shape)


def _teacher_shape(folder: Path, source: str, seq_len: int | None, field: str) -> tuple[Path, ModelConfig]:
    """The folder holding the weights and the model shape: a run's final/ (its config.json, a stock class's or
    flopwise's remote code's; for a run that saved weights only, as runs did before the remote-code export, the
    run's plan.json), or the Hugging Face folder itself."""
    weights = folder / "final" if is_run_dir(folder) else folder
    if is_run_dir(folder) and not weights.is_dir():
        raise FlopwiseError(f"{field}='{source}' is a run folder without final/: finish (or resume) that run "
                            "first, or give its model's Hugging Face folder")
    try:
        if (weights / "config.json").is_file() or not is_run_dir(folder):
            config = read_hf_config(weights)
            length = seq_len or config.get("max_position_embeddings") or 2048
            return weights, model_config_from_hf(config, weights, length)
        return weights, planned_model_config(folder)
    except FlopwiseError as error:
        raise FlopwiseError(f"{field}='{source}': {error}") from None
    except KeyError as error:
        raise FlopwiseError(f"{field}='{source}': config.json has no {error}: is it a Llama-family model "
                            "folder?") from None


def _check_tokenizer(folder: Path, weights: Path, source: str, student_json: str, field: str) -> None:
    """The teacher's tokenizer.json (beside its weights, or in the run folder) must be the student's."""
    file = next((f for f in (weights / "tokenizer.json", folder / "tokenizer.json") if f.is_file()), None)
    if file is None:
        raise FlopwiseError(f"{field}='{source}' has no tokenizer.json, so its token ids cannot be checked "
                            "against the student's: train the teacher with the same data.tokenizer")
    if _canonical(file.read_text(encoding="utf-8")) != _canonical(student_json):
        raise FlopwiseError(f"{field}='{source}' uses a different tokenizer ({file}) from the student's: "
                            "train the teacher with the same data.tokenizer")


def _canonical(tokenizer_json: str) -> object:
    """A tokenizer.json's content, independent of formatting and key order."""
    try:
        return json.loads(tokenizer_json)
    except json.JSONDecodeError:
        return tokenizer_json


def _vocab_of(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer as HFTokenizer

    return max(HFTokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True).values()) + 1
