"""The law a plan predicts with: fitted on this data and device by `flopwise scan` or `flopwise fit`,
or a published prior, labelled as such.

A fitted law is written as ``law.json`` (the law, its bootstrap replicates, the runs it was
fitted on, how fast those runs really trained against the throughput probe, and the decay
factor the early forecast uses) and, by `scan`, also under the cache keyed by everything that
would change the losses (data, tokenizer, device, recipe), so a later `plan` on the same setup
finds it without being told.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flopwise.atomic import write_json_atomic
from flopwise.budget import format_amount
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.model.config import NAMED_SIZES
from flopwise.scaling.law import CHINCHILLA_REFIT, ScalingLaw, interval
from flopwise.train.loss_curve import BOOTSTRAP_Z, Calibration

LAW_FILE = "law.json"

# Decay factor of the early forecast before any scan: final held-out loss over the extrapolated
# stable-phase training loss.  The 15-minute scan of the default corpus with the default recipe
# measured 1.041 +- 0.027 over 8 pilots (bench/results/planner.json); n_runs 0 marks it a prior.
PRIOR_KAPPA = Calibration(kappa_mean=1.04, kappa_std=0.03, n_runs=0)
# A fitted law plans sizes at most this factor outside the sizes of its runs.  Its size term is pinned
# only where runs were made: a 15-minute scan of d_model 64, 96 and 128 fitted A/N^alpha so flat that
# the law predicted 2.95 for a 5-minute run of d_model 32, which reaches about 4.
SIZE_EXTRAPOLATION = 2.0


@dataclass(frozen=True)
class LawPrior:
    """A fitted law's forecast for one model size: its loss at the run's final tokens, with a relative
    standard deviation from the bootstrap's spread and the law's holdout error (``extra_sd``)."""

    law: ScalingLaw
    bootstrap: Sequence[ScalingLaw]
    non_embedding: float
    extra_sd: float

    def predict(self, tokens: float) -> tuple[float, float]:
        """(loss, relative standard deviation) at ``tokens``."""
        loss = float(self.law.loss(self.non_embedding, tokens))
        low, high = interval(self.bootstrap, self.non_embedding, tokens)
        return loss, math.hypot((high - low) / (2 * BOOTSTRAP_Z * loss), self.extra_sd)


@dataclass
class PlanningLaw:
    """A loss law with what is known of its uncertainty, and how it was obtained."""

    law: ScalingLaw
    bootstrap: list[ScalingLaw] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    throughput_ratio: float = 1.0  # achieved tokens/s in real runs over the probe's
    kappa: Calibration = PRIOR_KAPPA
    key: str | None = None
    path: Path | None = None
    holdout: list[dict[str, Any]] = field(default_factory=list)  # fitting.holdout_errors
    early: list[dict[str, Any]] = field(default_factory=list)  # runs before their size's early regime ended
    early_left_out: bool = False  # whether those runs were left out of the fit (else it spans the regime)

    @property
    def is_prior(self) -> bool:
        return not self.runs

    def size_range(self) -> tuple[float, float] | None:
        """Non-embedding sizes the law may plan: within SIZE_EXTRAPOLATION of the runs it was fitted on,
        or None (no limit) for a prior, which is an extrapolation whatever the size."""
        sizes = [run["non_embedding"] for run in self.runs if run.get("non_embedding")]
        if not sizes:
            return None
        return min(sizes) / SIZE_EXTRAPOLATION, max(sizes) * SIZE_EXTRAPOLATION

    def longest_run_tokens(self) -> float | None:
        """The most tokens any of the law's runs trained on, or None (a prior, or runs without token counts).

        Plans beyond it extrapolate the token term, which a scan's short pilots can pin poorly."""
        tokens = [run["tokens"] for run in self.runs if run.get("tokens")]
        return max(tokens) if tokens else None

    def unigram_loss(self) -> float | None:
        """The data's unigram baseline (held-out nats/token), as the law's runs measured it; None for the prior
        and for runs logged before evaluations recorded it."""
        baselines = sorted(run["unigram_loss"] for run in self.runs if run.get("unigram_loss"))
        return baselines[len(baselines) // 2] if baselines else None

    def prior_for(self, non_embedding: float) -> LawPrior | None:
        """This law as a prior on a run's final loss (flopwise/train/loss_curve.py), for a fitted law with a
        bootstrap and a size within its range; None otherwise, so that the forecast reads the curve alone."""
        limits = self.size_range()
        if limits is None or not self.bootstrap or not limits[0] <= non_embedding <= limits[1]:
            return None
        extra = max((abs(h["error"]) for h in self.holdout), default=0.0)
        return LawPrior(self.law, self.bootstrap, non_embedding, extra)

    def describe(self) -> str:
        if self.is_prior:
            return (f"{self.law.describe()}; a prior from another tokenizer and corpus, so its losses are not this "
                    "data's: run `flopwise scan` to fit the law here")
        text = self.law.describe() + (f", from {self.path}" if self.path else "")
        if self.holdout:
            worst = max(self.holdout, key=lambda h: abs(h["error"]))
            text += (f"; fitted without it, the law predicts each size's longest run within "
                     f"{abs(worst['error']):.1%} (worst: {worst['run']}), a guide to its error on longer budgets")
        if self.early:
            text += "; " + self.early_regime_note()
        return text

    def early_regime_note(self) -> str:
        """Which runs ended in their early regime, and what that did to the fit."""
        ends = ", ".join(f"{format_amount('tokens', end)} for {size / 1e6:.2f}M" for size, end in sorted(
            {(r["non_embedding"], r["regime_end"]) for r in self.early}))
        if self.early_left_out:
            return (f"{len(self.early)} run(s) left out, which ended before their size's loss settled after its "
                    f"steepest fall (at {ends} non-embedding parameters)")
        return (f"{len(self.early)} of its {len(self.runs)} runs ended before their size's loss settled after its "
                f"steepest fall (at {ends} non-embedding parameters), too many to leave out: the law follows their "
                "steeper fall and will be optimistic for runs longer than its longest; fit it on longer runs "
                "(a longer scan, `flopwise scan --extend` for a scan's law, or `flopwise fit` with finished runs)")

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law.to_dict(), "bootstrap": [law.to_dict() for law in self.bootstrap], "runs": self.runs,
                "throughput_ratio": self.throughput_ratio, "kappa": vars(self.kappa), "key": self.key,
                "holdout": self.holdout, "early": self.early, "early_left_out": self.early_left_out}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> PlanningLaw:
        try:
            return cls(law=ScalingLaw.from_dict(data["law"]),
                       bootstrap=[ScalingLaw.from_dict(item) for item in data.get("bootstrap", [])],
                       runs=list(data.get("runs", [])), throughput_ratio=float(data.get("throughput_ratio", 1.0)),
                       kappa=Calibration(**data["kappa"]) if "kappa" in data else PRIOR_KAPPA,
                       key=data.get("key"), path=path, holdout=list(data.get("holdout", [])),
                       early=list(data.get("early", [])), early_left_out=bool(data.get("early_left_out", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise FlopwiseError(f"law file '{path}' is not a flopwise law ({err}): write it with `flopwise fit` "
                                "or `flopwise scan`") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())


def prior_law() -> PlanningLaw:
    return PlanningLaw(CHINCHILLA_REFIT)


def read_law(path: Path) -> PlanningLaw:
    """A law.json, or a folder holding one (a scan's output folder)."""
    file = path / LAW_FILE if path.is_dir() else path
    if not file.is_file():
        raise FlopwiseError(f"no law at '{path}': give a law.json or a `flopwise scan --out` folder")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise FlopwiseError(f"law file '{file}' is not valid JSON ({err.msg}, line {err.lineno})") from None
    return PlanningLaw.from_dict(data, file)


def setup_key(config: RunConfig, device: str) -> str:
    """What the losses and speeds of a run depend on besides its size and length: the data, the
    tokenizer, the recipe (everything but the shape and the budget) and the device."""
    dump = config.model_dump(mode="json")
    # the named size only matters through the context length it implies when seq_len is unset
    dump["model"]["seq_len"] = config.model.seq_len or NAMED_SIZES[config.model.size]["seq_len"]
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "size"):
        dump["model"].pop(name, None)
    dump.pop("budget")
    for name in ("seed", "eval_every", "eval_tokens", "log_every", "checkpoint_every", "keep_checkpoints", "log",
                 "wandb_project", "forecast_every", "target_loss", "law"):
        dump["train"].pop(name, None)
    dump["memory"].pop("limit", None)
    text = json.dumps({"config": dump, "device": device}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_law_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "laws" / f"{key}.json"


def find_law(explicit: Path | None, cache_dir: Path, key: str) -> PlanningLaw:
    """``--law`` when given; else the law a scan fitted for this setup; else the prior."""
    if explicit is not None:
        return read_law(explicit)
    cached = cached_law_path(cache_dir, key)
    return read_law(cached) if cached.is_file() else prior_law()


def law_for(config: RunConfig, device: str) -> PlanningLaw:
    """train.law (``--law``), else the law `flopwise scan` fitted for this setup on ``device``, else the prior."""
    from flopwise.data.pipeline import cache_root

    explicit = Path(config.train.law) if config.train.law else None
    return find_law(explicit, cache_root(config.data), setup_key(config, device))
