"""`flopwise rl` end to end on a tiny pretrained run: the meter counts every rollout's FLOPs (within bounds computed
here from the model's shape), a FLOP budget ends at its last step fully annealed, a run stopped and resumed equals
the uninterrupted one bit for bit (with rollouts reused across updates and a KL reference too), torchrun follows
one process, and bad input is one line with exit code 2 that loses nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.model.flops import forward_flops_per_token
from flopwise.rundir import planned_model_config, read_metrics
from tests.helpers import losses, run_error

pytestmark = pytest.mark.slow  # real runs: a pretrain, then rl from it

WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "grove")
GROUP, BATCH, RESPONSE = 4, 4, 8
SMALL = ["--set", f"optim.batch_size={BATCH}", "--group", str(GROUP), "--max-response", str(RESPONSE),
         "--set", "train.log_every=1", "--set", "train.eval_every=0.5", "--set", "posttrain.heldout=0.25",
         "--set", "rl.temperature=1.0"]  # an untrained model's samples: diverse enough to differ within groups


def tasks() -> list[dict]:
    """Short prompts (a byte tokenizer spells them out) whose answers a verifier checks; the regex ones (a reply
    starting with a to m) the tiny model passes about half the time, so groups differ and the loss has a gradient."""
    records = [{"prompt": f"Say {w}{i}.", "answer": f"{w}{i}"} for i in range(3) for w in WORDS]
    records += [{"prompt": f"{a}+{b}=", "answer": a + b, "verifier": "numeric"} for a in range(4) for b in range(3)]
    records += [{"prompt": f"Write {w}.", "answer": "^[a-m]", "verifier": "regex"} for w in WORDS + ("x", "y")]
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tasks()), encoding="utf-8")
    return path


def rl(base: Path, data: Path, out: Path, *args: str) -> int:
    return main(["rl", "--init-from", str(base), "--data", str(data), "--out", str(out), *SMALL, *args])


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == kind]


@pytest.fixture(scope="module")
def rl_run(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl") / "run"
    assert rl(base, data, out, "--budget", "6steps") == 0
    return out


def test_the_meter_counts_each_steps_rollouts(rl_run):
    """Each step's FLOPs are the update's (plan.json) plus its rollouts', which lie between every group ending at
    its first token and every group (refills included) running to rl.max_response, counted from the shape here."""
    plan = json.loads((rl_run / "plan.json").read_text())
    forward = forward_flops_per_token(planned_model_config(rl_run))
    prompts = [len(str(r["prompt"])) for r in tasks()]  # bytes of the content, before the template's
    trains = events(rl_run, "train")
    spent = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}] + trains, trains)]
    assert len(spent) == 6
    groups_at_most = BATCH * (1 + 2)  # rl.refill_rounds=2 may sample a fresh group for each prompt twice
    for step in spent:
        rollouts = step - plan["flops_per_step"]
        fewest = BATCH * forward * min(prompts)  # at least each prompt's own forward
        most = groups_at_most * forward * (max(prompts) + 40 + GROUP * (RESPONSE - 1))  # 40: the template, at most
        assert fewest < rollouts < most


def test_evaluations_score_pass_at_1_from_the_starting_model(rl_run, capsys):
    evals = events(rl_run, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6 and evals[-1]["p"] == pytest.approx(1.0)
    for event in evals:
        assert 0 <= event["pass_greedy"] <= 1 and 0 <= event["pass_sampled"] <= 1
        assert event["prompts"] == round(0.25 * len(tasks())) and event["rollout_seconds"] >= 0
    assert evals[-1]["rollout_seconds"] > 0
    assert any(loss != 0.0 for _, loss in losses(rl_run))  # some groups had a signal

def test_a_flop_budget_ends_at_its_last_step_fully_annealed(base, data, rl_run, tmp_path):
    """The run stops at the step whose spend reaches the budget, as predicted from the rollouts' mean cost so far:
    not before, and with less than half a step's FLOPs left where the last step's rollouts ran shorter."""
    trains = events(rl_run, "train")
    per_step = trains[-1]["flops"] / len(trains)
    budget = 5 * per_step
    out = tmp_path / "flops"
    assert rl(base, data, out, "--set", f"budget.flops={budget!r}") == 0
    ours = events(out, "train")
    assert ours[-2]["flops"] < budget < ours[-1]["flops"] + 0.5 * per_step
    assert ours[-1]["lr"] == 0.0 and ours[-1]["p"] == pytest.approx(ours[-1]["flops"] / budget)


@pytest.mark.parametrize("extra", [[], ["--set", "rl.updates=2", "--set", "rl.kl_beta=0.1"]],
                         ids=["on-policy", "reused-with-kl"])
def test_resume_after_an_interruption_is_bit_for_bit(base, data, tmp_path, extra):
    common = ["--budget", "7steps", *extra]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert rl(base, data, whole, *common) == 0
    assert rl(base, data, parts, *common, "--stop-after", "3steps") == 0  # mid-reuse with updates=2
    assert main(["rl", "--resume", str(parts)]) == 0
    assert losses(parts) == losses(whole)
    for a, b in zip(events(parts, "eval"), events(whole, "eval"), strict=True):
        assert {k: a[k] for k in ("pass_greedy", "pass_sampled", "reward_sampled")} == \
               {k: b[k] for k in ("pass_greedy", "pass_sampled", "reward_sampled")}
    assert [e["flops"] for e in events(parts, "train")] == [e["flops"] for e in events(whole, "train")]
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(parts / "final" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_under_torchrun_rl_follows_the_single_process_run(base, data, tmp_path):
    """Each rank rolls out its share of the prompts with the seeds one process uses: the same rollouts, and the
    loss normalised over both ranks' tokens."""
    from tests.test_distributed import torchrun

    args = ["--init-from", str(base), "--data", str(data), "--budget", "4steps", *SMALL,
            "--set", "rl.allocation=uniform", "--set", "optim.ns_coefficients=newton_schulz"]
    assert main(["rl", *args, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", str(tmp_path / "ddp"), flopwise_command="rl")
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = events(tmp_path / "ddp", "train"), events(tmp_path / "one", "train")
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6) and a["flops"] == pytest.approx(b["flops"])
    for a, b in zip(events(tmp_path / "ddp", "eval"), events(tmp_path / "one", "eval"), strict=True):
        assert a["pass_greedy"] == b["pass_greedy"] and a["reward_sampled"] == b["reward_sampled"]


def reward_module(tmp_path: Path, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(f"def score(prompt, completion, record):\n{body}\n")
    return "my_rewards:score"


@pytest.mark.parametrize(("case", "message"), [
    ("empty", "has no tasks"),
    ("no-answer", "field 'answer' is missing"),
    ("verifier", "use one of exact, numeric, regex"),
    ("group", "rl.group=1: must be a whole number >= 2"),
    ("module", "--reward no_such_module:score"),
    ("function", "has no attribute 'nothing'"),
    ("not-a-run", "is neither a flopwise run folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, base, data, tmp_path, capsys, monkeypatch, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text({"empty": "", "no-answer": '{"prompt": "Say a."}\n',
                       "verifier": '{"prompt": "Say a.", "answer": "a", "verifier": "fuzzy"}\n'}.get(case, ""))
    reward_module(tmp_path, "    return 1.0")
    args = {"empty": ["--data", str(broken)], "no-answer": ["--data", str(broken)],
            "verifier": ["--data", str(broken)], "group": ["--data", str(data), "--group", "1"],
            "module": ["--data", str(data), "--reward", "no_such_module:score"],
            "function": ["--data", str(data), "--reward", "my_rewards:nothing"],
            "not-a-run": ["--data", str(data)]}[case]
    start = tmp_path if case == "not-a-run" else base
    out = tmp_path / "out"
    err = run_error(capsys, ["rl", "--init-from", str(start), "--out", str(out), "--budget", "4steps", *args])
    assert message in err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


@pytest.mark.parametrize(("body", "said"), [("    raise ValueError('no score')", "raised ValueError: no score"),
                                            ("    return float('nan')", "nan")])
def test_a_reward_function_that_fails_stops_in_one_line_and_keeps_the_last_checkpoint(
        base, data, tmp_path, capsys, monkeypatch, body, said):
    monkeypatch.syspath_prepend(str(tmp_path))
    counter = tmp_path / "calls"
    # fine for the starting model's evaluation and the first steps, then it fails
    reward_module(tmp_path, f"    import pathlib\n    p = pathlib.Path({str(counter)!r})\n"
                            f"    n = int(p.read_text()) + 1 if p.exists() else 1\n    p.write_text(str(n))\n"
                            f"    if n <= 250:\n        return 1.0 if completion else 0.0\n{body}")
    sys.modules.pop("my_rewards", None)
    out = tmp_path / "out"
    err = run_error(capsys, ["rl", "--init-from", str(base), "--data", str(data), "--out", str(out),
                             "--budget", "8steps", "--reward", "my_rewards:score", *SMALL,
                             "--set", "train.checkpoint_every=0.1"])
    assert "--reward my_rewards:score" in err and said.lower() in err.lower()
    assert any((out / "checkpoints").iterdir())  # the steps before it are kept
    assert not (out / "final").exists()


def test_tensorboard_wandb_and_the_report_show_pass_at_1(rl_run, tmp_path, capsys):
    from flopwise.train.loggers import scalars

    logged = scalars(events(rl_run, "eval")[-1])
    assert {"eval/pass_greedy", "eval/pass_sampled", "eval/reward_greedy", "eval/rollout_seconds"} <= set(logged)
    assert "eval/loss" not in logged  # an RL evaluation has no held-out loss
    out = tmp_path / "report"
    assert main(["report", str(rl_run), "--out", str(out)]) == 0
    plots = json.loads((out / "report.json").read_text())["plots"]
    assert plots["pass_vs_seconds"]["lines"][0]["y"] == [e["pass_greedy"] for e in events(rl_run, "eval")]
    assert (out / "pass_vs_seconds.png").stat().st_size > 0 and (out / "reward_vs_seconds.png").is_file()
