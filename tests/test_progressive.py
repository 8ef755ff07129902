"""Progressive training (depth growth, sequence-length and batch schedules): their stages, the budget's
step count under changing step costs, window cutting, block stacking, and real runs that meter each
side of a change exactly, end annealed at the budget and resume bit for bit across the changes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from flopwise.budget import Budget, Meter, StepCost, scheduled_steps_left
from flopwise.config import load_config
from flopwise.data.sampler import Batch
from flopwise.errors import FlopwiseError
from flopwise.methods.grow_depth import stack_blocks
from flopwise.methods.seq_schedule import SeqScheduleConfig
from flopwise.methods.stack import split_windows
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.rundir import read_metrics
from tests.helpers import TINY, losses, train, train_events

ALL = ["--method", "grow_depth", "--method", "seq_schedule", "--method", "batch_schedule"]


def test_stages_double_at_even_steps_until_full():
    config = SeqScheduleConfig(start=0.25, until=0.5)
    assert config.breakpoints() == (0.25, 0.5)
    assert [config.value(256, p) for p in (0.0, 0.2499, 0.25, 0.4999, 0.5, 0.9)] == [64, 64, 128, 128, 256, 256]
    assert SeqScheduleConfig(start=1.0).value(256, 0.0) == 256 and SeqScheduleConfig(start=1.0).breakpoints() == ()


def test_a_start_that_is_not_a_power_of_a_half_is_refused_naming_the_key(capsys):
    assert train(*TINY, "--budget", "4steps", "--method", "seq_schedule", "--set",
                 "methods.seq_schedule.start=0.3") == 2
    assert "methods.seq_schedule.start=0.3: must be 1, 1/2, 1/4" in capsys.readouterr().err


def test_a_batch_that_does_not_halve_is_refused(tmp_path, text_folder, capsys):
    assert train(*TINY, "--data", str(text_folder), "--budget", "4steps", "--method", "batch_schedule",
                 "--set", "optim.batch_size=6", "--set", "methods.batch_schedule.start=0.25",
                 "--out", str(tmp_path / "r")) == 2
    assert "optim.batch_size=6 cannot be halved 2 time(s) for start=0.25" in capsys.readouterr().err


def test_growth_must_divide_the_depth(tmp_path, text_folder, capsys):
    assert train(*TINY, "--data", str(text_folder), "--budget", "4steps", "--method", "grow_depth",
                 "--set", "methods.grow_depth.factor=3", "--out", str(tmp_path / "r")) == 2
    assert "methods.grow_depth.factor=3 must divide model.n_layers=2" in capsys.readouterr().err


def brute_force_steps(meter: Meter, budget: Budget, cost_at) -> int:
    """Steps until the budget is spent, one at a time (the last rounded as the closed form rounds it)."""
    meter, steps = dataclasses.replace(meter), 0
    while True:
        cost = cost_at(meter.progress(budget))
        if meter.progress(budget) >= 1.0:
            return max(1, steps)
        meter.add_step(cost.seconds or 0.0, cost.tokens, cost.flops)
        steps += 1


@pytest.mark.parametrize("budget", [Budget(tokens=100_000), Budget(flops=3.3e9), Budget(steps=77),
                                    Budget(tokens=100_000, steps=90)])
@pytest.mark.parametrize("spent_steps", [0, 5, 30])
def test_the_step_count_under_changing_costs_matches_taking_the_steps(budget, spent_steps):
    """Costs double at p = 0.2 and again at 0.6: the closed form, segment by segment, counts what stepping does."""
    def cost_at(p: float) -> StepCost:
        scale = 1 if p < 0.2 else 2 if p < 0.6 else 4
        return StepCost(tokens=256 * scale, flops=1e7 * scale, seconds=None)
    meter = Meter()
    for _ in range(spent_steps):
        cost = cost_at(meter.progress(budget))
        meter.add_step(0.0, cost.tokens, cost.flops)
    assert scheduled_steps_left(meter, budget, cost_at, (0.2, 0.6)) == brute_force_steps(meter, budget, cost_at)


def test_windows_are_cut_into_shorter_ones_with_the_same_tokens():
    windows = torch.arange(2 * 9).reshape(2, 9)
    batch = Batch(windows[:, :-1], windows[:, 1:], torch.tensor([3, 5]))
    cut = split_windows(batch, 2)
    assert cut.inputs.shape == (8, 2) and torch.equal(cut.inputs.reshape(2, 8), batch.inputs)
    assert torch.equal(cut.targets[:, 0], cut.inputs[:, 1])  # each target still the next token
    assert cut.domains.tolist() == [3] * 4 + [5] * 4


def test_stacking_copies_weights_buffers_and_optimizer_state_block_by_block():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_layers=4, n_heads=2, seq_len=8))
    model.depth = 2
    optimizer = build_optimizer(model, load_config(None, []).optim, torch.device("cpu"))
    x = torch.randint(0, 50, (2, 9))
    model(x[:, :-1], x[:, 1:])[1].backward()
    optimizer.step()
    assert not any(p in optimizer.state for p in model.layers[2].parameters())  # never trained
    stack_blocks(model, optimizer, 4)
    assert model.depth == 4
    for target, source in ((2, 0), (3, 1)):
        for (name, a), b in zip(model.layers[source].named_parameters(), model.layers[target].parameters()):
            assert torch.equal(a, b), name
            for key, value in optimizer.state[a].items():
                assert torch.equal(optimizer.state[b][key], value)
                assert optimizer.state[b][key] is not value  # a copy: the two blocks now train apart


@pytest.mark.parametrize("preserving", [True, False])
def test_function_preserving_growth_keeps_the_loss_and_trains_the_copies(preserving):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_layers=4, n_heads=2, seq_len=8))
    model.depth = 2
    optimizer = build_optimizer(model, load_config(None, []).optim, torch.device("cpu"))
    x = torch.randint(0, 50, (2, 9))
    for _ in range(3):
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        before = model(x[:, :-1], x[:, 1:])[1]
    stack_blocks(model, optimizer, 4, function_preserving=preserving)
    with torch.no_grad():
        after = model(x[:, :-1], x[:, 1:])[1]
    assert torch.equal(before, after) is preserving  # each copy adds nothing to the residual stream yet
    zeroed = [(name, p) for block in model.layers[2:] for name, p in block.named_parameters()
              if name.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(zeroed) == 4 and all((not p.any()) is preserving for _, p in zeroed)
    assert all((p not in optimizer.state) is preserving for _, p in zeroed)  # fresh state, not the source's
    model(x[:, :-1], x[:, 1:])[1].backward()
    optimizer.step()
    assert all(p.any() for _, p in zeroed)  # the copies' output projections leave zero at once


@pytest.mark.slow
def test_growth_meters_each_side_exactly_and_exports_the_grown_model(tmp_path, text_folder):
    run = tmp_path / "grow"
    assert train(*TINY, "--data", str(text_folder), "--budget", "20steps", "--method", "grow_depth",
                 "--set", "methods.grow_depth.at=0.25", "--out", str(run)) == 0
    events = train_events(run)
    assert [e["depth"] for e in events] == [1] * 5 + [2] * 15
    tokens_per_step = 4 * 64
    vocab = json.loads((run / "plan.json").read_text())["model"]["vocab_size"]
    shallow = ModelConfig(vocab_size=vocab, d_model=64, n_layers=1, n_heads=2, seq_len=64)
    expected = (5 * flops_per_token(shallow) + 15 * flops_per_token(dataclasses.replace(shallow, n_layers=2))
                ) * tokens_per_step
    assert events[-1]["flops"] == pytest.approx(expected, rel=1e-12)
    assert events[-1]["tokens"] == 20 * tokens_per_step
    weights = load_file(str(run / "final" / "model.safetensors"))
    first, second = (weights[f"model.layers.{i}.mlp.up_proj.weight"] for i in (0, 1))
    assert not torch.equal(first, second)  # stacked at step 5, then trained apart


@pytest.mark.slow
def test_schedules_end_annealed_exactly_at_a_token_budget(tmp_path, text_folder):
    run = tmp_path / "all"
    budget = 60 * 4 * 64
    assert train(*TINY, *ALL, "--data", str(text_folder), "--budget", f"{budget}tokens", "--out", str(run)) == 0
    events = train_events(run)
    assert events[-1]["tokens"] == budget and events[-1]["p_lr"] == 1.0 and events[-1]["lr"] == 0.0
    assert [e["batch_size"] for e in events][:2] == [2, 2] and events[-1]["batch_size"] == 4
    assert events[0]["seq_len"] == 8 and events[-1]["seq_len"] == 64
    assert [e["depth"] for e in events][0] == 1 and events[-1]["depth"] == 2
    config = load_config(run / "config.toml")
    schedule = config.schedule.build()
    for event in events:  # sqrt rule: a quarter of the batch trains at half the learning rate, half at 1/sqrt(2)
        factor = math.sqrt(event["batch_size"] / 4)
        assert event["lr"] == pytest.approx(config.optim.lr * schedule(event["p_lr"]) * factor, rel=1e-12)
    p_lrs = [e["p_lr"] for e in events]
    assert p_lrs == sorted(p_lrs)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [12, 22])
def test_resume_across_a_growth_point_and_a_sequence_length_change_is_bit_for_bit(tmp_path, text_folder, stop):
    """60 steps; growth and the second window length at step 15, full windows at step 30: interrupted before
    the changes (12) or between them (22), the resumed run repeats the uninterrupted one."""
    args = [*TINY, "--method", "grow_depth", "--method", "seq_schedule", "--data", str(text_folder),
            "--budget", "60steps", "--set", "train.eval_every=0.5", "--set", "methods.grow_depth.at=0.25",
            "--set", "methods.seq_schedule.start=0.25", "--set", "methods.seq_schedule.until=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", f"{stop}steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    ours, theirs = train_events(part), train_events(full)
    assert [(e["depth"], e["seq_len"], e["lr"], e["flops"]) for e in ours] == \
        [(e["depth"], e["seq_len"], e["lr"], e["flops"]) for e in theirs]
    assert {e["depth"] for e in theirs} == {1, 2} and {e["seq_len"] for e in theirs} == {16, 32, 64}
    assert (load_file(str(part / "final" / "model.safetensors")).keys()
            == load_file(str(full / "final" / "model.safetensors")).keys())
    for name, tensor in load_file(str(full / "final" / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(part / "final" / "model.safetensors"))[name]), name


def test_progressive_methods_are_refused_in_post_training(tmp_path):
    from flopwise.data.tokenizer import byte_tokenizer
    from flopwise.model.config import ModelConfig
    from flopwise.model.gpt import GPT
    from flopwise.model.hf import save_hf_folder
    from flopwise.resolve import resolve

    start = tmp_path / "start"
    save_hf_folder(GPT(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seq_len=32)), byte_tokenizer(),
                   start)
    for name in ("grow_depth", "seq_schedule", "batch_schedule"):
        config = load_config(None, [f'methods.use=["{name}"]', "posttrain.stage=sft", f"model.init_from={start}"])
        with pytest.raises(FlopwiseError, match=f"methods.use '{name}' applies to the pretrain stage only, not to sft"):
            resolve(config)
    # nor does a post-training run add them by default
    config = load_config(None, ["posttrain.stage=sft", f"model.init_from={start}"])
    assert resolve(config).methods == [] and resolve(config).notes == ()


def test_the_default_recipe_adds_growth_and_the_sequence_schedule_where_they_apply():
    from flopwise.methods.base import World
    from flopwise.resolve import resolve

    config = load_config(None, [])
    resolved = resolve(config, World())
    assert resolved.methods == ["grow_depth", "seq_schedule", "batch_schedule"]
    assert "progressive: grow_depth, seq_schedule, batch_schedule" in resolved.notes[0]
    # under torchrun depth growth cannot run: left out, and the run says why
    resolved = resolve(config, World(size=2))
    assert resolved.methods == ["seq_schedule", "batch_schedule"]
    assert "grow_depth left out (methods.use 'grow_depth' runs in one process only" in resolved.notes[0]
    # a run that names a progressive method, or turns them off, keeps its own list; so does a resumed run
    own = load_config(None, ['methods.use=["batch_schedule"]'])
    assert resolve(own, World()).config == own and resolve(own, World()).notes == ()
    off = load_config(None, ["methods.progressive=false"])
    assert resolve(off, World()).config == off
    assert resolve(config, World(), new=False).methods == []
    # a run that will be extended takes none, and refuses one named
    assert resolve(config, World(), extendable=True).methods == []
    with pytest.raises(FlopwiseError, match="methods.use 'batch_schedule' follows the share of the original budget"):
        resolve(own, World(), extendable=True)


@pytest.mark.slow
def test_a_new_run_records_the_progressive_methods_it_added(tmp_path, text_folder):
    run = tmp_path / "default"
    default = [arg for arg in TINY if arg != "methods.progressive=false"][:-1]  # TINY without the switch
    assert train(*default, "--data", str(text_folder), "--budget", "24steps", "--out", str(run)) == 0
    assert load_config(run / "config.toml").methods.use == ["grow_depth", "seq_schedule", "batch_schedule"]
    events = train_events(run)
    assert [e["depth"] for e in events] == [1] * 18 + [2] * 6  # the measured defaults: grown at 0.75,
    assert [e["seq_len"] for e in events] == [8] * 4 + [16] * 4 + [32] * 4 + [64] * 12  # full windows from 0.5,
    assert [e["batch_size"] for e in events] == [2] * 6 + [4] * 18  # half the batch until 0.25
    assert events[-1]["tokens"] == 6 * 2 * 64 + 18 * 4 * 64


@pytest.mark.slow
def test_a_progressive_run_cannot_be_extended_and_says_why(tmp_path, text_folder, capsys):
    run = tmp_path / "grow"
    assert train(*TINY, "--data", str(text_folder), "--budget", "8steps", "--method", "grow_depth",
                 "--out", str(run)) == 0
    assert train("--resume", str(run), "--budget", "16steps") == 2
    assert "trained with grow_depth, whose schedules follow the share of its original budget" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("preserving", ["true", "false"])
def test_a_run_that_grows_late_says_whether_it_ended_above_its_loss_before_the_growth(tmp_path, text_folder,
                                                                                      preserving):
    run = tmp_path / "late"
    assert train(*TINY, "--data", str(text_folder), "--budget", "24steps", "--method", "grow_depth",
                 "--set", "methods.grow_depth.at=0.9", "--set", "train.eval_every=0",
                 "--set", f"methods.grow_depth.function_preserving={preserving}", "--out", str(run)) == 0
    events = read_metrics(run / "metrics.jsonl")
    before, final = [e for e in events if e["event"] == "eval"]  # only these two: evaluations are off
    grown = next(e["step"] for e in events if e["event"] == "train" and e["depth"] == 2)
    assert before["before_change"] and before["step"] == grown - 1  # the model as it was at its growth point
    notes = [e for e in events if e["event"] == "note"]
    # held to it on the same held-out windows: the final model's loss on the sample the one before the growth read
    assert final["val_tokens"] >= before["val_tokens"] and "before_change_sample_loss" in final
    assert len(notes) == (final["before_change_sample_loss"] > before["val_loss"])
    if notes:
        assert f"above the {before['val_loss']:.4f} it had before its last change of shape" in notes[0]["note"]
