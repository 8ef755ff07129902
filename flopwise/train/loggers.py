"""Optional TensorBoard and Weights & Biases logging beside ``metrics.jsonl``.

``metrics.jsonl`` stays the record of a run; the sinks are views of it for people who already
watch their runs in TensorBoard or W&B.  Both packages are optional and imported only when
``train.log`` asks for them, so a plain run neither needs nor loads them.
"""

from __future__ import annotations

import importlib
import json
import secrets
import string
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol

from flopwise.atomic import write_json_atomic
from flopwise.errors import FlopwiseError
from flopwise.train.metrics import MetricsLog

WANDB_ID_FILE = "wandb.json"
# what a DPO evaluation adds to the eval event (dpo_fields in flopwise/stages/posttrain.py)
EVAL_EXTRAS = ("reward_accuracy", "reward_margin", "preference_accuracy",  # dpo
               "pass_greedy", "pass_sampled", "reward_greedy", "reward_sampled", "rollout_seconds")  # rl
# backend -> (module imported for it, package to pip install)
_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def scalars(event: dict[str, Any]) -> dict[str, float]:
    """The values both sinks log for one event, under the same keys in both."""
    if event.get("event") == "train":
        values = {"train/loss": event["loss"], "train/lr": event["lr"], "train/throughput": event["throughput"],
                  "train/mfu": event.get("mfu"), "train/memory": event.get("memory")}
    elif event.get("event") == "eval":
        values = {"eval/loss": event.get("val_loss"), "eval/bpb": event.get("val_bpb")}
        values.update({f"eval/loss/{name}": loss for name, loss in event.get("domains", {}).items()})
        values.update({f"eval/{key}": event[key] for key in EVAL_EXTRAS if key in event})
    elif event.get("event") == "tasks":
        values = {f"tasks/{name}/{key}": result[key] for name, result in event["tasks"].items()
                  for key in ("centered", "acc", "acc_norm", "acc_bytes", "exact_match") if key in result}
    else:
        return {}
    return {key: float(value) for key, value in values.items() if value is not None}


def _require(backend: str) -> ModuleType:
    """Import a backend's package, or say in one line how to install it."""
    module, package = _PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise FlopwiseError(f"--log {backend} needs the '{package}' package: pip install 'flopwise[{backend}]' "
                            f"(or pip install {package})") from error


def require_backends(backends: list[str]) -> None:
    """Fail before a run writes anything when a backend's package is missing."""
    for backend in dict.fromkeys(backends):
        _require(backend)


class Sink(Protocol):
    def log(self, event: dict[str, Any]) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


class TensorBoardSink:
    """Scalars against the step in ``tensorboard/``, and the losses against tokens in ``tensorboard/tokens/``
    (the x axis for comparing runs of different batch sizes; a run of its own, since a purge is by x value).

    A resumed run purges the events after its checkpoint (TensorBoard drops steps >= ``purge_step``),
    as ``metrics.jsonl`` is truncated, instead of drawing a second line over them.
    """

    TOKEN_TAGS = ("train/loss", "eval/loss", "eval/bpb")

    def __init__(self, module: ModuleType, log_dir: Path, resume_step: int | None) -> None:
        self._writer_class = module.SummaryWriter
        self._log_dir = log_dir
        self._resume_step = resume_step
        purge = None if resume_step is None else resume_step + 1
        self._by_step = self._writer_class(log_dir=str(log_dir), purge_step=purge, flush_secs=10)
        self._by_tokens: Any = None  # opened at the first event, which tells where to purge in tokens

    def log(self, event: dict[str, Any]) -> None:
        values = scalars(event)
        step = int(event["step"])
        for tag, value in values.items():
            self._by_step.add_scalar(tag, value, step)
        if self._by_tokens is None:
            purge = None
            if self._resume_step is not None and step > 0:  # tokens grow by the same amount every step
                purge = round(self._resume_step * event["tokens"] / step) + 1
            self._by_tokens = self._writer_class(log_dir=str(self._log_dir / "tokens"), purge_step=purge,
                                                 flush_secs=10)
        for tag in self.TOKEN_TAGS:
            if tag in values:
                self._by_tokens.add_scalar(f"{tag}_vs_tokens", values[tag], round(event["tokens"]))

    def close(self, exit_code: int = 0) -> None:
        for writer in (self._by_step, self._by_tokens):
            if writer is not None:
                writer.close()


class WandbSink:
    """One W&B run per flopwise run: its id is kept in ``wandb.json`` so that ``--resume`` continues it.

    W&B history only grows, so events at steps the W&B run already has are skipped (W&B would drop
    them with a warning each).  A resume re-runs those steps bit for bit; an extension from before the
    decay keeps W&B's old points for the steps it re-runs.  Offline: ``WANDB_MODE=offline``.
    """

    def __init__(self, module: ModuleType, run_dir: Path, config: dict[str, Any], project: str) -> None:
        try:
            self.run = module.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                                   id=wandb_run_id(run_dir), resume="allow", allow_val_change=True)
        except module.Error as error:  # no API key, no network, a bad project name: the user's to fix
            reason = " ".join(str(error).split())
            raise FlopwiseError(f"--log wandb could not start a W&B run: {reason} "
                                f"(WANDB_MODE=offline logs without an account or network)") from error
        self._first_step = int(self.run.starting_step)

    def log(self, event: dict[str, Any]) -> None:
        values: dict[str, float] = scalars(event)
        if not values or event["step"] < self._first_step:
            return
        # Candidate x axes, selectable in the W&B UI.
        values.update({"progress/tokens": event["tokens"], "progress/flops": event["flops"], "progress/p": event["p"]})
        self.run.log(values, step=int(event["step"]))

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, made (8 lower-case letters and digits, like W&B's own) and saved on first use."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return str(json.loads(path.read_text(encoding="utf-8"))["id"])
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_json_atomic(path, {"id": run_id})
    return run_id


class RunLogger:
    """What the trainer logs through: always ``metrics.jsonl``, then each optional sink."""

    def __init__(self, metrics: MetricsLog, sinks: list[Sink]) -> None:
        self.metrics = metrics
        self.sinks = sinks

    def append(self, event: dict[str, Any]) -> None:
        self.metrics.append(event)
        for sink in self.sinks:
            sink.log(event)

    def close(self, exit_code: int = 0) -> None:
        """Flush and finish the sinks; a non-zero ``exit_code`` marks the W&B run failed."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(exit_code)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(0 if kind is None else 1)


def open_run_logger(run_dir: Path, backends: list[str], config: dict[str, Any], resume_step: int | None,
                    wandb_project: str) -> RunLogger:
    """``resume_step``: the checkpoint step a resumed run starts from (None for a new run).

    Every backend's package is imported before any sink opens, so a missing one fails before
    anything is written.
    """
    unknown = sorted(set(backends) - set(_PACKAGES))
    if unknown:
        raise FlopwiseError(f"unknown --log backend {', '.join(unknown)}: use {' or '.join(_PACKAGES)}")
    modules = {backend: _require(backend) for backend in dict.fromkeys(backends)}
    sinks: list[Sink] = []
    try:
        for backend, module in modules.items():
            if backend == "tensorboard":
                sinks.append(TensorBoardSink(module, run_dir / "tensorboard", resume_step))
            else:
                sinks.append(WandbSink(module, run_dir, config, wandb_project))
    except BaseException:
        for sink in sinks:
            sink.close(1)
        raise
    return RunLogger(MetricsLog(run_dir / "metrics.jsonl"), sinks)
