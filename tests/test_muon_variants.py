"""Muon's options: Polar Express against the singular values of an SVD and against Newton-Schulz, NorMuon's
normalization and cautious weight decay against the rules computed by hand, exact resume of each option, the
memory estimate of NorMuon's state against the state the optimizer holds, and the config keys end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import get_args

import pytest
import torch

from flopwise.cli import main
from flopwise.memory.estimate import estimate_memory
from flopwise.memory.traits import MemoryTraits
from flopwise.methods import galore  # noqa: F401  (registers the galore rule)
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.optim.config import OptimSection
from flopwise.optim.muon import ITERATIONS, PRECISIONS, newton_schulz, orthogonalize_all
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tests.helpers import TINY, run_error, train_events

CPU = torch.device("cpu")


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Polar Express


def _scalar_iteration(singular_values: torch.Tensor, name: str, steps: int) -> torch.Tensor:
    """The iteration as it acts on each singular value alone: s <- a s + b s^3 + c s^5 per step, from the
    singular values scaled as newton_schulz scales the matrix (by safety x the Frobenius norm)."""
    iteration = ITERATIONS[name]
    s = singular_values / (singular_values.square().sum().sqrt() * iteration.safety)
    for a, b, c in iteration.coefficients(steps):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (64, 64)])
def test_polar_express_maps_each_singular_value_by_its_polynomials(shape):
    """Independent of the matrix products: the singular values that come out are the input's, through the
    composed scalar polynomials, and the singular vectors stay (the result points where U V^T does)."""
    g = _random(*shape, seed=1).double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    result = newton_schulz(g, steps=5, coefficients="polar_express")
    expected = _scalar_iteration(s, "polar_express", 5)
    # newton_schulz iterates in fp32
    assert torch.allclose(torch.linalg.svdvals(result), expected.sort(descending=True).values, rtol=0, atol=2e-5)
    assert torch.allclose(result, u @ torch.diag(expected) @ vh, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(32, 128), (256, 64)])
def test_polar_express_lands_closer_to_orthogonal_than_newton_schulz_in_five_steps(shape):
    for seed in range(3):
        g = _random(*shape, seed=seed)
        ns = torch.linalg.svdvals(newton_schulz(g, steps=5))
        pe = torch.linalg.svdvals(newton_schulz(g, steps=5, coefficients="polar_express"))
        # Newton-Schulz's quintic leaves singular values in about [0.68, 1.2]; Polar Express in [0.86, 1.15]
        assert (pe - 1).abs().max() < 0.15 < 0.3 < (ns - 1).abs().max()
        assert (pe - 1).square().mean() < 0.5 * (ns - 1).square().mean()


def test_the_iterations_refuse_more_steps_than_they_have_coefficients_for():
    w = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="this iteration has coefficients for 5 steps, not 6"):
        FlopwiseOptimizer([{"params": [w], "update": "muon", "ns_coefficients": "polar_express"}], ns_steps=6)
    with pytest.raises(ValueError, match="ns_coefficients='chebyshev' is unknown: choose one of newton_schulz, "
                                         "polar_express"):
        FlopwiseOptimizer([{"params": [w], "update": "muon", "ns_coefficients": "chebyshev"}])
    assert set(get_args(OptimSection.model_fields["ns_coefficients"].annotation)) == set(ITERATIONS)
    assert set(get_args(OptimSection.model_fields["ns_precision"].annotation)) == set(PRECISIONS)


@pytest.mark.parametrize("coefficients", ["newton_schulz", "polar_express"])
def test_the_bf16_iteration_computes_in_bf16_and_lands_where_fp32_does(coefficients):
    """bf16 (torch.optim.Muon's and the speedrun's precision): the result differs from the fp32 iteration's by
    bf16's rounding (far more than fp32's), but points the same way with the same singular values to within
    it; batched, each matrix of a stack gets its own bf16 iteration."""
    g = _random(48, 96, seed=4)
    fp32 = newton_schulz(g, coefficients=coefficients)
    bf16 = newton_schulz(g, coefficients=coefficients, precision="bf16")
    assert bf16.dtype == torch.float32
    assert 1e-3 < (bf16 - fp32).abs().max() < 0.05
    assert (bf16 * fp32).sum() / (bf16.norm() * fp32.norm()) > 0.998
    assert torch.allclose(torch.linalg.svdvals(bf16), torch.linalg.svdvals(fp32), atol=0.03)
    updates = [g, _random(96, 48, seed=5), _random(48, 96, seed=6)]
    for update, done in zip(updates, orthogonalize_all(updates, 5, coefficients, precision="bf16")):
        assert torch.allclose(done, newton_schulz(update, coefficients=coefficients, precision="bf16"), atol=1e-2)


# ---------------------------------------------------------------------------------------------
# NorMuon


@pytest.mark.parametrize("shape", [(12, 4), (4, 12), (6, 6)])
def test_normuon_steps_match_the_rule_by_hand(shape):
    """Three steps of NorMuon against the rule written out element by element: each neuron (a row of a tall or
    square matrix, a column of a wide one) divided by the root of an EMA of its mean square, the whole scaled
    back to the orthogonalized update's Frobenius norm."""
    rows, cols = shape
    w = torch.nn.Parameter(_random(*shape).double())
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "normuon", "lr": 0.1, "normuon_beta2": 0.8}],
                                  momentum=0.9)
    expected = w.detach().clone()
    buffer = torch.zeros(shape, dtype=torch.float64)
    by_row = rows >= cols
    second = [0.0] * (rows if by_row else cols)
    for step in range(3):
        g = _random(*shape, seed=10 + step).double()
        w.grad = g.clone()
        optimizer.step()
        buffer = 0.9 * buffer + 0.1 * g
        o = newton_schulz(0.1 * g + 0.9 * buffer).tolist()
        for n in range(len(second)):
            entries = o[n] if by_row else [o[i][n] for i in range(rows)]
            second[n] = 0.8 * second[n] + 0.2 * sum(x * x for x in entries) / len(entries)
        normalized = [[o[i][j] / math.sqrt(second[i if by_row else j]) for j in range(cols)] for i in range(rows)]
        scale = math.sqrt(sum(x * x for row in o for x in row)) / math.sqrt(sum(x * x for row in normalized
                                                                                for x in row))
        step_size = 0.1 * math.sqrt(max(1.0, rows / cols)) * scale
        expected = expected - step_size * torch.tensor(normalized, dtype=torch.float64)
        assert torch.allclose(w.detach(), expected, atol=1e-10)
    assert optimizer.state[w]["neuron_second_moment"].shape == ((rows, 1) if by_row else (1, cols))


