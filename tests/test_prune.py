"""Magnitude pruning (flopwise/methods/prune.py): the masks against numpy, the cubic and linear ramps against their
formulas, the average density, the FLOPs a pruned step counts, the masks' memory, the refusals of bad settings,
and real runs: the final weights hold exactly the target share of zeros (and the 2:4 pattern), a FLOP budget runs
the steps the schedule allows, and a run interrupted after pruning steps resumes bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flopwise.config import load_config
from flopwise.memory.estimate import estimate_memory
from flopwise.methods.base import StepShape
from flopwise.methods.prune import Prune, PruneConfig, average_density, magnitude_mask, ramp_points, scheduled_sparsity
from flopwise.methods.stack import memory_traits
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.plan.planner import plan_run
from flopwise.scaling.law import CHINCHILLA_REFIT
from flopwise.scaling.law_file import PlanningLaw
from flopwise.scaling.shapes import family_shape
from tests.helpers import TINY, config_with, losses, run_error, train, train_events


def test_the_unstructured_mask_zeroes_the_smallest_magnitudes_of_each_matrix():
    weight = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    for sparsity in (0.0, 0.3, 0.5, 0.95):
        mask = magnitude_mask(torch.from_numpy(weight), sparsity, "unstructured").numpy()
        zeros = round(sparsity * weight.size)
        expected = np.ones(weight.size, dtype=bool)
        expected[np.argsort(np.abs(weight).ravel(), kind="stable")[:zeros]] = False
        np.testing.assert_array_equal(mask, expected.reshape(weight.shape))


def test_the_2_4_mask_keeps_the_two_largest_of_each_group_of_four_input_columns():
    weight = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    mask = magnitude_mask(torch.from_numpy(weight), 0.5, "2:4").numpy()
    for row in range(5):
        for group in range(3):
            columns = slice(4 * group, 4 * group + 4)
            largest = np.argsort(-np.abs(weight[row, columns]))[:2]
            expected = np.isin(np.arange(4), largest)
            np.testing.assert_array_equal(mask[row, columns], expected)
    one_of_four = magnitude_mask(torch.from_numpy(weight), 0.25, "2:4").numpy().reshape(5, 3, 4)
    assert (one_of_four.sum(axis=-1) == 3).all()
    assert (one_of_four >= mask.reshape(5, 3, 4)).all()  # the 1:4 mask holds the 2:4 one


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_the_ramp_follows_its_formula_at_the_last_update_point_reached(schedule):
    config = PruneConfig(sparsity=0.8, start=0.2, end=0.6, schedule=schedule, updates=4)
    assert ramp_points(config) == pytest.approx([0.3, 0.4, 0.5, 0.6])
    shape = {"cubic": lambda u: 1 - (1 - u) ** 3, "linear": lambda u: u}[schedule]
    for p, reached in [(0.0, 0), (0.2, 0), (0.29, 0), (0.3, 1), (0.35, 1), (0.45, 2), (0.55, 3), (0.6, 4), (1.0, 4)]:
        assert scheduled_sparsity(config, p) == pytest.approx(0.8 * shape(reached / 4)), p


def test_2_4_rounds_the_ramp_down_to_whole_zeros_per_group_and_one_shot_prunes_at_start():
    config = PruneConfig(kind="2:4", updates=10)  # 0.5 * (1 - (1 - u)^3) passes 0.25 at u = 0.3, 0.5 at u = 1
    assert [scheduled_sparsity(config, p) for p in (0.24, 0.3, 0.39, 0.4, 0.74, 0.75)] == [0, 0, 0, 0.25, 0.25, 0.5]
    once = PruneConfig(start=0.4, end=0.4)
    assert ramp_points(once) == (0.4,)
    assert (scheduled_sparsity(once, 0.39), scheduled_sparsity(once, 0.4)) == (0.0, 0.5)


def test_the_average_density_is_the_integral_of_the_density_over_p():
    config = PruneConfig()
    grid = (np.arange(20_000) + 0.5) / 20_000  # the ramp points fall on cell edges: the midpoint rule is exact
    expected = np.mean([1 - scheduled_sparsity(config, p) for p in grid])
    assert average_density(config) == pytest.approx(expected, abs=1e-4)
    # by hand: dense until 0.25, the cubic's ten levels for 0.05 each, then 0.5 dense after 0.75
    levels = [0.5 * (1 - (1 - i / 10) ** 3) for i in range(10)]
    assert average_density(config) == pytest.approx(0.25 + sum(0.05 * (1 - s) for s in levels) + 0.25 * 0.5)


def test_a_pruned_steps_flops_count_the_block_matrices_at_their_density():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=64, vocab_size=257)
    block_weights = cfg.n_layers * sum(out * inp for _, out, inp in cfg.block_linears)
    assert flops_per_token(cfg) - flops_per_token(cfg, 0.5) == pytest.approx(6 * 0.5 * block_weights)
    method = Prune(PruneConfig())
    full = StepShape(4, 64, 2)
    assert method.step_shape(full, 0.1) == full
    assert method.step_shape(full, 0.8) == StepShape(4, 64, 2, block_sparsity=0.5)


def test_the_masks_cost_one_byte_per_block_matmul_weight():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=64, vocab_size=257)
    config = config_with(["prune"])
    pruned = estimate_memory(cfg, 4, memory_traits(["prune"], config.methods, cfg), "adamw")
    dense = estimate_memory(cfg, 4, memory_traits([], config.methods, cfg), "adamw")
    masks = cfg.n_layers * sum(out * inp for _, out, inp in cfg.block_linears)
    assert pruned.buffers - dense.buffers == masks and pruned.peak - dense.peak == masks
    assert pruned.weights == dense.weights and pruned.optimizer_states == dense.optimizer_states



def test_reshape_prunes_and_after_step_keeps_the_pruned_weights_at_zero():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 4, bias=False)])
    model.head = torch.nn.Linear(8, 4, bias=False)
    method = Prune(PruneConfig(start=0.5, end=0.5))
    method.configure(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    method.reshape(method.step_shape(StepShape(1, 8, 1), 0.5), model, optimizer)
    weight = model.layers[0].weight
    assert int((weight == 0).sum()) == 16 and int((model.head.weight == 0).sum()) == 0
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    method.after_step(1, model, optimizer)
    assert int((weight == 0).sum()) == 16 and method.log_fields() == {"sparsity": 0.5}


@pytest.mark.parametrize("settings, message", [
    (["methods.prune.start=0.8", "methods.prune.end=0.5"], "start=0.8 lies after end=0.5: the ramp must start "
     "before it ends (equal values prune in one shot)"),
    (["methods.prune.sparsity=1.0"], "methods.prune.sparsity=1.0: must lie in [0, 1)"),
    (["methods.prune.kind=2:4", "methods.prune.sparsity=0.3"], "sparsity=0.3 does not fit kind '2:4', which "
     "zeroes 2 of every 4 weights (0.5): drop sparsity or use kind 'unstructured'"),
    (["methods.prune.kind=2:4", "model.d_model=66", "model.n_heads=3"], "methods.prune.kind='2:4' needs every "
     "block Linear's input width divisible by 4 (d_model 66, MLP hidden 192, attention 66): choose multiples of "
     "4, or kind 'unstructured'"),
    (["methods.prune.kind=2:4", "model.mlp_hidden=170"], "(d_model 64, MLP hidden 170, attention 64)"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, text_folder, capsys, settings, message):
    sets = [flag for value in settings for flag in ("--set", value)]
    err = run_error(capsys, ["train", "--data", str(text_folder), "--budget", "4steps", "--out", str(tmp_path / "r"),
                             *TINY, "--method", "prune", *sets])
    assert message in err
    assert not (tmp_path / "r").exists()


def pruned_matrices(run) -> dict[str, torch.Tensor]:
    return {name: t for name, t in load_file(str(run / "final" / "model.safetensors")).items()
            if name.startswith("model.layers.") and t.dim() == 2}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_a_real_run_ends_with_the_target_sparsity_in_every_block_matrix(tmp_path, text_folder, kind):
    run = tmp_path / "run"
    assert train("--data", str(text_folder), "--budget", "16steps", "--out", str(run), *TINY, "--method", "prune",
                 "--set", f"methods.prune.kind={kind}", "--set", "train.eval_every=0") == 0
    matrices = pruned_matrices(run)
    assert len(matrices) == 2 * 7  # q, k, v, o, gate, up, down in each of the tiny model's two blocks
    for name, weight in matrices.items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
        if kind == "2:4":
            assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) == 2).all(), name
    embedding = load_file(str(run / "final" / "model.safetensors"))["model.embed_tokens.weight"]
    assert int((embedding == 0).sum()) == 0
    events = train_events(run)
    assert all(np.isfinite(e["loss"]) for e in events) and events[-1]["sparsity"] == 0.5
    config = PruneConfig(kind=kind)
    assert [e["sparsity"] for e in events] == [scheduled_sparsity(config, step / 16) for step in range(16)]


@pytest.mark.slow
def test_a_flop_budget_runs_the_steps_the_schedule_allows(tmp_path, text_folder):
    run = tmp_path / "run"
    budget = 3.0e9
    assert train("--data", str(text_folder), "--budget", f"{budget:.0f}flops", "--out", str(run), *TINY,
                 "--method", "prune", "--set", "train.eval_every=0") == 0
    plan = json.loads((run / "plan.json").read_text())
    tokens = plan["tokens_per_step"]
    block_weights = sum(t.numel() for t in pruned_matrices(run).values())
    config, spent, expected = PruneConfig(), 0.0, []
    while spent < budget * (1 - 1e-12):  # each step costs the FLOPs of the sparsity at the progress before it
        spent += (plan["flops_per_token"] - 6 * scheduled_sparsity(config, spent / budget) * block_weights) * tokens
        expected.append(spent)
    events = train_events(run)
    assert len(events) == len(expected)
    assert [e["flops"] for e in events] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_a_run_interrupted_after_pruning_steps_resumes_bit_for_bit(tmp_path, text_folder):
    args = ["--data", str(text_folder), "--budget", "16steps", *TINY, "--method", "prune",
            "--set", "train.eval_every=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "9steps", "--out", str(part)) == 0  # the masks were made at steps 6 to 9
    masks = load_file(str(part / "checkpoints" / "step_00000009" / "methods.safetensors"))
    assert len(masks) == 14 and all(mask.dtype == torch.bool for mask in masks.values())
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    assert [e["sparsity"] for e in train_events(part)] == [e["sparsity"] for e in train_events(full)]
    finals = [load_file(str(run / "final" / "model.safetensors")) for run in (full, part)]
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])


def test_the_planner_counts_a_pruned_runs_average_parameters_and_flops():
    """Jin et al. 2025: a sparse run sits on the dense law at its average parameter count over the run."""
    pruned_config = load_config(values={"budget.flops": 1e18, "methods.use": ["prune"]})
    pruned = plan_run(pruned_config, 8192, PlanningLaw(CHINCHILLA_REFIT), "d")
    density = average_density(PruneConfig())
    assert len(pruned.candidates) > 2
    for candidate in pruned.candidates:
        cfg = family_shape(pruned_config.model, candidate.d_model, 8192)
        blocks = cfg.n_layers * sum(out * inp for _, out, inp in cfg.block_linears)
        assert candidate.non_embedding == round(count_parameters(cfg)["non_embedding"] - (1 - density) * blocks)
        assert candidate.tokens == pytest.approx(1e18 / (flops_per_token(cfg) - 6 * (1 - density) * blocks))
        assert candidate.law_loss == pytest.approx(CHINCHILLA_REFIT.loss(candidate.non_embedding, candidate.tokens))


def test_a_growth_in_depth_remakes_the_masks_from_the_copied_weights():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)])
    method = Prune(PruneConfig(start=0.5, end=0.5))
    method.configure(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    method.reshape(StepShape(1, 8, 1, block_sparsity=0.5), model, optimizer)
    with torch.no_grad():
        model.layers[1].weight.copy_(model.layers[0].weight)  # what grow_depth's stacking does
    method.reshape(StepShape(1, 8, 2, block_sparsity=0.5), model, optimizer)
    assert torch.equal(method.masks["layers.1"], method.masks["layers.0"])
    assert method.state_dict() == {"sparsity": 0.5, "depth": 2}


@pytest.mark.slow
def test_with_the_default_progressive_recipe_a_run_resumes_bit_for_bit_and_ends_at_the_target(tmp_path, text_folder):
    """The default recipe's grow_depth, seq_schedule and batch_schedule beside pruning: interrupted after the
    growth and the last mask update (p = 0.75 of 24 steps), the resumed run repeats the uninterrupted one."""
    args = ["--data", str(text_folder), "--budget", "24steps", *TINY, "--set", "methods.progressive=true",
            "--set", "model.n_layers=4", "--method", "prune", "--set", "train.eval_every=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "20steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    events = train_events(full)
    assert (events[0]["depth"], events[-1]["depth"]) == (2, 4) and events[-1]["sparsity"] == 0.5
    finals = [load_file(str(run / "final" / "model.safetensors")) for run in (full, part)]
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])
    for name, weight in pruned_matrices(full).items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
