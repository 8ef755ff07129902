"""The comparison table's columns and formatted cells, shared by the terminal and the HTML page.

One definition for both, so the table a user sees in the terminal is the table in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flopwise.report.runs import Run

MISSING = "—"


@dataclass(frozen=True)
class Table:
    """Header and one row of cells per run, in run order; ``numeric`` marks right-aligned columns."""

    headers: list[str]
    numeric: list[bool]
    rows: list[list[str]]


def _number(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return format(value, spec)


def _si(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M': token and throughput counts at a glance."""
    if value is None or not math.isfinite(value):
        return MISSING
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _percent(fraction: float | None) -> str:
    return MISSING if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.1f}%"


def domain_names(runs: list[Run]) -> list[str]:
    """Every domain any run was evaluated on, in order of first appearance."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.final.domains))
    return list(names)


def status(run: Run) -> str:
    return "finished" if run.finished else f"unfinished, p={run.final.p:.2f}"


def final_table(runs: list[Run]) -> Table:
    """Run, status, size, spend, speed and final held-out figures (loss in nats/token, bits per byte)."""
    domains = domain_names(runs)
    headers = ["run", "status", "params", "peak lr", "steps", "tokens", "FLOPs", "train s", "tok/s", "MFU",
               "held-out loss", "bits/byte", *[f"{name} loss" for name in domains]]
    numeric = [False, False] + [True] * (len(headers) - 2)
    rows = []
    for run in runs:
        f = run.final
        rows.append([run.name, status(run), _si(f.parameters), _number(f.peak_lr, ".2g"),
                     _number(f.steps, ","), _si(f.tokens), _number(f.flops, ".3g"), _number(f.seconds, ".1f"),
                     _si(f.throughput), _percent(f.mfu),
                     _number(f.loss, ".4f"), _number(f.bpb, ".4f"),
                     *[_number(f.domains.get(name), ".4f") for name in domains]])
    return Table(headers, numeric, rows)
