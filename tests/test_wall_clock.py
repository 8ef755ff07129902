"""The wall clock outside training: what a plain run imports before its first step, what checkpoints cost a short
seconds budget, the exit, and the run's own account of where its wall clock went (its last line, and the ``wall``
event of metrics.jsonl)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flopwise.cli import main
from flopwise.rundir import read_metrics
from flopwise.train import trainer
from tests.helpers import TINY, FakeClock, train

# What a plain `flopwise train` does not use before its first step: distributed checkpointing (a checkpoint
# imports it), scipy (a forecast's or a law's fit does), and the integrations.
NOT_AT_START = ("scipy", "torch.distributed.checkpoint", "transformers", "optuna", "lm_eval")


def test_a_plain_run_imports_none_of_the_heavy_modules_it_does_not_use_before_its_first_step(tmp_path, text_folder):
    script = textwrap.dedent(f"""
        import json, os, sys
        import flopwise.api, flopwise.cli.train, flopwise.session, flopwise.stages.pretrain
        imported = [name for name in {NOT_AT_START!r} if name in sys.modules]
        from flopwise.cli import main
        from flopwise.train import trainer
        real_step = trainer.train_step

        def first_step(*args, **kwargs):
            at_step = [name for name in {NOT_AT_START!r} if name in sys.modules]
            print(json.dumps({{"imported": imported, "at_first_step": at_step}}), flush=True)
            os._exit(0)
        trainer.train_step = first_step
        main(["train", "--data", {str(text_folder)!r}, "--budget", "5s", "--out", {str(tmp_path / "run")!r},
              *{TINY!r}])
        """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))  # this checkout's flopwise
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"imported": [], "at_first_step": []}


def test_a_run_says_where_its_wall_clock_went_in_its_last_line_and_its_metrics(tmp_path, text_folder, capsys):
    run = tmp_path / "r"
    assert train("--data", str(text_folder), "--budget", "6steps", "--out", str(run), *TINY) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    [wall] = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "wall"]
    trained = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"][-1]
    assert wall["step"] == 6 and wall["training"] == pytest.approx(trained["seconds"])
    assert last == (f"wall clock {wall['total']:.1f}s: start-up {wall['startup']:.1f}s (imports "
                    f"{wall['imports']:.1f}s, data {wall['data']:.1f}s, model {wall['build']:.1f}s), training "
                    f"{wall['training']:.1f}s, evaluation {wall['evaluation']:.1f}s (final "
                    f"{wall['final_evaluation']:.1f}s), checkpoints {wall['checkpoints']:.1f}s, final model "
                    f"{wall['final_model']:.1f}s, other {wall['other']:.1f}s")
    parts = ("startup", "training", "evaluation", "checkpoints", "final_model")
    assert all(wall[name] > 0 for name in (*parts, "data", "build", "final_evaluation")) and wall["imports"] >= 0
    assert wall["final_evaluation"] < wall["evaluation"]  # the evaluations during the run took the rest
    assert wall["imports"] + wall["data"] + wall["build"] <= wall["startup"]
    # the parts are disjoint spans of the run: they add up to its total, the rest being the loop's own few ms
    # (the process's start is known to 10 ms)
    assert wall["other"] == pytest.approx(wall["total"] - sum(wall[name] for name in parts))
    assert wall["other"] > -0.02


def checkpointed_steps(monkeypatch, clock: FakeClock, took: float) -> list[tuple[int, bool]]:
    """(step, pinned) of each checkpoint written, each taking ``took`` seconds of ``clock``."""
    written: list[tuple[int, bool]] = []
    real_save = trainer.save_checkpoint

    def save(directory, step, module, optimizer, state, *args, **kwargs):
        written.append((step, state["pinned"]))
        clock.advance(took)
        return real_save(directory, step, module, optimizer, state, *args, **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return written


def test_a_seconds_budget_checkpoints_only_where_the_work_saved_outweighs_the_checkpoint(tmp_path, text_folder,
                                                                                         monkeypatch):
    """On a fake clock: 1 s steps, 0.09 s checkpoints, a mark every 0.1 of a 20 s budget (every 2 steps).  A
    periodic checkpoint waits for 0.09 / CHECKPOINT_SHARE = 4.5 s of training since the last one; the pinned one
    (before the decay at 0.8) is written regardless."""
    assert trainer.Trainer.CHECKPOINT_SHARE == 0.02
    clock = FakeClock(lambda model: 1.0).install(monkeypatch)
    written = checkpointed_steps(monkeypatch, clock, took=0.09)
    def run(out: str, budget: str) -> int:
        return train("--data", str(text_folder), "--out", str(tmp_path / out), "--budget", budget, *TINY,
                     "--set", "train.eval_every=0", "--set", "train.forecast_every=0")
    assert run("seconds", "20s") == 0
    assert written == [(1, False), (6, False), (11, False), (16, True)]
    written.clear()  # the same steps counted in tokens: every mark, on any machine
    assert run("tokens", f"{20 * 4 * 64}tokens") == 0
    assert written == [(1, False), *((step, step == 16) for step in range(2, 20, 2))]


def test_the_command_freezes_what_lives_to_its_end_out_of_the_garbage_collector(monkeypatch, tmp_path):
    """Python's teardown would otherwise walk torch's objects in its last collections (seconds, after the run
    has ended); a caller that passes its own arguments (a test, a script) keeps its collector as it was."""
    monkeypatch.setattr(sys, "argv", ["flopwise", "memory", "--model", "tiny"])
    assert gc.get_freeze_count() == 0
    try:
        assert main() == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert main(["memory", "--model", "tiny"]) == 0 and gc.get_freeze_count() == 0
