"""From the config's data-side methods to the run's sampler and objective.

Mixture weights, online domain reweighting, a curriculum's window difficulties, sample reweighting
and the SALT teacher are each optional; this module builds what the config asks for and nothing
else, so a run without them keeps the plain sampler order and the model's own mean loss.
"""

from __future__ import annotations

import io
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flopwise.atomic import write_atomic
from flopwise.config import RunConfig
from flopwise.data.mixture import DomainReweighter, natural_weights, resolve_weights
from flopwise.data.sampler import PackedSampler
from flopwise.data.shards import TokenCorpus, content_key
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import unigram_log_probs
from flopwise.methods.salt import SaltSettings, Teacher
from flopwise.methods.sample_weights import ReweightSettings, pacing_fraction
from flopwise.train.distributed import Ranks
from flopwise.train.metrics import read_metrics
from flopwise.train.objective import Objective

SCORE_BATCH = 32  # windows per teacher forward when scoring a curriculum
RARITY_CHUNK = 4096  # windows scored at once by rarity


def build_sampler(config: RunConfig, corpus: TokenCorpus, seq_len: int, batch: int, ranks: Ranks,
                  scorer: Teacher | None, message: Callable[[str], None]) -> PackedSampler:
    """The run's data order: natural or mixed, shuffled or by a curriculum."""
    ranges = corpus.train_domain_ranges()
    weights = resolve_weights(config.mixture.weights, config.data.sources, corpus.domains)
    if weights is None and config.mixture.online != "none":
        weights = natural_weights(ranges, seq_len)
    curriculum = config.curriculum
    difficulty, pacing = None, None
    if curriculum.order != "none":
        pacing_fraction(0.0, curriculum.pacing, curriculum.start, curriculum.full_at)  # validates the settings
        pacing = partial(pacing_fraction, pacing=curriculum.pacing, start=curriculum.start,
                         full_at=curriculum.full_at)
        difficulty = window_difficulty(curriculum.order, corpus, seq_len, scorer, message, ranks)
    return PackedSampler(corpus.train_tokens, seq_len, batch, seed=config.train.seed, rank=ranks.rank,
                         world_size=ranks.world_size, domain_ranges=ranges, weights=weights,
                         domain_names=corpus.domains, difficulty=difficulty, pacing=pacing)


def window_difficulty(order: str, corpus: TokenCorpus, seq_len: int, scorer: Teacher | None,
                      message: Callable[[str], None], ranks: Ranks) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of training windows by their start offsets (lower is easier)."""
    tokens = corpus.train_tokens
    if order == "rarity":
        return partial(_rarity, surprisal=-unigram_log_probs(corpus), tokens=tokens, seq_len=seq_len)
    if scorer is None:
        raise FlopwiseError("curriculum.order='teacher' needs curriculum.scorer: a small finished run folder or "
                            "Hugging Face model folder with this run's tokenizer")
    return partial(_teacher_scores, scorer=scorer, tokens=tokens, seq_len=seq_len, cache=corpus.path,
                   message=message, ranks=ranks)


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


def load_teacher(source: str, tokenizer: Tokenizer, seq_len: int, device: torch.device) -> Teacher:
    return Teacher.load(source, tokenizer.vocab_size, device, tokenizer.to_json(), seq_len=seq_len)


def reference_losses(reference: str | None, domains: list[str]) -> list[float] | None:
    """Per-domain final held-out losses of a finished reference run (DoReMi's reference model)."""
    if reference is None:
        return None
    metrics = Path(reference) / "metrics.jsonl"
    if not metrics.is_file():
        raise FlopwiseError(f"mixture.reference='{reference}' is not a finished flopwise run (no metrics.jsonl): "
                            "train the reference run first and give its folder")
    evals = [event for event in read_metrics(metrics) if event["event"] == "eval"]
    final = evals[-1]["domains"] if evals else {}
    missing = [domain for domain in domains if domain not in final]
    if missing:
        raise FlopwiseError(f"mixture.reference='{reference}' has no held-out loss for domain '{missing[0]}': "
                            "use a reference run trained on the same data")
    return [float(final[domain]) for domain in domains]


def build_objective(config: RunConfig, sampler: PackedSampler, dtype: torch.dtype, ranks: Ranks,
                    teacher: Teacher | None, domains: list[str]) -> Objective | None:
    """The per-sequence objective, or None when no method needs it (the plain mean loss)."""
    reweight = None
    if config.reweight.strategy != "none":
        r = config.reweight
        reweight = ReweightSettings(strategy=r.strategy, temperature=r.temperature, delta=r.delta, burn_in=0)
    salt = None
    if teacher is not None:
        s = config.salt
        salt = SaltSettings(teacher=str(s.teacher), kd_weight=s.kd_weight, kd_until=s.kd_until,
                            temperature=s.temperature, select_pool=s.select_pool)
    reweighter = None
    if config.mixture.online != "none":
        m = config.mixture
        reweighter = DomainReweighter(base=list(sampler.weights), rule=m.online, eta=m.eta, smoothing=m.smoothing,
                                      reference=reference_losses(m.reference, domains))
    if reweight is None and salt is None and reweighter is None:
        return None
    return Objective(sampler, dtype, ranks, reweight=reweight, burn_in=config.reweight.burn_in, salt=salt,
                     teacher=teacher, reweighter=reweighter)
