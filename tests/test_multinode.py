"""Two torchrun "nodes" on loopback (c10d rendezvous, one gloo process each), as two machines would launch one
run: DDP and FSDP2 stop half way with a checkpoint, resume on both nodes, and end on the single-process curve."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flopwise.cli import main
from flopwise.rundir import read_metrics
from tests.helpers import TINY

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(*args: str) -> list[subprocess.CompletedProcess]:
    """``flopwise train ARGS`` launched as two torchrun nodes of one process each, meeting at a c10d rendezvous
    on loopback (the launch each machine of a two-machine job runs, with its own --node-rank)."""
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "-m", "flopwise", "train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    done = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == kind]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_stop_resume_and_follow_the_single_process_curve(tmp_path, text_folder, parallel):
    single, run = tmp_path / "single", tmp_path / "two-nodes"
    assert main(["train", "--data", str(text_folder), "--budget", "8steps", "--out", str(single), *TINY]) == 0
    first = two_nodes("--data", str(text_folder), "--budget", "8steps", "--stop-after", "4steps", "--parallel",
                      parallel, "--out", str(run), *TINY)
    assert [node.returncode for node in first] == [0, 0], [node.stderr[-2000:] for node in first]
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    assert not (run / "final").exists()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["parallel"] == parallel
    assert sum(node.stdout.count("with a checkpoint") for node in first) == 1  # only the global rank 0 prints
    second = two_nodes("--resume", str(run))
    assert [node.returncode for node in second] == [0, 0], [node.stderr[-2000:] for node in second]
    assert (run / "final" / "config.json").is_file()
    ours, theirs = events(run, "train"), events(single, "train")
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == list(range(1, 9))
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
    for a, b in zip(events(run, "eval"), events(single, "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
