"""What a run folder guarantees when things go wrong: it comes into being whole, checkpoints are verified and
fallen back from, one process writes it, a non-finite loss or a full disk stops the run in one line, and an
interrupt anywhere keeps what can be kept."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from flopwise.rundir import LOCK_FILE, writing
from flopwise.train import checkpoint as checkpoint_module
from flopwise.train.checkpoint import list_checkpoints, reading_checkpoints, verify_checkpoint
from tests.helpers import TINY, losses, one_error_line, train

pytestmark = pytest.mark.slow  # real (tiny) training runs

RUN = [*TINY, "--budget", "40steps", "--set", "train.checkpoint_every=0.25"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_folder) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 0
    return run


def stopped_run(tmp_path: Path, text_folder: Path, steps: int = 30) -> Path:
    run = tmp_path / "run"
    assert train(*RUN, "--data", str(text_folder), "--stop-after", f"{steps}steps", "--out", str(run)) == 0
    return run


def newest_checkpoint(run: Path) -> Path:
    return list_checkpoints(run / "checkpoints")[-1].path


def test_an_interrupt_before_the_run_files_leaves_no_run(tmp_path, text_folder, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("flopwise.session.config_to_toml", interrupt)  # the last run file written
    run = tmp_path / "run"
    assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 130
    assert one_error_line(capsys) == "flopwise: interrupted"
    assert not run.exists()  # the folder this run created is gone: a new run may use the name


def test_a_run_interrupted_before_its_first_checkpoint_resumes_from_step_0(tmp_path, text_folder, reference,
                                                                          monkeypatch, capsys):
    from flopwise.train.trainer import Trainer

    def interrupt(self, state):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run", interrupt)
        assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 130
    assert (run / "config.toml").is_file() and not list_checkpoints(run / "checkpoints")
    assert train("--resume", str(run)) == 0
    assert "has no checkpoint yet: starting it again from step 0" in capsys.readouterr().out
    assert losses(run) == losses(reference)
    assert (run / "final/model.safetensors").read_bytes() == (reference / "final/model.safetensors").read_bytes()


@pytest.mark.parametrize("damage, problem", [
    ("flip", "model.safetensors does not match its checksum"),
    ("truncate", "optimizer.safetensors is truncated"),
    ("state", "state.json is unreadable"),
    ("unverified", "no manifest.json, so it cannot be verified"),  # and its optimizer state truncated, unseen
])
def test_a_corrupt_latest_checkpoint_is_named_and_resume_falls_back(damage, problem, tmp_path, text_folder,
                                                                    reference, capsys):
    run = stopped_run(tmp_path, text_folder)
    latest = newest_checkpoint(run)
    if damage == "flip":
        data = bytearray((latest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (latest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate":
        data = (latest / "optimizer.safetensors").read_bytes()
        (latest / "optimizer.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "state":
        (latest / "state.json").write_text('{"step": 30, "loop"')
    else:
        (latest / "manifest.json").unlink()
        data = (latest / "optimizer.safetensors").read_bytes()
        (latest / "optimizer.safetensors").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert train("--resume", str(run)) == 0
    out = capsys.readouterr().out
    assert f"checkpoint '{latest}' is corrupt ({problem}" in out and "skipping it" in out
    assert losses(run) == losses(reference)  # resumed from the older checkpoint, exactly
    assert (run / "final/model.safetensors").read_bytes() == (reference / "final/model.safetensors").read_bytes()


def test_resume_past_a_damaged_line_of_metrics_jsonl_drops_it_saying_so(tmp_path, text_folder, reference, capsys):
    run = stopped_run(tmp_path, text_folder)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([*lines[:2], b"\xff\xfe not an event\n", *lines[2:]]))
    capsys.readouterr()
    assert train("--resume", str(run)) == 0
    err = capsys.readouterr().err
    assert f"flopwise: warning: '{metrics}' line 3: not a JSON event in UTF-8 (the file is damaged): skipped" in err
    assert losses(run) == losses(reference)
    assert b"\xff" not in metrics.read_bytes()  # rewritten whole on resume, without it


def test_readers_skip_a_corrupt_checkpoint_and_no_intact_one_is_one_line(tmp_path, text_folder, capsys):
    from flopwise.cli import main

    run = stopped_run(tmp_path, text_folder)
    checkpoints = list_checkpoints(run / "checkpoints")
    assert len(checkpoints) >= 2 and all(verify_checkpoint(info.path) is None for info in checkpoints)
    (checkpoints[-1].path / "model.safetensors").write_bytes(b"not a tensor file")
    capsys.readouterr()
    assert main(["sample", str(run), "--checkpoint", "--max-tokens", "4"]) == 0
    assert "is corrupt (model.safetensors is truncated" in capsys.readouterr().err
    for info in checkpoints:
        (info.path / "state.json").write_text("")
    assert main(["eval", str(run), "--checkpoint"]) == 2
    assert (f"run folder '{run}' has no intact checkpoint (all {len(checkpoints)} are corrupt, the newest: state.json "
            "is unreadable): start a new run") in one_error_line(capsys)


def test_a_new_checkpoint_not_on_disk_as_written_stops_the_run_and_keeps_the_older_ones(tmp_path, text_folder,
                                                                                        monkeypatch, capsys):
    run = stopped_run(tmp_path, text_folder, steps=12)
    before = [info.path for info in list_checkpoints(run / "checkpoints")]
    real_verify = checkpoint_module.verify_checkpoint
    monkeypatch.setattr(checkpoint_module, "verify_checkpoint",  # the new checkpoint reads back wrong
                        lambda path, **how: real_verify(path, **how) if path in before
                        else "model.safetensors is truncated")
    capsys.readouterr()
    assert train("--resume", str(run)) == 2
    assert "is not on disk as written (model.safetensors is truncated)" in one_error_line(capsys)
    assert all(path.is_dir() for path in before)  # nothing pruned before the new one verified


def test_a_full_disk_is_one_line_and_leaves_no_temporary_checkpoint(tmp_path, text_folder, monkeypatch, capsys):
    real_save = checkpoint_module.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    run = tmp_path / "run"
    assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 2
    line = one_error_line(capsys)
    assert "optimizer.safetensors': no space left on device: free some space" in line
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint was removed
    monkeypatch.undo()
    assert train("--resume", str(run)) == 0  # and the run is not stuck: it starts again from step 0


def test_a_non_finite_loss_stops_the_run_at_that_step_without_checkpointing_it(tmp_path, text_folder, monkeypatch,
                                                                               capsys):
    from flopwise.train import trainer

    real_step = trainer.train_step

    def diverging(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        return float("nan") if args[2].step >= 14 else loss  # methods.step: the 15th step diverges

    monkeypatch.setattr(trainer, "train_step", diverging)
    run = tmp_path / "run"
    assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 2
    line = one_error_line(capsys)
    assert "the training loss became nan at step 15: stopped, and no checkpoint holds that step" in line
    assert max(info.step for info in list_checkpoints(run / "checkpoints")) == 10  # p = 0.25, before it
    assert all(event["loss"] == event["loss"] for event in
               map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in event)


def test_an_interrupt_in_the_final_save_keeps_the_steps_and_resume_writes_the_final_model(
        tmp_path, text_folder, reference, monkeypatch, capsys):
    from flopwise.session import Session

    def interrupt(self):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Session, "save_final", interrupt)
        assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 130
    assert "writes the final model" in capsys.readouterr().out
    assert list_checkpoints(run / "checkpoints")[-1].step == 40 and not (run / "final").exists()
    assert not list(run.glob(".*tmp*"))
    assert train("--resume", str(run)) == 0
    assert [step for step, _ in losses(run)] == [step for step, _ in losses(reference)]  # no step trained twice
    finals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "eval" and e["p"] >= 1.0]
    assert len(finals) == 1  # the final evaluation is logged once
    assert (run / "final/model.safetensors").read_bytes() == (reference / "final/model.safetensors").read_bytes()


def test_one_writer_per_run_folder(tmp_path, text_folder, capsys):
    run = stopped_run(tmp_path, text_folder, steps=12)
    with writing(run, new=False):  # another process resuming it, as far as the lock can tell
        holder = (run / LOCK_FILE).read_text()
        assert holder.startswith("process ")
        capsys.readouterr()
        assert train("--resume", str(run)) == 2
        assert f"run folder '{run}' is in use by {holder}: wait for it to end" in one_error_line(capsys)
        assert train(*RUN, "--data", str(text_folder), "--out", str(run)) == 2
        assert "is in use by process" in one_error_line(capsys)
    assert train("--resume", str(run)) == 0  # released


def test_readers_hold_pruning_off(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    with reading_checkpoints(directory), (directory / ".prune.lock").open("a") as other:
        with pytest.raises(BlockingIOError):  # what _prune asks for, without waiting
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_resume_refuses_a_config_that_disagrees_with_the_plan(tmp_path, text_folder, capsys):
    run = stopped_run(tmp_path, text_folder, steps=12)
    config = run / "config.toml"
    assert "d_model" not in config.read_text()  # the tiny size decides it
    config.write_text(config.read_text().replace("[model]\n", "[model]\nd_model = 128\n", 1))  # a hand edit
    capsys.readouterr()
    assert train("--resume", str(run)) == 2
    assert "gives model.d_model = 128, but the run was planned and checkpointed with 64 (plan.json)" in \
        one_error_line(capsys)


@pytest.mark.parametrize("budget, message", [
    ("1e30flops", "would take at least"),
    ("1e25", "would take at least"),
])
def test_a_budget_no_machine_could_spend_is_refused(budget, message, tmp_path, text_folder, capsys):
    run = tmp_path / "run"
    assert train(*TINY, "--data", str(text_folder), "--budget", budget, "--out", str(run)) == 2
    assert message in one_error_line(capsys) and not run.exists()
    assert train(*TINY, "--data", str(text_folder), "--budget", f"{budget},3steps", "--out", str(run)) == 0


def test_out_pointing_at_a_file_is_one_line(tmp_path, text_folder, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert train(*TINY, "--data", str(text_folder), "--budget", "3steps", "--out", str(file)) == 2
    assert f"--out '{file}' is a file, not a folder" in one_error_line(capsys)
    assert train(*TINY, "--data", str(text_folder), "--budget", "3steps", "--out", str(file / "run")) == 2
    assert "not a folder" in one_error_line(capsys) and file.read_text() == "x"


@pytest.mark.parametrize("failure, code, message", [
    (OSError(errno.ENOSPC, "No space left on device"), 2, "no space left on device: free some space"),
    (KeyboardInterrupt(), 130, "flopwise: interrupted"),
])
def test_a_failure_while_tokenizing_into_the_cache_leaves_no_partial_entry_and_no_run(
        failure, code, message, tmp_path, monkeypatch, capsys):
    """A full disk under the data cache, or Ctrl-C while tokenizing: one line, the half-written cache entry
    removed, no run folder; the next run builds the entry whole."""
    from flopwise.data import shards

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a document that this test alone tokenizes, about budgets\n" * 300)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOPWISE_CACHE", str(cache))
    real_write = shards._write_corpus

    def fail(folder, *args, **kwargs):
        real_write(folder, *args, **kwargs)  # the entry's files are written, then the disk fills (or Ctrl-C)
        if isinstance(failure, OSError):
            failure.filename = str(folder / "train.bin")
        raise failure

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(shards, "_write_corpus", fail)
        assert train(*TINY, "--data", str(data), "--budget", "3steps", "--out", str(run)) == code
    assert message in one_error_line(capsys)
    assert not run.exists() and not list(cache.rglob(".tmp-*"))
    assert train(*TINY, "--data", str(data), "--budget", "3steps", "--out", str(run)) == 0


@pytest.mark.parametrize("damage", ["truncate", "empty", "zeros"])
def test_a_damaged_token_cache_is_rebuilt_saying_so_and_trains_as_the_intact_one(damage, tmp_path, monkeypatch,
                                                                                  capsys):
    """The probe's cases: a cached train.bin cut short, cut to nothing, or overwritten with zeros at its size
    was trained on as it was (or crashed): now named in one line and rebuilt, and the run is the intact one's."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a document that only this test tokenizes, about damaged caches\n" * 300)
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path / "cache"))
    command = [*TINY, "--data", str(data), "--budget", "3steps"]
    assert train(*command, "--out", str(tmp_path / "intact")) == 0
    (entry,) = (tmp_path / "cache" / "corpus").iterdir()
    tokens = entry / "train.bin"
    size = tokens.stat().st_size
    tokens.write_bytes({"truncate": tokens.read_bytes()[:500], "empty": b"", "zeros": bytes(size)}[damage])
    if damage == "zeros":  # a later write: a coarse clock may not have ticked since the build
        os.utime(tokens, ns=(tokens.stat().st_atime_ns, tokens.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert train(*command, "--out", str(tmp_path / "rebuilt")) == 0
    out, err = capsys.readouterr()
    problem = {"truncate": f"train.bin is truncated (500 of {size:,} bytes)",
               "empty": f"train.bin is truncated (0 of {size:,} bytes)",
               "zeros": "train.bin does not match its checksum"}[damage]
    assert f"flopwise: warning: token cache '{entry}' is not intact ({problem}): rebuilding it from the data" in err
    assert "(tokenized, " in out
    assert losses(tmp_path / "rebuilt") == losses(tmp_path / "intact")


def test_a_failed_new_run_removes_only_what_it_created(tmp_path):
    """A new run that fails before its run files removes its own folder and the parents it created while they
    are empty, never a run another process has meanwhile started beside it."""
    sweep = tmp_path / "sweep"
    with pytest.raises(RuntimeError), writing(sweep / "a", new=True):
        (sweep / "b").mkdir()  # another run, started in the parent this one created
        (sweep / "b" / "config.toml").write_text("")
        raise RuntimeError
    assert sorted(p.name for p in sweep.iterdir()) == ["b"] and (sweep / "b" / "config.toml").is_file()
    with pytest.raises(RuntimeError), writing(tmp_path / "x" / "y" / "run", new=True):
        raise RuntimeError
    assert not (tmp_path / "x").exists()


def test_pruning_keeps_the_new_checkpoint_over_corrupt_later_ones(tmp_path):
    """Resumed from step 100 past a corrupt step 200, the run writes step 150: with keep_checkpoints=1 that one
    is kept and the corrupt step 200 removed, so the next resume has an intact checkpoint."""
    import torch

    from flopwise.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    directory = tmp_path / "checkpoints"
    state = {"loop": {}, "pinned": False}
    save_checkpoint(directory, 100, model, optimizer, state, keep=2)
    corrupt = save_checkpoint(directory, 200, model, optimizer, state, keep=2)
    (corrupt / "model.safetensors").write_bytes(b"\0" * (corrupt / "model.safetensors").stat().st_size)
    save_checkpoint(directory, 150, model, optimizer, state, keep=1)
    assert [info.step for info in list_checkpoints(directory)] == [150]
