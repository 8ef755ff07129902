"""Planner accuracy on this machine: scan, then plan and run budgets, then compare.

1. ``scan``: `flopwise scan --budget 15m` on the default corpus fits the law for this device.
2. ``budget 5m`` (then 10m, 20m): `flopwise plan` predicts the final held-out loss of the planned
   size; `flopwise train --auto` runs it; the family members nearest half and double its
   non-embedding parameters run with the same budget for comparison.  Every run logs the early
   forecast of its final loss (at p = 0.1, 0.2, ...), so the forecast from the first 30% is
   compared with what the run reached too.
3. ``report``: the table; then `flopwise fit` on the scan and the shorter budgets' runs (those that
   ended in their early regime left out), checked on the longest budget's runs, to tell the law's
   form from the scan's data.

Stages are separate commands so that each can be checked before the next hour is spent; all of
them share a work folder and a flopwise cache (throughput probes and the scan's law), and add to
bench/results/planner.json.  Runs are timed, so two at a time only with ``--cores``: each process
on its own core with one thread, and the scan too, so that the law is fitted on the device it plans:

    python bench/planner.py scan --budget 15m
    python bench/planner.py budget 5m && python bench/planner.py budget 10m && python bench/planner.py budget 20m
    python bench/planner.py report

    # the 45-minute scan of bench/RESULTS.md, one core per process:
    python bench/planner.py scan 45m --cores 1 --work W --results R
    python bench/planner.py budget 30m --cores 0 --work W --results R & \
      python bench/planner.py budget 20m --cores 1 --runs planned,half --work W --results R
    python bench/planner.py budget 20m --cores 0 --runs double --work W --results R & \
      python bench/planner.py budget 10m --cores 1 --runs planned --work W --results R

``--results FILE`` keeps another measurement apart from bench/results/planner.json; ``--law FILE``
plans the budgets with a law of your own (`flopwise fit` on the scan and longer runs) instead of the
scan's; the scan stage records a scan already in the work folder instead of running one.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from pinning import pinned
from rich.console import Console
from rich.table import Table

from flopwise.atomic import write_json_atomic
from flopwise.budget import parse_limit
from flopwise.config import load_config
from flopwise.filelock import held
from flopwise.rundir import read_metrics
from flopwise.scaling.fitting import collect_records, law_from_records
from flopwise.scaling.law_file import PlanningLaw, read_law
from flopwise.train.forecast import LossForecaster
from flopwise.train.trainer import forecast_points

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "planner.json"
EARLY_P = 0.3
REFIT_BOOTSTRAP = 50  # the refit reports the law's point predictions; a few replicates are enough


CORES: str | None = None  # --cores: every flopwise process of this stage on these cores
RUN_LABELS = {"planned": "planned", "half": "half N", "double": "double N"}


def flopwise(*args: str, work: Path) -> None:
    prefix, env = pinned(CORES)
    env["FLOPWISE_CACHE"] = str(work / "cache")
    subprocess.run([*prefix, sys.executable, "-m", "flopwise", *args], check=True, env=env)


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"budgets": {}}


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)


def results_lock(path: Path) -> Path:
    """Two budget stages on two cores add to one results file: each read-change-write holds this lock."""
    return path.with_name(path.name + ".lock")


def run_outcome(run: Path) -> dict[str, Any]:
    """Final held-out loss, tokens, shape and the forecasts a run logged."""
    events = read_metrics(run / "metrics.jsonl")
    final = [e for e in events if e["event"] == "eval" and e["p"] >= 1.0][-1]
    plan = json.loads((run / "plan.json").read_text())
    forecasts = [{"p": e["p"], "predicted_loss": e["predicted_loss"], "low": e["low"], "high": e["high"]}
                 for e in events if e["event"] == "forecast"]
    return {"run": str(run), "d_model": plan["model"]["d_model"], "n_layers": plan["model"]["n_layers"],
            "non_embedding": plan["parameters"]["non_embedding"], "tokens": final["tokens"],
            "val_loss": final["val_loss"], "forecasts": forecasts}


def early_forecast(outcome: dict[str, Any], law: PlanningLaw) -> dict[str, Any] | None:
    """The forecast this code makes from the first 30% of a run, replayed on the steps the run had
    logged when it logged its own p = 0.3 forecast; so a run logged by an older forecaster is judged
    by the current one, from exactly what the run had seen."""
    run = Path(outcome["run"])
    events = read_metrics(run / "metrics.jsonl")
    mark = next((e for e in events if e["event"] == "forecast" and abs(e["p"] - EARLY_P) < 0.05), None)
    if mark is None:
        return None
    config = load_config(run / "config.toml")
    points = forecast_points(events, config.train.log_every, through_step=mark["step"])
    forecaster = LossForecaster(config.schedule.build(), law.kappa, points=points,
                                prior=law.prior_for(outcome["non_embedding"]))
    forecast = forecaster.forecast(mark["tokens"], mark["p"])
    if forecast is None:
        return None
    record = {key: value for key, value in forecast.to_dict().items() if key != "fit"}
    return {"p": mark["p"], **record, "error": (forecast.loss - outcome["val_loss"]) / outcome["val_loss"]}


def neighbours(n: int, widths: list[tuple[int, int]]) -> tuple[int, int]:
    """The smaller family width nearest N/2 and the larger one nearest 2N (in log N): never the planned
    size itself, even where the family's steps are wider than 2x (d_model 32 -> 64 is 6x)."""
    def nearest(target: float, side: list[tuple[int, int]]) -> int:
        return min(side, key=lambda w: abs(math.log(w[1] / target)))[0]
    return nearest(n / 2, [w for w in widths if w[1] < n]), nearest(2 * n, [w for w in widths if w[1] > n])


