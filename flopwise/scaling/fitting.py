"""Fit the planning law to finished runs: their final held-out losses at their (N, D), how fast
they really trained against the throughput probe, and how far their schedule's decay took them
below the stable-phase curve (the early forecast's factor).

Runs that end before their size's early regime is over (flopwise/scaling/regime.py) follow a steeper
law than the runs a plan extrapolates to; they are left out of the fit when enough runs remain, and
otherwise fitted with a warning that the law will be optimistic beyond them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Iterable

from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.optim.schedules import Schedule
from flopwise.rundir import read_metrics
from flopwise.scaling.law import bootstrap_laws, fit_law
from flopwise.scaling.law_file import PRIOR_KAPPA, PlanningLaw
from flopwise.scaling.regime import early_regime_end, steepest_tokens
from flopwise.train.loss_curve import CurvePoint, calibrate_kappa, points_from_events, summarize_kappas

SCAN_FILE = "scan.json"
MIN_FITTED_RUNS = 6  # one more than the law's five parameters, as fit_law asks


def run_record(run_dir: Path) -> dict[str, Any]:
    """(N, D, final held-out loss) and speed of one finished run folder."""
    if not (run_dir / "final").is_dir():
        raise FlopwiseError(f"run '{run_dir}' has not finished (no final/ folder): fit finished runs only")
    plan = json.loads((run_dir / "plan.json").read_text())
    events = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    finals = [e for e in events if e["event"] == "eval" and e["p"] >= 1.0]
    trains = [e for e in events if e["event"] == "train"]
    if not finals or not trains:
        raise FlopwiseError(f"run '{run_dir}' has no final evaluation in metrics.jsonl: fit finished runs only")
    last = trains[-1]
    schedule = load_config(run_dir / "config.toml").schedule.build()
    points = points_from_events(events)
    return {"name": run_dir.name, "d_model": plan["model"]["d_model"], "n_layers": plan["model"]["n_layers"],
            "non_embedding": plan["parameters"]["non_embedding"], "tokens": finals[-1]["tokens"],
            "val_loss": finals[-1]["val_loss"], "unigram_loss": finals[-1].get("unigram_loss"),
            "seconds": last["seconds"],
            "tokens_per_second": last["tokens"] / last["seconds"],
            "kappa": run_kappa(points, schedule, finals[-1]), "steepest_tokens": steepest_tokens(points, schedule)}


def run_kappa(points: list[CurvePoint], schedule: Schedule, final: dict[str, Any]) -> float | None:
    """Final held-out loss (of the ``final`` eval event) over the run's own extrapolated stable-phase
    training loss; None for a run whose curve is too short to fit."""
    try:
        return calibrate_kappa(points, final["val_loss"], schedule, final["tokens"])
    except FlopwiseError:
        return None


def collect_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Records of run folders, and of scan folders (their scan.json lists every pilot, including the
    shorter branches whose run folders were extended since)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if (path / SCAN_FILE).is_file():
            records.extend(_with_steepest(json.loads((path / SCAN_FILE).read_text())["pilots"], path / "runs"))
        elif (path / "config.toml").is_file():
            records.append(run_record(path))
        else:
            raise FlopwiseError(f"'{path}' is neither a flopwise run folder nor a scan folder: give runs' --out "
                                "folders (e.g. runs/sweep-*) or a `flopwise scan --out` folder")
    return records


def _with_steepest(pilots: list[dict[str, Any]], runs: Path) -> list[dict[str, Any]]:
    """A scan's pilots, with the steepest point of the curve each had seen filled in for scans written
    before it was recorded: every pilot of a size is a prefix of that size's run folder, read once."""
    curves: dict[int, tuple[list[CurvePoint], Schedule] | None] = {}
    for pilot in pilots:
        if "steepest_tokens" in pilot:
            continue
        if pilot["d_model"] not in curves:
            curve = runs / f"d{pilot['d_model']}"
            curves[pilot["d_model"]] = ((points_from_events(read_metrics(curve / "metrics.jsonl")),
                                         load_config(curve / "config.toml").schedule.build())
                                        if (curve / "metrics.jsonl").is_file() else None)
        if curves[pilot["d_model"]] is not None:
            points, schedule = curves[pilot["d_model"]]
            pilot["steepest_tokens"] = steepest_tokens([pt for pt in points if pt.tokens <= pilot["tokens"]], schedule)
    return pilots


