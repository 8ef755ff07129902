"""Read finished (or unfinished) run folders for a report, without importing torch.

A report is made on any machine, including one without a GPU or without torch at all, from
the files a run leaves behind: ``metrics.jsonl``, ``plan.json`` and ``config.toml``.  This
module turns one folder into a :class:`Run`: its name, its eval and train series and the
final figures the comparison table shows.  Nothing here writes anything.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.rundir import CONFIG_FILE, METRICS_FILE, PLAN_FILE, read_metrics  # plain json: no torch import

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FINAL_DIR = "final"  # written last by a run that spent its whole budget

Event = dict[str, Any]


@dataclass(frozen=True)
class Final:
    """The figures one table row shows; None where the run has no such figure (yet)."""

    loss: float | None
    bpb: float | None
    domains: dict[str, float]
    eval_p: float | None
    parameters: int | None
    non_embedding_parameters: int | None
    steps: int
    p: float
    tokens: float
    flops: float
    seconds: float
    throughput: float | None
    mfu: float | None
    peak_lr: float | None
    device: str | None

    def to_dict(self) -> dict[str, Any]:
        return finite_or_none(asdict(self))


@dataclass(frozen=True)
class Run:
    """One run folder as the report sees it; ``evals``/``trains``/``tasks`` are the metrics events, in file order.

    ``tasks`` holds the in-run task scores, one event per evaluation mark; empty for a run without
    ``train.eval_tasks``.
    """

    name: str
    path: Path
    finished: bool
    evals: list[Event]
    trains: list[Event]
    tasks: list[Event]
    plan: dict[str, Any] = field(repr=False)
    config: dict[str, Any] = field(repr=False)

    @cached_property
    def final(self) -> Final:
        return final_figures(self)


def finite_or_none(value: Any) -> Any:
    """NaN/inf (a diverged loss) become None, so report.json stays standard JSON; dicts recurse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    return value


def final_eval(evals: list[Event]) -> Event | None:
    """The end-of-budget evaluation (logged at p == 1.0) if there is one, else the latest."""
    at_end = [event for event in evals if event.get("p") == 1.0]
    if at_end:
        return at_end[-1]
    return evals[-1] if evals else None


def final_figures(run: Run) -> Final:
    """Final loss from the evaluation at p == 1; totals from the last train event (the meter's state).

    Throughput and MFU are totals over training seconds, not a mean of logged steps: with
    ``train.log_every`` > 1 only some steps are logged, and slow first steps would be under-weighted.
    """
    last = run.trains[-1]
    evaluation = final_eval(run.evals)
    seconds = float(last.get("seconds") or 0.0)
    tokens, flops = float(last.get("tokens") or 0.0), float(last.get("flops") or 0.0)
    peak = run.plan.get("matmul_peak_flops")
    parameters = run.plan.get("parameters") or {}
    return Final(
        loss=evaluation.get("val_loss") if evaluation else None,
        bpb=evaluation.get("val_bpb") if evaluation else None,
        domains=dict(evaluation.get("domains") or {}) if evaluation else {},
        eval_p=evaluation.get("p") if evaluation else None,
        parameters=parameters.get("total"),
        non_embedding_parameters=parameters.get("non_embedding"),
        steps=int(last.get("step", len(run.trains))),
        p=float(last.get("p") or 0.0),
        tokens=tokens,
        flops=flops,
        seconds=seconds,
        throughput=tokens / seconds if seconds > 0 else None,
        mfu=flops / seconds / peak if seconds > 0 and peak else None,
        peak_lr=(run.config.get("optim") or {}).get("lr"),
        device=run.plan.get("device"),
    )


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        raise FlopwiseError(f"'{run_dir}': cannot read {path.name} ({err.__class__.__name__}): "
                            "the run folder is damaged; leave it out of the report") from None


def _read_toml(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FlopwiseError(f"'{run_dir}': cannot read {path.name} ({err.__class__.__name__}): "
                            "the run folder is damaged; leave it out of the report") from None


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """One run folder; a FlopwiseError naming the folder and the fix if it is not a run or has no metrics."""
    if not run_dir.is_dir():
        raise FlopwiseError(f"'{run_dir}' is not a folder: give the --out folder of a `flopwise train` run")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FlopwiseError(f"'{run_dir}' is not a flopwise run folder (no {CONFIG_FILE}): "
                            "give the --out folder of a `flopwise train` run")
    if not (run_dir / PLAN_FILE).is_file():
        raise FlopwiseError(f"'{run_dir}' has no {PLAN_FILE}: the run did not get past its setup; "
                            "leave it out of the report or train it again")
    metrics = run_dir / METRICS_FILE
    events = read_metrics(metrics) if metrics.is_file() else []
    events = [event for event in events if isinstance(event, dict)]
    trains = [event for event in events if event.get("event") == "train"]
    if not trains:
        raise FlopwiseError(f"'{run_dir}' has no training metrics yet ({METRICS_FILE} missing or without a "
                            "step): let it train at least one step, or leave it out of the report")
    tasks = [event for event in events if event.get("event") == "tasks" and isinstance(event.get("tasks"), dict)]
    return Run(name=name or run_dir.resolve().name, path=run_dir, finished=(run_dir / FINAL_DIR).is_dir(),
               evals=[event for event in events if event.get("event") == "eval"], trains=trains, tasks=tasks,
               plan=_read_json(run_dir / PLAN_FILE, run_dir), config=_read_toml(run_dir / CONFIG_FILE, run_dir))


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell equal names apart.

    ``runs/a`` and ``old/b`` give ``a`` and ``b``; ``x/run`` and ``y/run`` give ``x/run`` and ``y/run``.
    """
    parts = [path.resolve().parts for path in paths]
    names = []
    for index, own in enumerate(parts):
        depth = 1
        while depth < len(own):
            suffix = own[-depth:]
            if all(other[-depth:] != suffix for j, other in enumerate(parts) if j != index):
                break
            depth += 1
        names.append("/".join(own[-depth:]) if len(own) > 1 else str(paths[index]))
    return names


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Runs in the order given (a folder given twice counts once), each with a name unique in the report."""
    if not run_dirs:
        raise FlopwiseError("no run folders given: name at least one, e.g. `flopwise report runs/a runs/b`")
    seen: dict[Path, Path] = {}
    for path in run_dirs:
        seen.setdefault(path.resolve(), path)
    paths = list(seen.values())
    return [load_run(path, name) for path, name in zip(paths, unique_names(paths))]