def test_normuon_first_step_gives_every_neuron_the_same_norm():
    """From a zero second moment, each neuron is divided by its own root mean square: all of the update's rows
    (of this tall matrix) then have one norm, where Muon's differ."""
    w = torch.nn.Parameter(torch.zeros(32, 8))
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "normuon", "lr": 1.0}], nesterov=False)
    w.grad = _random(32, 8) * torch.linspace(0.1, 3, 32).unsqueeze(1)  # rows of very different sizes
    optimizer.step()
    norms = w.detach().norm(dim=1)
    assert torch.allclose(norms, norms.mean().expand(32), rtol=1e-5)
    muon_rows = newton_schulz(w.grad).norm(dim=1)
    assert muon_rows.max() > 1.5 * muon_rows.min()
    assert torch.allclose(w.detach().norm(), newton_schulz(w.grad).norm() * 2, rtol=1e-5)  # x sqrt(32 / 8)


# ---------------------------------------------------------------------------------------------
# Cautious weight decay

P = [[1.0, -2.0], [3.0, -4.0]]


def test_cautious_decay_spares_the_weights_whose_update_disagrees_adamw_by_hand():
    """One AdamW step on a 2x2 weight: the first step's update is g / (|g| + eps), with g's signs; the decay
    lr * wd * w applies where g and w agree in sign (top left, bottom right), not elsewhere."""
    w = torch.nn.Parameter(torch.tensor(P))
    optimizer = FlopwiseOptimizer([{"params": [w], "lr": 0.1, "weight_decay": 0.5}], cautious_weight_decay=True)
    w.grad = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    optimizer.step()
    step = 0.1 / (1 + 1e-8)
    decay = 0.1 * 0.5
    expected = [[1 - decay * 1 - step, -2 - step], [3 + step, -4 - decay * -4 + step]]
    assert torch.allclose(w.detach(), torch.tensor(expected), atol=1e-7)


