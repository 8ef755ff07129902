"""``metrics.jsonl``: one JSON object per log event, readable without flopwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flopwise.atomic import write_atomic
from flopwise.rundir import read_metrics


class MetricsLog:
    """Appends events; on resume drops the events of steps the checkpoint does not include."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, event: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only events up to ``step`` (written whole, via a temporary file and a rename)."""
        if not self.path.exists():
            return
        kept = [event for event in read_metrics(self.path) if event.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(event) + "\n" for event in kept))
