"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process loss curve at the
same global batch, budgets count the whole job, and a checkpoint from 2 ranks resumes on 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.methods.base import World
from flopwise.resolve import resolve
from flopwise.rundir import read_metrics
from tests.helpers import TINY

# The default's Polar Express coefficients amplify the rounding that a different order of summation (the ranks'
# all-reduce) brings, to about 7e-5 of the loss by step 10 against 1e-6 with Newton-Schulz's; these tests check the
# parallel plumbing at 1e-5, so they run the Newton-Schulz iteration (the rest of the default recipe unchanged).
TINY_NS = (*TINY, "--set", "optim.ns_coefficients=newton_schulz")

pytestmark = pytest.mark.slow


def torchrun(*args: str, processes: int = 2, flopwise_command: str = "train") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "flopwise", flopwise_command, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_folder) -> Path:
    """The single-process reference: 16 steps of a global batch of 4 sequences."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--data", str(text_folder), "--budget", "16steps", "--out", str(run), *TINY_NS]) == 0
    return run


def assert_same_curve(run: Path, reference: Path) -> None:
    ours, theirs = events(run, "train"), events(reference, "train")
    assert [e["step"] for e in ours] == [e["step"] for e in theirs]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"] and a["flops"] == b["flops"]
    for a, b in zip(events(run, "eval"), events(reference, "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_ddp_matches_single_process_and_counts_the_whole_job(tmp_path, text_folder, single):
    run = tmp_path / "ddp"
    done = torchrun("--data", str(text_folder), "--budget", "16steps", "--out", str(run), *TINY_NS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_curve(run, single)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["parallel"] == "ddp"
    assert events(run, "train")[-1]["tokens"] == 16 * 4 * 64  # both ranks' tokens: the global batch
    assert done.stdout.count("held-out evaluation") == 1  # only rank 0 prints
    assert (run / "final" / "config.json").is_file()


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(tmp_path, text_folder, single):
    run = tmp_path / "fsdp"
    done = torchrun("--data", str(text_folder), "--budget", "16steps", "--stop-after", "8steps", "--parallel",
                    "fsdp", "--out", str(run), *TINY_NS)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    assert not (run / "final").exists()
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_curve(run, single)


def test_mixed_reweighted_run_under_ddp_follows_the_single_process_run(tmp_path, text_folder, code_folder):
    """Mixture weights, online domain reweighting and sample reweighting use the global batch: all-reduced
    domain losses and batch-wide normalization give two ranks the single process's curve and mixture."""
    args = ["--data", f"prose={text_folder}:0.6", "--data", f"code={code_folder}:0.4", "--online-mixture", "loss",
            "--reweight", "--set", "methods.reweight.burn_in=0.1", "--budget", "12steps", *TINY_NS]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *args, "--out", str(single)]) == 0
    done = torchrun(*args, "--out", str(ddp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_curve(ddp, single)
    for a, b in zip(events(ddp, "train"), events(single, "train"), strict=True):
        assert a["mixture"] == pytest.approx(b["mixture"], rel=1e-6)


@pytest.mark.parametrize(("stage", "parallel"), [("sft", "ddp"), ("dpo", "ddp"), ("sft", "fsdp")])
def test_post_training_under_torchrun_follows_the_single_process_run(tmp_path, single, stage, parallel):
    """Ranks hold different numbers of assistant tokens: every token still weighs the same (SFT); DPO's
    reference runs on each rank's own pairs."""
    words = [f"{w}{i}" for i in range(4) for w in ("apple", "river", "stone", "cloud", "maple", "ember")]
    records = ([{"messages": [{"role": "user", "content": f"reverse {w}"},
                              {"role": "assistant", "content": w[::-1] * (1 + len(w) % 3)}]} for w in words]
               if stage == "sft" else
               [{"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w} for w in words])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = ["--init-from", str(single), "--data", str(data), "--budget", "6steps", "--set", "optim.batch_size=4",
            "--set", "train.log_every=1"]
    assert main([stage, *args, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", str(tmp_path / "ddp"), "--parallel", parallel, flopwise_command=stage)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_curve(tmp_path / "ddp", tmp_path / "one")


def test_global_batch_must_split_over_ranks():
    config = load_config(None, ["optim.batch_size=6", "methods.progressive=false"])
    assert resolve(config, World(2)).rank_batch == 3
    with pytest.raises(FlopwiseError, match="optim.batch_size=6 is the global batch .* use a multiple of 4"):
        resolve(config, World(4))  # refused as the run is resolved, on every rank, before any data is read


def test_a_batch_schedule_under_ddp_matches_the_single_process_run(tmp_path, text_folder):
    """Each rank draws its share of the same global windows at every stage: the curve is the single process's."""
    args = ["--data", str(text_folder), "--budget", "16steps", *TINY_NS, "--method", "batch_schedule",
            "--set", "methods.batch_schedule.start=0.5", "--set", "methods.batch_schedule.until=0.5"]
    single_run, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *args, "--out", str(single_run)]) == 0
    done = torchrun(*args, "--out", str(ddp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_curve(ddp, single_run)
    assert [e["batch_size"] for e in events(ddp, "train")] == [2] * 8 + [4] * 8
