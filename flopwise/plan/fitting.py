"""Fit the planning law to finished runs: their final held-out losses at their (N, D), how fast
they really trained against the throughput probe, and how far their schedule's decay took them
below the stable-phase curve (the early forecast's factor)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Iterable

from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.plan.early import calibrate_kappa, points_from_events, summarize_kappas
from flopwise.plan.law_file import PRIOR_KAPPA, PlanningLaw
from flopwise.plan.scaling import bootstrap_laws, fit_law
from flopwise.train.metrics import read_metrics

SCAN_FILE = "scan.json"


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
    return {"name": run_dir.name, "d_model": plan["model"]["d_model"], "n_layers": plan["model"]["n_layers"],
            "non_embedding": plan["parameters"]["non_embedding"], "tokens": finals[-1]["tokens"],
            "val_loss": finals[-1]["val_loss"], "seconds": last["seconds"],
            "tokens_per_second": last["tokens"] / last["seconds"],
            "kappa": run_kappa(run_dir, events, finals[-1])}


def run_kappa(run_dir: Path, events: list[dict[str, Any]], final: dict[str, Any]) -> float | None:
    """Final held-out loss (of the ``final`` eval event) over the run's own extrapolated stable-phase
    training loss; None for a run whose curve is too short to fit."""
    schedule = load_config(run_dir / "config.toml").schedule.build()
    try:
        return calibrate_kappa(points_from_events(events), final["val_loss"], schedule, final["tokens"])
    except FlopwiseError:
        return None


def collect_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Records of run folders, and of scan folders (their scan.json lists every pilot, including the
    shorter branches whose run folders were extended since)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if (path / SCAN_FILE).is_file():
            records.extend(json.loads((path / SCAN_FILE).read_text())["pilots"])
        elif (path / "config.toml").is_file():
            records.append(run_record(path))
        else:
            raise FlopwiseError(f"'{path}' is neither a flopwise run folder nor a scan folder: give runs' --out "
                                "folders (e.g. runs/sweep-*) or a `flopwise scan --out` folder")
    return records


def law_from_records(records: list[dict[str, Any]], key: str | None = None, samples: int = 200,
                     seed: int = 0) -> PlanningLaw:
    """Fit L(N, D) with bootstrap replicates; the throughput ratio and decay factor from the runs
    that measured them."""
    n = [r["non_embedding"] for r in records]
    d = [r["tokens"] for r in records]
    loss = [r["val_loss"] for r in records]
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise FlopwiseError(f"the {len(records)} runs given span {len(set(n))} model size(s) and {len(set(d))} token "
                            "count(s): a law in N and D needs at least two of each")
    fit = fit_law(n, d, loss, source=f"fitted on {len(records)} runs")
    bootstrap = bootstrap_laws(n, d, loss, samples=samples, seed=seed)
    holdout = holdout_errors(records)
    ratios = [r["tokens_per_second"] / r["probe_tokens_per_second"] for r in records
              if r.get("probe_tokens_per_second")]
    kappas = [r["kappa"] for r in records if r.get("kappa") is not None]
    return PlanningLaw(law=fit.law, bootstrap=bootstrap, runs=records,
                       throughput_ratio=statistics.median(ratios) if ratios else 1.0,
                       kappa=summarize_kappas(kappas) if kappas else PRIOR_KAPPA, key=key, holdout=holdout)


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
