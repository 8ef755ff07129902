"""Kill harness: ``kill -9`` a real ``flopwise train`` at random moments, resume it, and check that every
resumed run ends with weights byte-identical to the uninterrupted run's.

The moments are of four kinds, mixed in one shuffled schedule, each found by watching the run folder
(so they land where they are meant to on a fast machine or a busy one):
- ``startup``: before the run files exist (a uniform time within the uninterrupted run's start-up);
- ``early``: once ``config.toml`` is written, before the first checkpoint;
- ``checkpoint``: the instant the k-th checkpoint's temporary folder appears (k random), i.e. inside a
  checkpoint write;
- ``training``: once step k (random) is logged, after a random part of a step.

After each kill the harness records where it landed, then continues the run the way a user would:
``flopwise train --resume`` if the folder holds a run, else the original command again.  Prints a table
and writes bench/results/kill_resume.json.

    python bench/kill_resume.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
RUN = ["--tokenizer", "byte", "--set", "model.size=tiny", "--set", "model.seq_len=64", "--set", "optim.batch_size=8",
       "--set", "train.eval_tokens=2048", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0.1",
       "--set", "train.eval_every=0.25"]
KINDS = ("startup", "early", "checkpoint", "training")
POLL = 0.0005  # seconds between looks at the run folder


def corpus(folder: Path) -> Path:
    """About 200 KB of prose (Python's help topics), the same every time."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    for index in range(40):
        (folder / f"doc{index:02d}.txt").write_text("\n\n".join(topics[index::40])[:5000], encoding="utf-8")
    return folder


def command(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "flopwise", "train", *RUN, "--data", str(data), "--budget", f"{steps}steps",
            "--out", str(out)]


def run_to_end(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])} exited {result.returncode}: {result.stderr.strip()[-400:]}")


def timed_reference(args: list[str], out: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Run the uninterrupted reference; returns when its config.toml and its first checkpoint appeared, and
    its whole wall clock (seconds from the start)."""
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    created = first = None
    while process.poll() is None:
        now = time.perf_counter() - start
        if created is None and (out / "config.toml").is_file():
            created = now
        if first is None and (out / "checkpoints").is_dir() and list((out / "checkpoints").glob("step_*")):
            first = now
        time.sleep(0.001)
    if process.returncode != 0 or created is None or first is None:
        raise SystemExit(f"the reference run failed: {process.stderr.read().strip()[-400:]}")
    return created, first, time.perf_counter() - start


def checkpoint_writes(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return list(folder.glob(".tmp-*")) if folder.is_dir() else []


def kill_at(kind: str, args: list[str], out: Path, env: dict[str, str], rng: random.Random,
            times: tuple[float, float, float], steps: int, checkpoints: int) -> float:
    """Start the run, kill -9 it at a moment of ``kind`` (``times``: when the reference wrote its run files
    and its first checkpoint, and its end); returns the seconds it ran."""
    created, first, wall = times
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "startup":
        deadline = start + rng.uniform(0.0, created)
        wait_until(process, lambda: time.perf_counter() > deadline)
    elif kind == "early":
        wait_until(process, lambda: (out / "config.toml").is_file())
        time.sleep(rng.uniform(0.0, 0.5 * (first - created)))
    elif kind == "checkpoint":
        target, seen, inside = rng.randint(1, checkpoints), 0, False

        def kth_write() -> bool:
            nonlocal seen, inside
            writing = bool(checkpoint_writes(out))
            seen += writing and not inside
            inside = writing
            return seen == target
        wait_until(process, kth_write)
    else:
        step = rng.randint(1, steps - 1)
        wait_until(process, lambda: logged_step(out) >= step)
        time.sleep(rng.uniform(0.0, (wall - first) / steps))  # within about one step
    process.send_signal(signal.SIGKILL)
    process.wait()
    return time.perf_counter() - start


def wait_until(process: subprocess.Popen, condition: Callable[[], bool]) -> None:
    while process.poll() is None and not condition():
        time.sleep(POLL)


def logged_step(out: Path) -> int:
    """The last step metrics.jsonl has logged (the run logs every step), 0 before the first."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()[-3:]
             if line.endswith("}") and '"event": "train"' in line]
    return max(steps, default=0)


def landed(out: Path) -> str:
    """Where the kill left the folder."""
    if not out.exists():
        return "no folder"
    if not (out / "config.toml").is_file():
        return "folder without a run"
    if (out / "final").is_dir():
        return "finished"
    if checkpoint_writes(out):
        return "inside a checkpoint write"
    if not list((out / "checkpoints").glob("step_*")):
        return "before the first checkpoint"
    return "between checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "kill_resume.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="flopwise-kill-"))
    env = dict(os.environ, FLOPWISE_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    data = corpus(work / "data")
    reference = work / "reference"
    times = timed_reference(command(data, reference, args.steps), reference, env)
    wall = times[2]
    expected = (reference / "final" / "model.safetensors").read_bytes()
    checkpoints = 10  # train.checkpoint_every=0.1
    kinds = [KINDS[index % len(KINDS)] for index in range(args.kills)]
    rng.shuffle(kinds)
    rows = []
    for index, kind in enumerate(kinds):
        out = work / f"kill{index:02d}"
        args_new = command(data, out, args.steps)
        seconds = kill_at(kind, args_new, out, env, rng, times, args.steps, checkpoints)
        where = landed(out)
        if where != "finished":
            run_to_end([sys.executable, "-m", "flopwise", "train", "--resume", str(out)]
                       if (out / "config.toml").is_file() else args_new, env)
        same = (out / "final" / "model.safetensors").read_bytes() == expected
        rows.append({"kill": index, "kind": kind, "after_seconds": round(seconds, 3), "landed": where,
                     "identical_weights": same})
        shutil.rmtree(out, ignore_errors=True)
    table = Table(title=f"kill -9 and resume: {sum(r['identical_weights'] for r in rows)} of {len(rows)} identical "
                        f"(uninterrupted run: {args.steps} steps, {wall:.1f} s wall)")
    for column in ("kill", "kind", "after s", "landed", "identical weights"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["kill"]), row["kind"], f"{row['after_seconds']:.2f}", row["landed"],
                      "yes" if row["identical_weights"] else "NO")
    Console().print(table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"steps": args.steps, "seed": args.seed, "reference_wall_seconds": wall,
                                        "identical": sum(r["identical_weights"] for r in rows), "kills": rows},
                                       indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
