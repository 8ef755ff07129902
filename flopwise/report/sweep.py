"""A sweep's part of a report: its trials table, its best configuration, and Optuna's optimization-history
and parameter-importance plots, from the study in the sweep folder.

The plots are Optuna's own (``optuna.visualization.matplotlib``); the importance is Optuna's default (fANOVA),
which needs scikit-learn, and is left out with a note where it cannot be computed (too few finished trials, a
single value drawn) rather than drawn from nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.report.table import MISSING, Table
from flopwise.sweep.folder import BEST_FILE, STUDY_NAME, TRIALS

HISTORY_PLOT, IMPORTANCE_PLOT = "sweep_history", "sweep_importance"


@dataclass(frozen=True)
class Sweep:
    """One sweep folder as its study recorded it."""

    folder: Path
    settings: dict[str, Any]
    study: Any

    @property
    def name(self) -> str:
        return self.folder.name

    def complete(self) -> list[Any]:
        return [t for t in self.study.trials if t.state.name == "COMPLETE"]

    def best(self) -> Any | None:
        return min(self.complete(), key=lambda t: t.value) if self.complete() else None


def load_sweep(folder: Path) -> Sweep:
    """The sweep in ``folder`` (its journal study, or the storage its sweep.json names)."""
    from flopwise.sweep.driver import read_settings, study_storage
    from flopwise.sweep.optuna_dep import require_optuna

    optuna = require_optuna()
    settings = read_settings(folder)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(folder, settings["storage"]))
    except KeyError as err:
        raise FlopwiseError(f"'{folder}' holds no sweep study ({err}): was the sweep started?") from None
    return Sweep(folder, settings, study)


def trials_table(sweep: Sweep) -> Table:
    """One row per trial: its state, the values it ended with, how it ended (final loss, where it was pruned,
    or its error) and what it spent."""
    from flopwise.sweep.driver import plan_of
    from flopwise.sweep.trial import outcome, spent_by, trial_folder, trial_values

    unit = plan_of(sweep.settings).unit
    names = sorted({name for t in sweep.study.trials for name in trial_values(t)})
    rows = []
    for t in sweep.study.trials:
        values = trial_values(t)
        spent = spent_by(trial_folder(sweep.folder / TRIALS, t.number), unit)
        rows.append([str(t.number), t.state.name.lower(), *[_shown(values.get(name)) for name in names],
                     outcome(t), f"{spent:,.4g}"])
    return Table(["trial", "state", *names, "outcome", f"spent ({unit})"],
                 [True, False, *[True] * len(names), False, True], rows)


def best_line(sweep: Sweep) -> str:
    best = sweep.best()
    if best is None:
        return f"sweep {sweep.name}: no trial finished yet"
    return (f"sweep {sweep.name}: best trial {best.number}, held-out loss {best.value:.4f}; rerun it with "
            f"flopwise train --config {sweep.folder / BEST_FILE}")


def sweep_figures(sweep: Sweep) -> tuple[dict[str, Any], list[str]]:
    """Optuna's optimization history and parameter importances as matplotlib figures, named per sweep, and
    the notes on any plot that could not be drawn."""
    import optuna

    figures, notes = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = optuna.visualization.matplotlib.plot_optimization_history(sweep.study)
        history.set_ylabel("final held-out loss")
        figures[f"{HISTORY_PLOT}_{sweep.name}"] = _figure(history, f"sweep {sweep.name}: optimization history")
        try:
            importance = optuna.visualization.matplotlib.plot_param_importances(sweep.study)
            figures[f"{IMPORTANCE_PLOT}_{sweep.name}"] = _figure(importance, f"sweep {sweep.name}: parameter "
                                                                             "importances (fANOVA)")
        except (ImportError, RuntimeError, ValueError) as err:
            notes.append(f"{sweep.name}: no parameter importance ({str(err).splitlines()[0]})")
    return figures, notes


def _figure(axes: Any, title: str) -> Any:
    for side in ("left", "right"):  # Optuna titles some plots on the left: one title, ours
        axes.set_title("", loc=side)
    axes.set_title(title)
    figure = axes.figure
    figure.set_size_inches(7, 4)
    figure.tight_layout()
    return figure


def sweep_json(sweep: Sweep) -> dict[str, Any]:
    """report.json's entry for a sweep: its settings, every trial and the best."""
    from flopwise.sweep.trial import trial_values

    best = sweep.best()
    return {"folder": str(sweep.folder), "strategy": sweep.settings["strategy"], "budget": sweep.settings["budget"],
            "best": None if best is None else {"trial": best.number, "loss": best.value},
            "trials": [{"number": t.number, "state": t.state.name.lower(), "values": trial_values(t),
                        "value": t.value, "error": t.user_attrs.get("error")} for t in sweep.study.trials]}


def _shown(value: object) -> str:
    if value is None:
        return MISSING
    return f"{value:.4g}" if isinstance(value, float) else str(value)