def cmd_scan(args: argparse.Namespace) -> None:
    """Run the scan, or record one already finished in the work folder (a scan run by hand)."""
    scan = args.work / "scan"
    if not (scan / "law.json").is_file():
        flopwise("scan", "--budget", args.budget, "--out", str(scan), work=args.work)
    results = load_results(args.results)
    results["scan"] = {"budget": args.budget, "folder": str(scan),
                       "law": json.loads((scan / "law.json").read_text()),
                       "pilots": json.loads((scan / "scan.json").read_text())}
    save_results(results, args.results)


def law_flag(args: argparse.Namespace) -> list[str]:
    return ["--law", str(args.law)] if args.law else []


def cmd_budget(args: argparse.Namespace) -> None:
    """Plan and run one budget; runs already recorded for it (a stage cut short) are kept, not rerun.
    ``--runs`` picks which of the planned, half-N and double-N runs this process makes, so that two
    processes (``--cores 0`` and ``--cores 1``) can share a budget."""
    from flopwise.config import ModelSection
    from flopwise.scaling.shapes import WIDTHS, family_fields, family_shape, non_embedding_parameters

    with held(results_lock(args.results)):
        results = load_results(args.results)
        row = results["budgets"].get(args.budget)
        if row is None:
            plan_file = args.work / f"plan-{args.budget}.json"
            flopwise("plan", "--budget", args.budget, "--out", str(plan_file), *law_flag(args), work=args.work)
            row = results["budgets"][args.budget] = {"plan": json.loads(plan_file.read_text()), "runs": {}}
            save_results(results, args.results)
    chosen = row["plan"]["chosen"]
    law = read_law(args.law or args.work / "scan")
    family = [(w, non_embedding_parameters(family_shape(ModelSection(), w, 4096))) for w in WIDTHS]
    widths = dict(zip(("half N", "double N"), neighbours(chosen["non_embedding"], family)))
    for label in (RUN_LABELS[name] for name in args.runs.split(",")):
        if label in row["runs"]:
            continue
        out = args.work / f"{args.budget}-{label.replace(' ', '')}"
        if label == "planned":
            flopwise("train", "--budget", args.budget, "--auto", "--out", str(out), *law_flag(args), work=args.work)
        else:
            shape = [arg for name, value in family_fields(widths[label]).items() if value is not None
                     for arg in ("--set", f"model.{name}={value}")]
            flopwise("train", "--budget", args.budget, "--out", str(out), *shape, *law_flag(args), work=args.work)
        with held(results_lock(args.results)):
            results = load_results(args.results)
            row = results["budgets"][args.budget]
            row["runs"][label] = run_outcome(out)
            _record(results, args.budget, row, law, args.results)
    report(results)


def _record(results: dict[str, Any], budget: str, row: dict[str, Any], law: PlanningLaw, path: Path) -> None:
    """Write one budget's row with what its runs show so far."""
    runs, chosen = row["runs"], row["plan"]["chosen"]
    results["budgets"][budget] = row
    if "planned" in runs:
        achieved = runs["planned"]["val_loss"]
        others = [runs[k]["val_loss"] for k in ("half N", "double N") if k in runs]
        row.update(predicted_loss=chosen["predicted_loss"], interval=row["plan"]["interval"], achieved_loss=achieved,
                   prediction_error=(chosen["predicted_loss"] - achieved) / achieved,
                   planned_beats_neighbours=all(achieved <= loss for loss in others) if len(others) == 2 else None,
                   early={label: early_forecast(outcome, law) for label, outcome in runs.items()})
    save_results(results, path)