def test_cautious_decay_on_muon_reads_the_orthogonalized_update_and_decays_where_it_is_zero():
    """The gradient diag(2, 1) orthogonalizes to a positive diagonal (an odd polynomial of each singular value),
    zero off the diagonal: the decay applies where the update is 0 or has the weight's sign, so everywhere but
    the bottom right (update > 0, weight < 0)."""
    w = torch.nn.Parameter(torch.tensor(P))
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "muon", "lr": 0.1, "weight_decay": 0.5}],
                                  nesterov=False, cautious_weight_decay=True)
    w.grad = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    optimizer.step()
    o = newton_schulz(0.05 * w.grad)  # the momentum buffer after one step: (1 - 0.95) g
    assert o[0, 1] == o[1, 0] == 0 and o[0, 0] > 0 and o[1, 1] > 0
    kept = [[1 - 0.05, 1 - 0.05], [1 - 0.05, 1.0]]
    expected = torch.tensor(P) * torch.tensor(kept) - 0.1 * o
    assert torch.allclose(w.detach(), expected, atol=1e-7)


@pytest.mark.parametrize("rule", ["muon", "normuon", "galore"])
def test_cautious_decay_differs_from_the_plain_decay_only_where_the_update_disagrees(rule):
    """Any rule: the plain step reveals the update (w' = w (1 - f) - u, from the gradients alone in these rules);
    the cautious step must then be w - f w [u w >= 0] - u, whatever the rule computed u from.  The second step
    of each, so that the decay has made the weights differ."""
    def stepped(cautious: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.nn.Parameter(_random(16, 8, seed=3))
        group = {"params": [w], "update": rule, "lr": 0.05, "weight_decay": 2.0}
        optimizer = FlopwiseOptimizer([group], cautious_weight_decay=cautious, rank=4)
        for step in range(2):
            w.grad = _random(16, 8, seed=20 + step)
            before = w.detach().clone()
            optimizer.step()
        return before, w.detach()

    factor = 0.05 * 2.0
    before, plain = stepped(False)
    update = before * (1 - factor) - plain
    before, cautious = stepped(True)
    agree = (update * before) >= 0
    assert 0.2 < agree.float().mean() < 0.8
    assert torch.allclose(cautious, before - factor * before * agree - update, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Resume, memory, config


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, seq_len=16, tie_embeddings=False))


def _train(model: GPT, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], first_step: int) -> list[float]:
    losses = []
    for step, tokens in enumerate(batches, start=first_step):
        for group in optimizer.param_groups:  # as the trainer does: the LR changes every step
            group["lr"] = group["peak_lr"] * (1 - 0.05 * step)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


OPTIONS = {"normuon": {"name": "normuon"}, "polar_express": {"ns_coefficients": "polar_express"},
           "bf16": {"ns_precision": "bf16"},
           "cautious": {"cautious_weight_decay": True, "muon_weight_decay": 0.2},
           "all": {"name": "normuon", "ns_coefficients": "polar_express", "cautious_weight_decay": True,
                   "muon_weight_decay": 0.2},
           "adamw-cautious": {"name": "adamw", "cautious_weight_decay": True}}


@pytest.mark.parametrize("option", OPTIONS)
def test_checkpoint_round_trip_continues_bit_exactly(tmp_path, option):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 17), generator=g) for _ in range(5)]
    optim = OptimSection(lr=3e-3, muon_lr=0.02, **OPTIONS[option])
    model = _tiny_gpt()
    optimizer = build_optimizer(model, optim, CPU)
    assert isinstance(optimizer, FlopwiseOptimizer)  # torch's AdamW has no cautious decay
    _train(model, optimizer, batches[:2], first_step=0)
    save_checkpoint(tmp_path, 2, model, optimizer, state={}, keep=1)
    expected = _train(model, optimizer, batches[2:], first_step=2)

    resumed_model = _tiny_gpt(seed=1)
    resumed = build_optimizer(resumed_model, optim, CPU)
    load_checkpoint(list_checkpoints(tmp_path)[-1], resumed_model, resumed)
    assert _train(resumed_model, resumed, batches[2:], first_step=2) == expected
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    if optim.name == "normuon":
        assert all("neuron_second_moment" in resumed.state[p] for p in resumed.param_groups[0]["params"])


def test_a_checkpoint_written_before_the_options_existed_loads_with_the_built_settings():
    """Saved groups without ns_coefficients, ns_precision and cautious_weight_decay (as every checkpoint written
    before them):
    torch's load_state_dict would drop the settings from the groups, and the next step would fail."""
    model = _tiny_gpt()
    optimizer = build_optimizer(model, OptimSection(), CPU)
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    _train(model, optimizer, [tokens], first_step=0)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["ns_coefficients"], group["ns_precision"], group["cautious_weight_decay"]
    resumed = build_optimizer(model, OptimSection(), CPU)
    resumed.load_state_dict(saved)
    built = [g["ns_coefficients"] for g in build_optimizer(model, OptimSection(), CPU).param_groups]
    assert [g["ns_coefficients"] for g in resumed.param_groups] == built
    _train(model, resumed, [tokens], first_step=1)


