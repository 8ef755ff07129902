"""From what a user names (``--tasks``, ``train.eval_tasks``) to tasks: a built-in task, ``builtin`` for all of
those that apply to the run's data, a JSONL task file, an lm-eval task YAML, or a folder of either."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flopwise.errors import FlopwiseError
from flopwise.evaluate.tasks.builtin import BUILTIN_TASKS, HeldoutText, build_builtin, builtin_names
from flopwise.evaluate.tasks.lm_eval_yaml import read_lm_eval_folder, read_lm_eval_task
from flopwise.evaluate.tasks.spec import Task, read_task_file
from flopwise.evaluate.tasks.verifiable import VERIFIABLE, build_verifiable

if TYPE_CHECKING:
    from flopwise.config import RunConfig

ALL_BUILTIN = "builtin"
TASK_FILE_SUFFIXES = (".jsonl", ".yaml", ".yml")
DEFAULT_BUILTIN_EXAMPLES = 500  # per built-in task for `flopwise eval --tasks` (a bootstrap interval of about +-0.05)


def check_task_names(specs: Sequence[str], where: str) -> None:
    """Refuse, in one line and before anything is loaded, a name that is neither a built-in task nor a task file."""
    for spec in specs:
        if spec in BUILTIN_TASKS or spec in (ALL_BUILTIN, VERIFIABLE):
            continue
        path = Path(spec)
        if path.suffix in TASK_FILE_SUFFIXES or path.is_dir():
            if not path.exists():
                raise FlopwiseError(f"{where}: task file '{spec}' does not exist: check the path")
            continue
        raise FlopwiseError(f"{where}: unknown task '{spec}': use a built-in task ({', '.join(BUILTIN_TASKS)}), "
                            f"'{ALL_BUILTIN}' for all that apply to the run's data, '{VERIFIABLE}' (the RL tasks), a .jsonl task file, an lm-eval "
                            "task .yaml, or a folder of them")


def check_run_tasks(config: RunConfig, distributed: bool) -> None:
    """A run's train.eval_tasks, refused in one line before any data is read: names that are no task, and tasks
    under FSDP (whose sharded model the main process cannot score alone)."""
    tasks = config.train.eval_tasks
    if tasks and distributed and config.train.parallel == "fsdp":
        raise FlopwiseError("train.eval_tasks cannot be scored during an FSDP run (each process holds a shard of "
                            "the model): train with --parallel ddp, or score the final model with flopwise eval "
                            "--tasks")
    check_task_names(tasks, "train.eval_tasks")


def resolve_tasks(specs: Sequence[str], heldout: Callable[[], HeldoutText], seed: int, limit: int | None,
                  where: str = "--tasks") -> list[Task]:
    """The named tasks, each cut to its first ``limit`` examples (built-in ones are generated that many; with no
    limit, DEFAULT_BUILTIN_EXAMPLES).  ``heldout`` is called only if a built-in task is named."""
    check_task_names(specs, where)
    tasks: list[Task] = []
    text: HeldoutText | None = None
    for spec in specs:
        if spec in BUILTIN_TASKS or spec == ALL_BUILTIN:
            text = text if text is not None else heldout()
            names = builtin_names(text) if spec == ALL_BUILTIN else [spec]
            count = limit if limit is not None else DEFAULT_BUILTIN_EXAMPLES
            tasks += [build_builtin(name, text, seed, count) for name in names]
        elif spec == VERIFIABLE:
            tasks.append(build_verifiable(seed, limit))
        else:
            tasks += [task.head(limit) for task in _read(Path(spec))]
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FlopwiseError(f"{where}: task '{repeated[0]}' is named twice: name each task once")
    return tasks


def _read(path: Path) -> list[Task]:
    """One task file, or every task in a folder: its lm-eval task YAMLs when it has any, searched as lm-eval's
    ``--include_path`` searches (the JSONL beside them is their data), else its JSONL task files (sorted, so
    the order does not depend on the disk)."""
    if path.is_dir():
        if any(p.is_file() for p in path.rglob("*.yaml")):
            return read_lm_eval_folder(path)
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl")
        if not files:
            raise FlopwiseError(f"task folder '{path}' holds no .jsonl or .yaml task: add one, or name a file")
        return [read_task_file(file) for file in files]
    if path.suffix == ".jsonl":
        return [read_task_file(path)]
    return [read_lm_eval_task(path)]