def report(results: dict[str, Any]) -> None:
    console = Console(width=160)
    table = Table(title="planner accuracy (default corpus; plan from the scan's law)")
    for column in ("budget", "planned shape", "N", "predicted", "achieved", "error", "half N: loss", "double N: loss",
                   "planned best?", f"forecast at p={EARLY_P}", "forecast error"):
        table.add_column(column, justify="right")
    for budget, row in results["budgets"].items():
        runs = row["runs"]
        if "planned" not in runs:
            continue
        planned = runs["planned"]
        early = row["early"]["planned"]
        half, double = runs.get("half N"), runs.get("double N")
        best = {True: "yes", False: "no", None: "-"}[row["planned_beats_neighbours"]]
        shape = f"{planned['d_model']}d x {planned['n_layers']}"
        table.add_row(budget, shape, f"{planned['non_embedding'] / 1e6:.2f}M",
                      f"{row['predicted_loss']:.4f}", f"{row['achieved_loss']:.4f}", f"{row['prediction_error']:+.2%}",
                      f"{half['val_loss']:.4f} ({half['d_model']}d)" if half else "not run",
                      f"{double['val_loss']:.4f} ({double['d_model']}d)" if double else "not run", best,
                      f"{early['predicted_loss']:.4f}" if early else "-", f"{early['error']:+.2%}" if early else "-")
    console.print(table)
    early_rows = [(budget, label, e) for budget, row in results["budgets"].items()
                  for label, e in row.get("early", {}).items()
                  if e]
    if early_rows:
        errors = ", ".join(f"{budget} {label}: {e['error']:+.2%}" for budget, label, e in early_rows)
        console.print(f"forecast from the first 30% against the final loss, every run: {errors}", highlight=False)


def refit(results: dict[str, Any]) -> dict[str, Any]:
    """`flopwise fit` on the scan's pilots and every budget's runs but the longest budget's, checked on
    the longest budget's runs, which it never saw: whether the law's form or the scan's data limits
    the plan's accuracy.  As in `flopwise fit`, runs that ended in their size's early regime are left out."""
    budgets = sorted(results["budgets"], key=lambda b: parse_limit(b)[1])
    folders = [Path(results["scan"]["folder"])]
    folders += [Path(r["run"]) for b in budgets[:-1] for r in results["budgets"][b]["runs"].values()]
    return check_refit(collect_records(folders), results["budgets"][budgets[-1]]["runs"], budgets[-1])


def check_refit(records: list[dict[str, Any]], held_out: dict[str, dict[str, Any]], budget: str) -> dict[str, Any]:
    law = law_from_records(records, samples=REFIT_BOOTSTRAP)
    errors = {label: (float(law.law.loss(r["non_embedding"], r["tokens"])) - r["val_loss"]) / r["val_loss"]
              for label, r in held_out.items()}
    return {"law": law.law.describe(), "fitted_on": [r["name"] for r in law.runs],
            "left_out": [r["name"] for r in law.early] if law.early_left_out else [], "budget": budget,
            "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("scan", "budget", "report"))
    parser.add_argument("budget", nargs="?", default="15m", help="scan budget, or the budget to plan and run")
    parser.add_argument("--runs", default="planned,half,double",
                        help="budget stage: which runs this process makes (of planned, half, double)")
    parser.add_argument("--cores", help="run every flopwise process of this stage on these cores (taskset, one "
                        "torch thread per core), e.g. 0; give every stage of one measurement the same count")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flopwise-planner-bench"),
                        help="runs, scan and cache (kept between stages)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file the stages add to")
    parser.add_argument("--law", type=Path, help="budget and report stages: plan with this law.json instead of "
                        "the scan's (e.g. `flopwise fit` on the scan and longer runs)")
    args = parser.parse_args()
    global CORES
    CORES = args.cores
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "scan":
        cmd_scan(args)
    elif args.stage == "budget":
        cmd_budget(args)
    else:  # the early forecasts again, by the current forecaster
        results = load_results(args.results)
        law = read_law(args.law or args.work / "scan")
        for budget, row in results["budgets"].items():
            _record(results, budget, row, law, args.results)
        report(results)
        if len(results["budgets"]) > 1:
            results["refit"] = refitted = refit(results)
            save_results(results, args.results)
            errors = ", ".join(f"{label} {error:+.1%}" for label, error in refitted["errors"].items())
            Console().print(f"`flopwise fit` on the scan and the shorter budgets' runs ({len(refitted['fitted_on'])} "
                            f"runs fitted, {len(refitted['left_out'])} left out in their early regime): "
                            f"{refitted['law']}; on the {refitted['budget']} runs: {errors}", highlight=False)


if __name__ == "__main__":
    main()