def law_from_records(records: list[dict[str, Any]], key: str | None = None, samples: int = 200,
                     seed: int = 0) -> PlanningLaw:
    """Fit L(N, D) with bootstrap replicates, on the runs past their size's early regime when at least
    MIN_FITTED_RUNS of them span two sizes and two token counts, else on all; the throughput ratio
    and decay factor from the runs that measured them."""
    settled, early = split_early_regime(records)
    left_out = bool(early) and _fittable(settled)
    fitted = settled if left_out else records
    n = [r["non_embedding"] for r in fitted]
    d = [r["tokens"] for r in fitted]
    loss = [r["val_loss"] for r in fitted]
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise FlopwiseError(f"the {len(records)} runs given span {len(set(n))} model size(s) and {len(set(d))} token "
                            "count(s): a law in N and D needs at least two of each")
    fit = fit_law(n, d, loss, source=f"fitted on {len(fitted)} runs")
    bootstrap = bootstrap_laws(n, d, loss, samples=samples, seed=seed)
    holdout = holdout_errors(fitted)
    ratios = [r["tokens_per_second"] / r["probe_tokens_per_second"] for r in records
              if r.get("probe_tokens_per_second")]
    kappas = [r["kappa"] for r in records if r.get("kappa") is not None]
    return PlanningLaw(law=fit.law, bootstrap=bootstrap, runs=fitted,
                       throughput_ratio=statistics.median(ratios) if ratios else 1.0,
                       kappa=summarize_kappas(kappas) if kappas else PRIOR_KAPPA, key=key, holdout=holdout,
                       early=early, early_left_out=left_out)


def split_early_regime(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs past their size's early regime, and those before it, each with ``regime_end`` set.

    A size's regime ends at the latest end any of its curves shows: a run that stopped before the
    sudden drop has a curve that looks settled, and only a longer run of its size reveals the drop."""
    ends = regime_ends(records)
    settled, early = [], []
    for record in records:
        end = ends[record["non_embedding"]]
        (settled if record["tokens"] >= end else early).append(dict(record, regime_end=end))
    return settled, early


def regime_ends(records: list[dict[str, Any]]) -> dict[int, float]:
    """Tokens where each size's early regime ends (keyed by non-embedding parameters; 0 where no curve
    showed one): the latest end any of its runs' curves shows."""
    ends: dict[int, float] = {}
    for record in records:
        end = early_regime_end(record.get("steepest_tokens"))
        ends[record["non_embedding"]] = max(ends.get(record["non_embedding"], 0.0), end)
    return ends


def _fittable(records: list[dict[str, Any]]) -> bool:
    return (len(records) >= MIN_FITTED_RUNS and len({r["non_embedding"] for r in records}) >= 2
            and len({r["tokens"] for r in records}) >= 2)


def holdout_errors(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How well the law extrapolates in D, which is what a plan for a longer budget asks of it: for each
    size, the law fitted without that size's longest run, against that run's loss.  Empty when the runs
    are too few to fit with one left out."""
    errors = []
    for size in sorted({r["non_embedding"] for r in records}):
        longest = max((r for r in records if r["non_embedding"] == size), key=lambda r: r["tokens"])
        rest = [r for r in records if r is not longest]
        try:
            law = fit_law([r["non_embedding"] for r in rest], [r["tokens"] for r in rest],
                          [r["val_loss"] for r in rest]).law
        except FlopwiseError:
            return []
        predicted = float(law.loss(longest["non_embedding"], longest["tokens"]))
        errors.append({"run": longest.get("name"), "predicted": predicted, "loss": longest["val_loss"],
                       "error": (predicted - longest["val_loss"]) / longest["val_loss"]})
    return errors
