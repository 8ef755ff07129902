"""Which rung signal ranks trials more truly: at each evaluation mark, the rank correlation (Spearman) across
the finished trials of a sweep between the signal there and the trials' final held-out losses.

The two signals are those a trial can report: its held-out loss at the mark (not annealed under WSD, so it
favours whatever is fast early), and the forecast of its final loss made from its curve so far (the newest
``forecast`` event at or before the mark).  Read from the trials' own metrics, so any finished sweep (random
search, without pruning, ranks every trial to its end) can be measured after the fact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from flopwise.rundir import METRICS_FILE, read_metrics

MIN_TRIALS = 3  # a rank correlation over fewer trials says nothing


def trial_signals(run_dir: Path) -> tuple[float, list[dict[str, Any]]] | None:
    """(final held-out loss, [{"p", "loss", "forecast"} per evaluation mark before the end]) of a finished
    trial run; None for one that did not finish."""
    if not (run_dir / "final").is_dir():
        return None
    events = read_metrics(run_dir / METRICS_FILE)
    evals = [e for e in events if e["event"] == "eval"]
    forecasts = [e for e in events if e["event"] == "forecast"]
    marks = []
    for e in evals[:-1]:
        made = [f["predicted_loss"] for f in forecasts if f["p"] <= e["p"] + 1e-9]
        marks.append({"p": round(e["p"], 3), "loss": e["val_loss"], "forecast": made[-1] if made else None})
    return evals[-1]["val_loss"], marks


def rank_agreement(trials_dir: Path) -> list[dict[str, Any]]:
    """Per evaluation mark: the Spearman correlation with the final losses of the held-out loss there, over
    every finished trial (``trials``, ``loss_rho``), and over those that had a forecast by then, of the
    forecast and of the held-out loss on the same trials (``forecast_trials``, ``forecast_rho``,
    ``loss_rho_same``: a like-for-like pair; None under MIN_TRIALS or where a side is constant).  The forecaster needs some curve before
    it forecasts, so early marks have few forecasts or none: a trial reports nothing to the pruner there.
    Marks are matched by their order (the k-th evaluation of every trial is at the same multiple of
    ``train.eval_every``; under a seconds budget the p at which each trial crossed it differs a little, and
    the row gives their mean)."""
    finished = [found for found in (trial_signals(path) for path in sorted(trials_dir.iterdir()) if path.is_dir())
                if found is not None]
    by_mark: dict[int, list[tuple[float, float, float | None, float]]] = {}
    for final, marks in finished:
        for index, mark in enumerate(marks):
            by_mark.setdefault(index, []).append((mark["p"], mark["loss"], mark["forecast"], final))
    rows = []
    for index, at_mark in sorted(by_mark.items()):
        if len(at_mark) < MIN_TRIALS:
            continue
        ps, losses, _, finals = zip(*at_mark)
        forecast = [(loss, made, final) for _, loss, made, final in at_mark if made is not None]
        row = {"p": round(sum(ps) / len(ps), 3), "trials": len(at_mark), "loss_rho": _rho(losses, finals),
               "forecast_trials": len(forecast), "forecast_rho": None, "loss_rho_same": None}
        if len(forecast) >= MIN_TRIALS:
            same_losses, made, same_finals = zip(*forecast)
            row.update(forecast_rho=_rho(made, same_finals), loss_rho_same=_rho(same_losses, same_finals))
        rows.append(row)
    return rows


def _rho(signal: tuple[float, ...], finals: tuple[float, ...]) -> float | None:
    """Spearman's rho, None where one side is constant (no ranking to compare)."""
    if len(set(signal)) < 2 or len(set(finals)) < 2:
        return None
    return float(spearmanr(signal, finals).statistic)
