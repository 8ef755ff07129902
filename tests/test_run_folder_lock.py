"""A run takes its folder's lock first, before torch and the data: a second run on a held --out is refused at
once, in one line naming the holder.  A new run starts only in a folder that holds no run and no other files
(what a run killed before it began left excepted), unless --overwrite deletes the run files there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flopwise.rundir import LOCK_FILE, read_metrics, writing
from tests.helpers import TINY, run_error, train

ROOT = Path(__file__).parents[1]
# what a refusal must not have imported or run: torch, numpy, the config's pydantic, the data, the session
HEAVY = ("torch", "numpy", "scipy", "pydantic", "flopwise.data.pipeline", "flopwise.session")
# `python -m flopwise`, then what of HEAVY it imported, on stdout
PROBE = f"""
import sys
from flopwise.cli import main
code = main(sys.argv[1:])
print("imported:", *[name for name in {HEAVY!r} if name in sys.modules])
sys.exit(code)
"""


def flopwise_env(cache: Path) -> dict[str, str]:
    """This checkout's flopwise, with its own (cold) data cache."""
    return dict(os.environ, PYTHONPATH=str(ROOT), FLOPWISE_CACHE=str(cache))


def in_use_line(folder: Path, holder: str) -> str:
    return (f"flopwise: error: run folder '{folder}' is in use by {holder}: wait for it to end, or choose "
            "another --out")


@pytest.mark.parametrize("command", [
    ["train", "--data", "{text}", "--budget", "3steps", *TINY, "--out", "{held}"],
    ["train", "--resume", "{held}"],
    ["train", "--data", "{text}", "--budget", "3steps", *TINY, "--out", "{held}", "--overwrite"],
    ["sft", "--init-from", "{text}", "--budget", "3steps", "--out", "{held}"],
    ["dpo", "--init-from", "{text}", "--budget", "3steps", "--out", "{held}"],
    ["sft", "--resume", "{held}"],
], ids=["train", "train-resume", "train-overwrite", "sft", "dpo", "sft-resume"])
def test_a_held_folder_is_refused_before_anything_heavy_is_imported(command, tmp_path, text_folder):
    """Refused before torch, numpy and the data are touched: so within about a second of the command, on any
    machine (no clock in this test), with the cache as cold as it was and the folder as it was (--overwrite
    deletes nothing under a run that is writing it)."""
    held, cache = tmp_path / "held", tmp_path / "cache"
    held.mkdir()
    (held / "config.toml").write_text("")  # a run, as far as --resume can tell before it reads anything
    argv = [arg.replace("{held}", str(held)).replace("{text}", str(text_folder)) for arg in command]
    with writing(held, new=False):  # another process writing it, as far as the lock can tell
        holder = (held / LOCK_FILE).read_text()
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=flopwise_env(cache), capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [in_use_line(held, holder)]
    assert done.stdout.split() == ["imported:"]
    assert not cache.exists() and (held / "config.toml").is_file()


def finished_corpora(cache: Path) -> list[Path]:
    """Corpus entries tokenized into the cache (the temporary folder of one being written is not one)."""
    return [entry for entry in (cache / "corpus").glob("*") if not entry.name.startswith(".")]


@pytest.mark.slow  # the first run trains to its end
def test_the_first_of_two_runs_wins_and_the_second_is_refused_before_the_first_has_tokenized(tmp_path, text_folder):
    """Two runs on one --out started 0.3 s apart, on a cold cache: the first holds the folder (waited for, where it
    takes longer than 0.3 s, so that the winner is not a matter of the machine's load), and the second is refused
    naming it while the first has not yet tokenized its data; the first then runs to its end."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = [sys.executable, "-m", "flopwise", "train", "--data", str(text_folder), "--budget", "3steps", *TINY,
            "--out", str(out)]
    with (tmp_path / "first.err").open("w") as first_err:
        started = time.monotonic()
        first = subprocess.Popen(args, env=flopwise_env(cache), stdout=subprocess.DEVNULL, stderr=first_err)
        holder = ""
        while not (holder.startswith(f"process {first.pid} on ") and holder.endswith(")")):  # the whole line
            assert first.poll() is None and time.monotonic() - started < 120, (tmp_path / "first.err").read_text()
            time.sleep(0.01)
            holder = (out / LOCK_FILE).read_text() if (out / LOCK_FILE).is_file() else ""
        time.sleep(max(0.0, started + 0.3 - time.monotonic()))
        second = subprocess.run(args, env=flopwise_env(cache), capture_output=True, text=True, timeout=120)
        tokenized = finished_corpora(cache)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()
    assert second.returncode == 2
    assert second.stderr.splitlines() == [in_use_line(out, holder)]
    assert tokenized == []
    assert (out / "final").is_dir() and finished_corpora(cache)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``, with each file's text."""
    return {str(path.relative_to(folder)): path.read_text() if path.is_file() else "folder"
            for path in sorted(folder.rglob("*"))}


