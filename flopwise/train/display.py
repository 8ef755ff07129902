"""What the user watches: a live bar on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from flopwise.budget import Budget, Meter, format_amount


def spent_text(meter: Meter, budget: Budget) -> str:
    """Spent / total of the limit that binds first, e.g. ``1.2m / 3.0m``."""
    name, limit = max(budget.set_limits().items(), key=lambda item: getattr(meter, item[0]) / item[1])
    return f"{format_amount(name, getattr(meter, name))} / {format_amount(name, limit)}"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA --"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"ETA {minutes}:{secs:02d}"


class ProgressDisplay:
    """Live progress bar with budget spent, ETA, loss, tokens/s and MFU.

    On a terminal rich draws the bar; otherwise a line is printed every tenth of the budget.
    """

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=False)
        self.live = sys.stdout.isatty() if live is None else live
        self._progress: Progress | None = None
        self._task = None
        self._next_line = 0.0
        self._wall_start = time.perf_counter()

    @classmethod
    def quiet(cls) -> ProgressDisplay:
        """A display that shows nothing (the non-zero ranks of a distributed job)."""
        return cls(Console(quiet=True), live=False)

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                      TextColumn("{task.fields[status]}"), console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=1.0, status="")
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            self._progress.stop()

    def update(self, p: float, meter: Meter, budget: Budget, loss: float, tokens_per_s: float, mfu: float | None,
               eta_seconds: float | None) -> None:
        mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else ""
        status = (f"{spent_text(meter, budget)}  {eta_text(eta_seconds)}  loss {loss:.3f}  "
                  f"{tokens_per_s:,.0f} tok/s  {mfu_text}")
        if self._progress is not None:
            self._progress.update(self._task, completed=min(p, 1.0), status=status)
        elif p >= self._next_line:
            self.console.print(f"step {int(meter.steps):>6}  p={p:5.3f}  {status}", highlight=False, soft_wrap=True)
            self._next_line = (int(p * 10) + 1) / 10

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)
