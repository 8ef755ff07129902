"""Easy-to-hard ordering of training windows (Platanios et al. 2019; Wu, Dyer & Neyshabur 2021): each
window gets a difficulty, by 'rarity' (the mean unigram surprisal of its tokens) or by 'teacher' (the
loss of the small model in ``scorer``), and at progress p only the easiest ``pacing(p)`` share of
windows is sampled (``pacing_fraction``), growing from ``start`` to all of them at ``full_at``.

Pacing (Hacohen & Weinshall 2019; Wu, Dyer & Neyshabur 2021, "When do curricula
work?", whose code is ``google-research/understanding-curricula``, ``utils/utils.py``
``get_pacing_function``).  ``g(p)`` is the fraction of the difficulty-sorted windows (easiest
first) that may be sampled at budget progress ``p``: ``g(0) = start`` (their ``b``) and ``g = 1``
from ``p = full_at`` (their ``a``) on.  ``linear`` and ``root`` are theirs,
``b + (1 - b) * (p / a)`` and ``b + (1 - b) * sqrt(p / a)``; their ``step`` is a single jump to the
full set at ``a``, whereas ``step`` here climbs in 3 equal stairs (heights ``(1 - b) / 3``, widths
``a / 3``) before reaching 1 at ``a``, in the spirit of Hacohen & Weinshall's staircase pacing.
"""

from __future__ import annotations

import io
import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Literal

import numpy as np
import torch

from flopwise.atomic import write_atomic
from flopwise.data.shards import content_key, unigram_log_probs
from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Method, MethodConfig, RunResources, RunView, SamplerOptions, World
from flopwise.methods.teacher import Teacher, shared_teacher
from flopwise.section import in_range

if TYPE_CHECKING:
    from flopwise.runtime import Ranks

SCORE_BATCH = 32  # windows per teacher forward when scoring a curriculum
RARITY_CHUNK = 4096  # windows scored at once by rarity
_STEP_STAIRS = 3


class CurriculumConfig(MethodConfig):
    """``order``: 'rarity' or 'teacher' (needs ``scorer``: a small finished run or Hugging Face folder with
    this run's tokenizer); ``pacing``: linear, root or step, from ``start`` to every window at ``full_at``."""

    order: Literal["rarity", "teacher"] = "rarity"
    pacing: Literal["linear", "root", "step"] = "linear"
    start: float = 0.1
    full_at: float = 0.5
    scorer: str | None = None

    _fractions = in_range("start", "full_at", low=0, high=1, above=True)


def pacing_fraction(p: float, pacing: str, start: float = 0.1, full_at: float = 0.5) -> float:
    """The fraction, in ``(0, 1]``, of the difficulty-sorted windows (easiest first) that may be
    sampled at budget progress ``p`` (0 at the start, 1 at the end): ``start`` at ``p = 0``, rising
    to 1 at ``p = full_at`` and staying there."""
    if not (isinstance(p, (int, float)) and p >= 0):
        raise ValueError(f"budget progress must be a number >= 0, got {p!r}")
    if p >= full_at:
        return 1.0
    t = p / full_at
    if pacing == "linear":
        shape = t
    elif pacing == "root":
        shape = math.sqrt(t)
    elif pacing == "step":
        shape = math.floor(t * _STEP_STAIRS) / _STEP_STAIRS
    else:
        raise ValueError(f"unknown pacing {pacing!r}")
    return min(1.0, start + (1 - start) * shape)


class Curriculum(Method):
    name: ClassVar[str] = "curriculum"
    Config = CurriculumConfig
    stages = PRETRAIN
    legacy_keys = {f"curriculum.{key}": key for key in ("order", "pacing", "start", "full_at", "scorer")}
    legacy_switch = ("curriculum.order", "none")

    @classmethod
    def check(cls, config: CurriculumConfig, run: RunView, world: World | None) -> None:
        if config.order == "teacher" and config.scorer is None:
            raise FlopwiseError("methods.curriculum.order='teacher' needs methods.curriculum.scorer: a small "
                                "finished run folder or Hugging Face model folder with this run's tokenizer")

    def setup(self, run: RunResources) -> None:
        c, corpus = self.config, run.data.corpus
        if c.order == "rarity":
            self.difficulty = partial(_rarity, surprisal=-unigram_log_probs(corpus), tokens=corpus.train_tokens,
                                      seq_len=run.seq_len)
        else:
            scorer = shared_teacher(run, str(c.scorer), "methods.curriculum.scorer")
            self.difficulty = partial(_teacher_scores, scorer=scorer,
                                      tokens=corpus.train_tokens, seq_len=run.seq_len, cache=corpus.path,
                                      message=run.message, ranks=run.ranks)

    def sampler_options(self, options: SamplerOptions) -> None:
        c = self.config
        options.difficulty = self.difficulty
        options.pacing = partial(pacing_fraction, pacing=c.pacing, start=c.start, full_at=c.full_at)


def _rarity(offsets: np.ndarray, surprisal: np.ndarray, tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Mean unigram surprisal of each window, a chunk of windows at a time (memory stays O(chunk))."""
    scores = np.empty(len(offsets), dtype=np.float64)
    for begin in range(0, len(offsets), RARITY_CHUNK):
        chunk = offsets[begin:begin + RARITY_CHUNK]
        scores[begin:begin + len(chunk)] = surprisal[tokens[chunk[:, None] + np.arange(seq_len + 1)]].mean(axis=1)
    return scores


def _teacher_scores(offsets: np.ndarray, scorer: Teacher, tokens: np.ndarray, seq_len: int, cache: Path,
                    message: Callable[[str], None], ranks: Ranks) -> np.ndarray:
    """The scorer's loss on each window, cached beside the corpus under a hash of the scorer's weights
    (under torchrun, rank 0 scores and the others read its file)."""
    key = content_key([*_weights_bytes(scorer), str(seq_len), offsets.tobytes()])[:16]
    path = cache / f"difficulty-{key}.npy"
    with ranks.main_first():
        if not path.is_file():
            _score_windows(offsets, scorer, tokens, seq_len, path, message)
    return np.load(path, allow_pickle=False)


def _score_windows(offsets: np.ndarray, scorer: Teacher, tokens: np.ndarray, seq_len: int, path: Path,
                   message: Callable[[str], None]) -> None:
    device = next(scorer.model.parameters()).device
    start = time.perf_counter()
    scores = np.empty(len(offsets), dtype=np.float64)
    for begin in range(0, len(offsets), SCORE_BATCH):
        chunk = offsets[begin:begin + SCORE_BATCH]
        windows = torch.from_numpy(np.asarray(tokens[chunk[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
        windows = windows.to(device)
        scores[begin:begin + len(chunk)] = scorer.sequence_losses(windows[:, :-1], windows[:, 1:]).cpu().numpy()
    write_atomic(path, _npy_bytes(scores))
    message(f"curriculum: scored {len(offsets):,} windows with {scorer.source} in {time.perf_counter() - start:.0f}s "
            "(cached for later runs)")


def _weights_bytes(teacher: Teacher) -> list[bytes]:
    state = teacher.model.state_dict()
    return [name.encode() + state[name].detach().cpu().float().numpy().tobytes() for name in sorted(state)]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
