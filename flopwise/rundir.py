"""What a run folder holds and how to read it, without building anything.

``runs/<name>/`` holds ``config.toml`` (the resolved config), ``plan.json`` (the model shape, costs and
data summary), ``metrics.jsonl`` (one JSON object per event), ``tokenizer.json``, ``checkpoints/`` and,
once finished, ``final/`` (a Hugging Face folder).  Every file is JSON, TOML or safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig

CONFIG_FILE = "config.toml"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def require_run_dir(run_dir: Path) -> None:
    if not is_run_dir(run_dir):
        raise FlopwiseError(f"'{run_dir}' is not a flopwise run folder (no {CONFIG_FILE}): "
                            "give the --out folder of an earlier `flopwise train`")


def planned_model_config(run_dir: Path) -> ModelConfig:
    """The model shape a run was planned with (``plan.json``), which resume and loading reuse."""
    plan = run_dir / PLAN_FILE
    if not plan.is_file():
        raise FlopwiseError(f"run folder '{run_dir}' has no {PLAN_FILE}: it was never started, so start a new run")
    return ModelConfig.from_dict(json.loads(plan.read_text(encoding="utf-8"))["model"])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete events of a ``metrics.jsonl``; a line cut short by a crash is ignored."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
