"""Distillation (flopwise/methods/distill.py): the KD term and its weight schedule match an independent computation
in pretraining (per sequence) and in SFT (per assistant token), the teacher's forwards are metered and planned,
its memory is estimated, bad settings are one-line refusals, and real runs train, resume exactly and stop at a
FLOP budget that counts the teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.data.sampler import Batch
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.memory.estimate import estimate_memory
from flopwise.methods.base import RunResources
from flopwise.methods.distill import DistillConfig, weight_at
from flopwise.methods.stack import MethodStack, memory_traits
from flopwise.model.config import ModelConfig
from flopwise.model.flops import count_parameters
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder
from flopwise.posttrain.objective import SFTObjective
from flopwise.posttrain.sampler import SFTBatch
from flopwise.runtime import Ranks
from tests.helpers import TINY, losses, run_error, train, train_events

CPU = torch.device("cpu")
SEQ, VOCAB = 16, 257


def tiny_model(seed: int, d_model: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=VOCAB, d_model=d_model, n_layers=2, n_heads=2, seq_len=SEQ)).eval()


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory) -> tuple[GPT, Path]:
    """A tiny random teacher (wider than the student) saved as a Hugging Face folder with the byte tokenizer."""
    model = tiny_model(seed=7, d_model=48)
    folder = tmp_path_factory.mktemp("distill-teacher") / "hf"
    save_hf_folder(model, byte_tokenizer(), folder)
    return model, folder


def stack_with(folder: Path, **settings: float) -> MethodStack:
    """The methods of a config using distill from ``folder``, set up as a run sets them up."""
    values = {"methods.distill.teacher": str(folder), **{f"methods.distill.{k}": v for k, v in settings.items()}}
    methods = MethodStack(load_config(values=values, methods=["distill"]).methods)
    methods.setup(RunResources(None, [], SEQ, byte_tokenizer().to_json(), VOCAB, CPU, torch.float32, Ranks(),
                               print))
    return methods


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> np.ndarray:
    """KL(teacher_t || student_t) * t^2 of every position [B, T], position by position in float64."""
    s, q = student.detach().double().numpy(), teacher.detach().double().numpy()
    out = np.zeros(s.shape[:2])
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            p_t = np.exp(q[b, i] / t - np.max(q[b, i] / t))
            p_t /= p_t.sum()
            p_s = np.exp(s[b, i] / t - np.max(s[b, i] / t))
            p_s /= p_s.sum()
            out[b, i] = sum(a * (math.log(a) - math.log(c)) for a, c in zip(p_t, p_s) if a > 0) * t * t
    return out


def token_ids(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_weight_is_linear_in_progress_or_constant():
    ramp = DistillConfig(teacher="t", weight=0.2, weight_end=0.8)
    assert [weight_at(p, ramp) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([0.2, 0.35, 0.5, 0.8])
    constant = DistillConfig(teacher="t", weight=0.3)
    assert [weight_at(p, constant) for p in (0.0, 0.6, 1.0)] == [0.3, 0.3, 0.3]
    defaults = DistillConfig(teacher="t")
    assert (defaults.weight, defaults.weight_end, defaults.temperature) == (1.0, None, 1.0)  # Minitron: KD only


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_pretraining_loss_mixes_the_kl_by_hand_and_meters_the_teacher(saved_teacher, p):
    teacher_model, folder = saved_teacher
    methods = stack_with(folder, weight=0.2, weight_end=0.8, temperature=2.0)
    methods.on_progress(3, p)
    student = tiny_model(seed=1)
    x, y = token_ids(3, seed=2)
    total, plain = methods.loss(student, Batch(x, y, torch.zeros(3, dtype=torch.long)), CPU, torch.float32)
    with torch.no_grad():
        logits, teacher_logits = student(x)[0], teacher_model(x)[0]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none").view(3, SEQ).double()
    w = 0.2 + 0.6 * p
    expected = ((1 - w) * ce.mean(1).numpy() + w * kl_by_hand(logits, teacher_logits, 2.0).mean(1)).mean()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert plain.item() == pytest.approx(ce.mean().item(), rel=1e-6)  # the logged loss stays the cross-entropy
    total.backward()
    forward = 2 * (sum(m.weight.numel() for m in teacher_model.layers.modules() if isinstance(m, torch.nn.Linear))
                   + VOCAB * 48) + 4 * 2 * 48 * SEQ  # matmuls (tied head) and attention, per token
    assert methods.take_extra_flops() == forward * 3 * SEQ and methods.take_extra_flops() == 0
    assert methods.expected_extra_flops(100) == forward * 100


def test_sft_term_is_averaged_over_the_assistant_tokens_only(saved_teacher):
    teacher_model, folder = saved_teacher
    methods = stack_with(folder, weight=0.5, temperature=2.0)
    methods.on_progress(0, 0.3)
    student = tiny_model(seed=1)
    x, y = token_ids(2, seed=3)
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    mask[0, 5:9], mask[1, 10:] = True, True
    batch = SFTBatch(x, y, mask, None, torch.zeros(2, SEQ, dtype=torch.long))
    total, plain = SFTObjective(None, Ranks(), methods).loss(student, batch, CPU, torch.float32)
    with torch.no_grad():
        logits, teacher_logits = student(x)[0], teacher_model(x)[0]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none").view(2, SEQ).double().numpy()
    mixed = 0.5 * ce + 0.5 * kl_by_hand(logits, teacher_logits, 2.0)
    chosen = mask.numpy()
    assert total.item() == pytest.approx(mixed[chosen].mean(), rel=1e-5)
    assert plain.item() == pytest.approx(ce[chosen].mean(), rel=1e-6)
    without = SFTObjective(None, Ranks()).loss(student, batch, CPU, torch.float32)[0]
    assert without.item() == pytest.approx(plain.item(), rel=1e-6)


def test_memory_counts_the_teachers_weights_and_logits(saved_teacher):
    teacher_model, folder = saved_teacher
    config = load_config(values={"methods.distill.teacher": str(folder)}, methods=["distill"])
    student = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, seq_len=SEQ)
    plain = estimate_memory(student, 4, memory_traits([], config.methods, student), "adamw")
    taught = estimate_memory(student, 4, memory_traits(["distill"], config.methods, student), "adamw")
    assert taught.weights - plain.weights == 4 * count_parameters(teacher_model.config)["total"]
    assert taught.buffers - plain.buffers == 3 * 4 * SEQ * VOCAB * 4  # teacher logits, its softmax, log-softmax


# -- through the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting,message", [
    ("methods.distill.weight=1.5", "methods.distill.weight=1.5: must lie in [0, 1]"),
    ("methods.distill.weight_end=-0.1", "methods.distill.weight_end=-0.1: must lie in [0, 1]"),
    ("methods.distill.temperature=0", "methods.distill.temperature=0"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, setting, message, capsys):
    err = run_error(capsys, ["train", "--budget", "2steps", "--distill-from", str(tmp_path), "--set", setting,
                             "--out", str(tmp_path / "x")])
    assert message in err
    assert not (tmp_path / "x").exists()


def test_a_missing_teacher_is_one_line_exit_2(tmp_path, capsys):
    err = run_error(capsys, ["train", "--budget", "2steps", "--method", "distill", "--out", str(tmp_path / "x")])
    assert "methods.use 'distill' needs methods.distill.teacher" in err and "--distill-from RUN" in err
    err = run_error(capsys, ["train", "--budget", "2steps", "--distill-from", str(tmp_path / "none"),
                             "--out", str(tmp_path / "y")])
    assert f"methods.distill.teacher='{tmp_path / 'none'}' is not a folder" in err


def test_salt_and_distill_are_refused_together(tmp_path, capsys):
    err = run_error(capsys, ["train", "--budget", "2steps", "--distill-from", str(tmp_path), "--teacher",
                             str(tmp_path), "--out", str(tmp_path / "x")])
    assert "methods.use cannot combine 'salt' and 'distill'" in err


# -- real runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, text_folder) -> Path:
    """A finished tiny run (byte tokenizer) on the text folder, wider than the students below."""
    run = tmp_path_factory.mktemp("distill") / "teacher"
    assert train(*TINY, "--data", str(text_folder), "--set", "model.d_model=96", "--budget", "20steps",
                 "--out", str(run)) == 0
    return run


def student_args(text_folder: Path) -> list[str]:
    return [*TINY, "--data", str(text_folder), "--set", "model.d_model=64"]


def test_another_vocabulary_is_refused_in_one_line(tmp_path, text_folder, saved_teacher, capsys):
    folder = saved_teacher[1]  # byte tokenizer; the student trains a BPE one
    err = run_error(capsys, ["train", "--data", str(text_folder), "--budget", "2steps", "--set", "model.size=tiny",
                             "--set", "data.vocab_size=300", "--method", "distill", "--set",
                             f"methods.distill.teacher={folder}", "--out", str(tmp_path / "x")])
    assert err.startswith(f"flopwise: error: methods.distill.teacher='{folder}' uses a different tokenizer")


@pytest.mark.slow
def test_pretraining_distills_resumes_exactly_and_meters_the_teacher(tmp_path, text_folder, teacher_run):
    args = [*student_args(text_folder), "--distill-from", str(teacher_run), "--set", "methods.distill.weight=0.5",
            "--budget", "8steps"]
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "3steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)  # bit for bit
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert train(*student_args(text_folder), "--budget", "8steps", "--out", str(plain)) == 0
    assert losses(full)[0] == (1, pytest.approx(losses(plain)[0][1], rel=1e-6))  # the logged loss: the cross-entropy
    assert losses(full)[1:] != losses(plain)[1:]  # the teacher's term moved the weights
    teacher_forward = json.loads((teacher_run / "plan.json").read_text())["flops_per_token"] / 3  # training = 3x
    per_step = teacher_forward * 4 * 64
    assert train_events(full)[-1]["flops"] - train_events(plain)[-1]["flops"] == pytest.approx(8 * per_step)
    assert json.loads((full / "plan.json").read_text())["method_flops_per_step"] == pytest.approx(per_step)


@pytest.mark.slow
def test_a_flop_budget_counts_the_teachers_forwards(tmp_path, text_folder, teacher_run):
    """Student and teacher together afford 6 steps: the run takes 6, on the schedule a 6-step budget gives (the
    teacher's FLOPs were planned, not only metered), where plain training takes more."""
    teacher_step = json.loads((teacher_run / "plan.json").read_text())["flops_per_token"] / 3 * 4 * 64
    stepped, taught, plain = tmp_path / "stepped", tmp_path / "taught", tmp_path / "plain"
    distill = [*student_args(text_folder), "--distill-from", str(teacher_run)]
    assert train(*distill, "--budget", "6steps", "--out", str(stepped)) == 0
    student_step = json.loads((stepped / "plan.json").read_text())["flops_per_step"]
    budget = f"budget.flops={6 * (student_step + teacher_step)!r}"
    assert train(*distill, "--set", budget, "--out", str(taught)) == 0
    assert [e["lr"] for e in train_events(taught)] == [e["lr"] for e in train_events(stepped)]
    assert train(*student_args(text_folder), "--set", budget, "--out", str(plain)) == 0
    assert losses(plain)[-1][0] == math.ceil(6 * (student_step + teacher_step) / student_step)  # 10


SFT = ["sft", "--set", "optim.batch_size=4", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def sft_teacher(base, tmp_path_factory) -> Path:
    """An SFT run of ``base``: the same tokenizer as any other SFT of it (base + the chat tokens)."""
    teacher = tmp_path_factory.mktemp("distill-sft") / "teacher"
    assert main([*SFT, "--init-from", str(base), "--budget", "6steps", "--out", str(teacher)]) == 0
    return teacher


@pytest.mark.slow
def test_sft_distills_over_assistant_tokens_and_dpo_refuses_it(tmp_path, base, sft_teacher, capsys):
    plain, taught = tmp_path / "plain", tmp_path / "taught"
    common = [*SFT, "--init-from", str(base), "--budget", "4steps"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--distill-from", str(sft_teacher), "--out", str(taught)]) == 0
    assert losses(taught)[0] == losses(plain)[0] and losses(taught)[1:] != losses(plain)[1:]
    step = json.loads((sft_teacher / "plan.json").read_text())["flops_per_step"]  # same shape: 3 x its forward
    assert train_events(taught)[-1]["flops"] - train_events(plain)[-1]["flops"] == pytest.approx(4 * step / 3)
    err = run_error(capsys, ["dpo", "--init-from", str(sft_teacher), "--budget", "2steps", "--method", "distill",
                             "--set", f"methods.distill.teacher={sft_teacher}", "--out", str(tmp_path / "dpo")])
    assert "'distill' applies to the pretrain and sft stage only, not to dpo" in err


@pytest.mark.slow
def test_sft_with_a_teacher_resumes_bit_for_bit(tmp_path, base, sft_teacher):
    common = [*SFT, "--init-from", str(base), "--budget", "6steps", "--distill-from", str(sft_teacher),
              "--set", "methods.distill.weight=0.5", "--set", "methods.distill.weight_end=1.0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--stop-after", "2steps", "--out", str(parts)]) == 0
    assert main(["sft", "--resume", str(parts)]) == 0
    assert losses(parts) == losses(whole)
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(parts / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
