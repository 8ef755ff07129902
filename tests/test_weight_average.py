"""Weight averaging (flopwise/methods/weight_average.py): the EMA and the uniform mean against independent
computations, where averaging starts, the restart at a change of depth, the final weights, the checkpointed
average, its memory, its refusal under FSDP, and real runs: final/ is the mean of the averaged steps' weights,
and a run with every new option of the speed recipe resumes bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flopwise.errors import FlopwiseError
from flopwise.evaluate.load import load_final_model
from flopwise.memory.estimate import estimate_memory
from flopwise.methods.base import StepShape, World
from flopwise.methods.stack import memory_traits
from flopwise.methods.weight_average import WeightAverage
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from tests.helpers import TINY, config_with, losses, resolved_with, train, train_events

P = [0.1, 0.3, 0.5, 0.55, 0.7, 0.72, 0.9, 1.0]  # budget progress of eight steps; averaging starts after 0.5


def averaged_run(kind: str, start: float = 0.5, half_life: float = 0.1, shapes: list[int] | None = None
                 ) -> tuple[WeightAverage, torch.nn.Linear, list[np.ndarray]]:
    """Eight steps of a 3x2 Linear whose weights are set to a seeded random matrix before each step ends."""
    method = WeightAverage(WeightAverage.Config(kind=kind, start=start, half_life=half_life))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.configure(model)
    rng = np.random.default_rng(0)
    weights = []
    for step, p in enumerate(P):
        method.reshape(StepShape(4, 8, (shapes or [2] * len(P))[step]), model, optimizer)
        method.on_progress(step, p)
        w = rng.standard_normal((2, 3))
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w))
        weights.append(w.astype(np.float32).astype(np.float64))
        method.after_step(step + 1, model, optimizer)
    return method, model, weights


def test_the_ema_weighs_each_step_by_the_half_lives_of_progress_after_it():
    method, _, weights = averaged_run("ema", half_life=0.1)
    averaged = [(p, w) for p, w in zip(P, weights) if p > 0.5]  # from 0.55 on; 0.5 itself is not after the start
    # each step's share: (1 - 0.5 ** (gap before it / half-life)), then halved per half-life of progress after it
    expected = np.zeros((2, 3))
    for index, (p, w) in enumerate(averaged):
        share = 1.0 if index == 0 else 1 - 0.5 ** ((p - averaged[index - 1][0]) / 0.1)
        expected += share * 0.5 ** ((1.0 - p) / 0.1) * w
    np.testing.assert_allclose(method.average["weight"].numpy(), expected, rtol=1e-5)
    assert method.count == 5 and (method.first_p, method.last_p) == (0.55, 1.0)
    assert method.average["weight"].dtype == torch.float32


def test_the_uniform_average_is_the_mean_of_the_steps_after_the_start():
    method, model, weights = averaged_run("uniform", start=0.6)
    expected = np.mean([w for p, w in zip(P, weights) if p > 0.6], axis=0)
    np.testing.assert_allclose(method.average["weight"].numpy(), expected, rtol=1e-5)
    method.finish(model)
    torch.testing.assert_close(model.weight.detach().double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def test_a_change_of_depth_restarts_the_average_from_the_grown_weights():
    method, _, weights = averaged_run("uniform", shapes=[1, 1, 1, 1, 1, 2, 2, 2])  # grown before the step at 0.72
    np.testing.assert_allclose(method.average["weight"].numpy(), np.mean(weights[5:], axis=0), rtol=1e-5)
    assert method.count == 3 and method.first_p == 0.72


def test_the_final_weights_keep_the_models_dtype():
    method, model, _ = averaged_run("ema")
    model.to(torch.bfloat16)
    method.finish(model)
    assert model.weight.dtype == torch.bfloat16
    assert torch.equal(model.weight.detach(), method.average["weight"].to(torch.bfloat16))


def test_the_average_round_trips_through_the_checkpoint_state_and_a_missing_one_is_refused():
    method, model, _ = averaged_run("ema")
    state, tensors = json.loads(json.dumps(method.state_dict())), method.tensor_state()
    resumed = WeightAverage(method.config)
    resumed.configure(model)
    resumed.load_state_dict(state)
    resumed.load_tensor_state({name: t.clone() for name, t in tensors.items()})
    assert resumed.state_dict() == method.state_dict()
    assert all(torch.equal(resumed.average[name], method.average[name]) for name in method.average)
    with pytest.raises(FlopwiseError, match="the checkpoint says 5 steps were averaged but holds no weight average"):
        resumed.load_tensor_state({})
    assert WeightAverage(method.config).tensor_state() == {}  # nothing averaged yet: nothing saved


def test_the_memory_estimate_counts_an_fp32_copy_of_the_trained_weights():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16)
    sections = config_with(["weight_average"]).methods
    plain = estimate_memory(cfg, 4, memory_traits([], sections, cfg), "muon")
    averaged = estimate_memory(cfg, 4, memory_traits(["weight_average"], sections, cfg), "muon")
    assert averaged.weights - plain.weights == 4 * GPT(cfg).num_parameters()
    assert averaged.peak - plain.peak == 4 * GPT(cfg).num_parameters()


def test_fsdp_is_refused_in_one_line_and_ddp_is_not():
    with pytest.raises(FlopwiseError, match="methods.use 'weight_average' is not supported with --parallel fsdp"):
        resolved_with(["weight_average"], world=World(2, "fsdp"))
    resolved_with(["weight_average"], world=World(2, "ddp"))


def test_the_start_must_lie_in_the_budget(capsys):
    assert train(*TINY, "--budget", "4steps", "--method", "weight_average",
                 "--set", "methods.weight_average.start=1") == 2
    assert "methods.weight_average.start=1: must lie in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_final_holds_the_mean_of_the_weights_of_the_decay(tmp_path, text_folder):
    """20 steps, decay over the last 0.2: steps 17-20 are averaged.  Their weights: the checkpoints of steps 17-19
    and the final weights of the same run without averaging (which trains identically)."""
    args = [*TINY, "--data", str(text_folder), "--budget", "20steps", "--set", "train.eval_every=0"]
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert train(*args, "--out", str(plain)) == 0
    assert train(*args, "--method", "weight_average", "--set", "methods.weight_average.kind=uniform",
                 "--set", "train.checkpoint_every=0.05", "--set", "train.keep_checkpoints=30",
                 "--out", str(averaged)) == 0
    assert losses(averaged) == losses(plain)  # averaging does not touch training
    steps = [e["step"] for e in train_events(averaged) if e["p_lr"] > 1.0 - 0.2]
    assert steps == [17, 18, 19, 20]
    last, _ = load_final_model(plain, torch.device("cpu"))
    final, _ = load_final_model(averaged, torch.device("cpu"))
    for name, weight in final.state_dict().items():
        saved = [load_file(str(averaged / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))[name]
                 for step in steps[:-1]]
        expected = torch.stack([*saved, last.state_dict()[name]]).double().mean(dim=0)
        torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_with_every_new_option_resumes_bit_for_bit(tmp_path, text_folder):
    """Every option of the speed recipe (issue 37: the model options, multi-token prediction, NorMuon with Polar
    Express and cautious decay, document windows and masks, weight averaging) with the sequence-length schedule and
    depth growth during the average (at 0.9 of 24 steps): interrupted inside the average, before the growth, the
    resumed run repeats the uninterrupted one, its final weights and final evaluation too."""
    options = ["model.value_embeds=true", "model.x0_lambdas=true", "model.unet_skips=true", "model.smear=true",
               "model.logit_softcap=15", "model.bigram_hash=64", "model.mtp_tokens=2", "optim.name=normuon",
               "optim.ns_coefficients=polar_express", "optim.muon_weight_decay=0.05",
               "optim.cautious_weight_decay=true"]
    args = [*TINY, *[flag for value in options for flag in ("--set", value)],
            "--data", str(text_folder), "--budget", "24steps", "--set", "train.eval_every=0.5",
            "--set", "data.windows=doc_start", "--set", "data.doc_mask=true", "--method", "weight_average",
            "--method", "seq_schedule", "--set", "methods.seq_schedule.start=0.25",
            "--set", "methods.seq_schedule.until=0.5", "--method", "grow_depth", "--set", "methods.grow_depth.at=0.9"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "21steps", "--out", str(part)) == 0
    assert (part / "checkpoints" / "step_00000021" / "methods.safetensors").is_file()
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    assert {e["seq_len"] for e in train_events(full)} == {16, 32, 64} and train_events(full)[-1]["depth"] == 2
    for name, tensor in load_file(str(full / "final" / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(part / "final" / "model.safetensors"))[name]), name
    final = [[e["val_loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "eval"][-1] for run in (full, part)]
    assert final[0] == final[1]