def test_the_memory_estimate_counts_normuons_second_moments_as_the_optimizer_holds_them():
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, seq_len=16, tie_embeddings=False)

    def held(name: str) -> int:
        model = _tiny_gpt()
        optimizer = build_optimizer(model, OptimSection(name=name), CPU)
        _train(model, optimizer, [torch.randint(0, 256, (4, 17))], first_step=0)
        return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor))

    def estimated(name: str) -> int:
        return estimate_memory(cfg, 4, MemoryTraits(), name).optimizer_states

    extra = sum(4 * max(p.shape) for n, p in _tiny_gpt().named_parameters() if n.startswith("layers.") and p.ndim == 2)
    assert held("normuon") - held("muon") == extra == estimated("normuon") - estimated("muon") > 0


def test_a_bad_option_is_one_line_naming_the_key(capsys, tmp_path):
    err = run_error(capsys, ["train", "--budget", "2steps", "--out", str(tmp_path / "r"),
                             "--set", "optim.ns_coefficients=cubic"])
    assert "optim.ns_coefficients" in err and "'newton_schulz' or 'polar_express'" in err
    err = run_error(capsys, ["train", "--budget", "2steps", "--out", str(tmp_path / "r"),
                             "--set", "optim.normuon_beta2=1"])
    assert "optim.normuon_beta2=1: must lie in [0, 1)" in err
    err = run_error(capsys, ["train", "--budget", "2steps", "--out", str(tmp_path / "r"),
                             "--set", "optim.muon_weight_decay=-0.1"])
    assert "optim.muon_weight_decay=-0.1: must be a finite number >= 0" in err


@pytest.mark.slow
def test_training_with_every_option_learns_and_resumes_exactly(tmp_path, text_folder):
    sets = ["optim.name=normuon", "optim.ns_coefficients=polar_express", "optim.cautious_weight_decay=true",
            "optim.muon_weight_decay=0.2"]
    args = ["--data", str(text_folder), *TINY, *[flag for value in sets for flag in ("--set", value)]]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--budget", "8steps", "--out", str(full), *args]) == 0
    assert main(["train", "--budget", "8steps", "--stop-after", "4steps", "--out", str(part), *args]) == 0
    assert main(["train", "--resume", str(part)]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "train"]

    assert losses(full) == losses(part)
    assert losses(full)[-1] < losses(full)[0] - 0.5


@pytest.mark.slow
def test_normuon_and_cautious_decay_under_fsdp_follow_the_single_process_run_and_resume_on_one(tmp_path,
                                                                                             text_folder):
    """FSDP2 holds the matrices as row shards: NorMuon's statistics are computed on the gathered matrix (every
    rank alike, its second moments a whole tensor on each) and the cautious mask on each shard, so two ranks
    follow one process's curve, and their checkpoint resumes on one.  Polar Express runs the same code as
    Newton-Schulz here, but its first step's large coefficients (8.2, -22.5, 15.9) amplify rounding more: the
    two curves' rounding differences grew to 7e-5 by step 10 with it, past this test's 1e-5."""
    sets = ["optim.name=normuon", "optim.ns_coefficients=newton_schulz", "optim.cautious_weight_decay=true",
            "optim.muon_weight_decay=0.2"]
    args = ["--data", str(text_folder), "--budget", "12steps", *TINY,
            *[flag for value in sets for flag in ("--set", value)]]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert main(["train", *args, "--out", str(single)]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "flopwise", "train", *args, "--stop-after", "6steps", "--parallel", "fsdp",
                           "--out", str(sharded)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", "--resume", str(sharded)]) == 0
    ours, theirs = train_events(sharded), train_events(single)
    assert [e["step"] for e in ours] == [e["step"] for e in theirs]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)


def test_a_run_saved_before_polar_express_existed_resumes_with_newton_schulz(tmp_path):
    from flopwise.config import load_config, load_run_config

    old, new = tmp_path / "old", tmp_path / "new"
    for run, optim in ((old, 'name = "muon"'), (new, 'name = "normuon"\nns_coefficients = "polar_express"')):
        run.mkdir()
        (run / "config.toml").write_text(f"[optim]\n{optim}\n")
    assert load_run_config(old).optim.ns_coefficients == "newton_schulz"  # what it trained with
    assert load_run_config(new).optim.ns_coefficients == "polar_express"
    assert load_config(None, []).optim.ns_coefficients == "polar_express"  # a new run's default