def lay_out(folder: Path, files: dict[str, str]) -> None:
    """Files (a name ending in / is an empty folder) under ``folder``."""
    for name, text in files.items():
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


STALE_TRAIN_EVENT = '{"event": "train", "step": 7, "loss": 9.0}\n'
# a folder that is no run (no config.toml) but holds files, and how the refusal names them
NOT_RUNS = {
    "the probe's": ({"final/notes.txt": "mine\n", "checkpoints/step_00000050/": ""}, "checkpoints/, final/"),
    "old metrics": ({"metrics.jsonl": STALE_TRAIN_EVENT}, "metrics.jsonl"),
    "a run without its config.toml": ({"plan.json": "{}", "tokenizer.json": "{}", "metrics.jsonl": STALE_TRAIN_EVENT,
                                       "checkpoints/step_00000050/state.json": "{}", "final/model.safetensors": ""},
                                      "checkpoints/, final/, metrics.jsonl"),
    "someone's files": ({"a.txt": "a", "b.txt": "b", "c.txt": "c", "d/e.txt": "e"}, "a.txt, b.txt, c.txt and 1 more"),
}


@pytest.mark.parametrize("command", [["train", "--data", "{text}", "--budget", "3steps", *TINY],
                                     ["sft", "--init-from", "{text}", "--budget", "3steps"]], ids=["train", "sft"])
@pytest.mark.parametrize("kind", NOT_RUNS)
def test_a_new_run_refuses_a_folder_that_holds_other_files_and_leaves_it_as_it_was(kind, command, tmp_path,
                                                                                   text_folder, capsys):
    files, named = NOT_RUNS[kind]
    out = tmp_path / "out"
    lay_out(out, files)
    before = snapshot(out)
    argv = [arg.replace("{text}", str(text_folder)) for arg in command]
    assert run_error(capsys, [*argv, "--out", str(out)]) == (
        f"flopwise: error: '{out}' is not empty ({named}) and holds no run (no config.toml): choose another --out, "
        "or add --overwrite to start the run there (the run files in it are deleted first)")
    assert snapshot(out) == before  # not even a lock file


def test_what_a_run_killed_before_it_began_left_is_no_obstacle(tmp_path):
    """kill -9 between the first run file and config.toml leaves the lock file, tokenizer.json, plan.json and a
    temporary file: that run's, which the next new run replaces."""
    out = tmp_path / "out"
    lay_out(out, {".lock": "", "tokenizer.json": "{}", "plan.json": "{}", ".config.toml.123.tmp": ""})
    with writing(out, new=True):
        assert (out / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")


def train_steps(run: Path) -> list[int]:
    return [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]


@pytest.mark.slow  # two real runs
def test_overwrite_deletes_the_run_files_and_keeps_the_rest(tmp_path, text_folder, capsys):
    out = tmp_path / "out"
    files, _ = NOT_RUNS["a run without its config.toml"]
    lay_out(out, {**files, "eval.json": "{}", "notes.txt": "mine\n"})
    run = ["--data", str(text_folder), "--budget", "3steps", *TINY, "--out", str(out)]
    assert train(*run, "--overwrite") == 0
    assert train_steps(out) == [1, 2, 3]  # the stale step 7 is gone with the old metrics.jsonl
    assert not (out / "eval.json").exists() and not (out / "checkpoints" / "step_00000050").exists()
    assert (out / "notes.txt").read_text() == "mine\n"  # not a run file
    capsys.readouterr()
    assert run_error(capsys, ["train", *run]) == (
        f"flopwise: error: '{out}' already holds a run: resume it with --resume {out}, replace it with --overwrite, "
        "or choose another --out")
    assert train(*run, "--overwrite") == 0  # a finished run, replaced
    assert train_steps(out) == [1, 2, 3]


@pytest.mark.parametrize("command", ["train", "sft", "dpo"])
def test_overwrite_cannot_go_with_resume(command, tmp_path, capsys):
    applies = "--budget and --stop-after apply" if command == "train" else "--stop-after applies"
    assert run_error(capsys, [command, "--resume", str(tmp_path), "--overwrite"]) == (
        f"flopwise: error: --overwrite cannot change when resuming: a resumed run keeps its config (only {applies})")
