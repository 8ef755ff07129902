"""SALT (flopwise/methods/salt.py): the teacher loads exactly and refuses what it cannot use, the KD term
matches an independent computation, the schedule and the SALT_DS selection behave as documented."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer

from flopwise.config import load_config
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.methods.salt import FIELD, SaltConfig, distillation_loss, kd_weight_at, select_windows, selecting_at
from flopwise.methods.teacher import Teacher
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder

CPU = torch.device("cpu")
SEQ = 16


def tiny_model(seed: int = 0, vocab: int = 257) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, seq_len=SEQ)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[GPT, Path]:
    model = tiny_model()
    folder = tmp_path_factory.mktemp("teacher") / "hf"
    save_hf_folder(model, byte_tokenizer(), folder)
    return model, folder


def tokens(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 257, (batch, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def load(folder: Path | str, vocab: int = 257, tokenizer_json: str | None = None) -> Teacher:
    return Teacher.load(str(folder), vocab, CPU, tokenizer_json or byte_tokenizer().to_json(), seq_len=SEQ,
                        field=FIELD)


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(FlopwiseError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "salt.teacher" in message
    for needle in needles:
        assert needle in message
    return message


def test_teacher_logits_equal_the_saved_model(saved):
    model, folder = saved
    teacher = load(folder)
    x, y = tokens()
    with torch.no_grad():
        expected = model(x)[0]
    torch.testing.assert_close(teacher.logits(x), expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training and not teacher.logits(x).requires_grad
    losses = F.cross_entropy(expected.reshape(-1, 257), y.reshape(-1), reduction="none").view(y.shape).mean(-1)
    torch.testing.assert_close(teacher.sequence_losses(x, y), losses, rtol=1e-6, atol=1e-6)
    assert teacher.sequence_losses(x, y).shape == (3,)


def test_teacher_flops_per_token_counts_a_forward(saved):
    model, folder = saved
    teacher = load(folder)
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    matmul += cfg.vocab_size * cfg.d_model  # the (tied) head
    assert teacher.flops_per_token == 2 * matmul + 4 * cfg.n_layers * cfg.d_model * SEQ
    assert teacher.num_parameters == model.num_parameters()


def test_run_folder_uses_final_and_pads_a_larger_student_vocab(saved, tmp_path):
    model, folder = saved
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("", encoding="utf-8")
    one_line_error(lambda: load(run), "final/")
    save_hf_folder(model, byte_tokenizer(), run / "final")
    teacher = load(run, vocab=320)
    x, _ = tokens()
    logits = teacher.logits(x)
    assert logits.shape == (3, SEQ, 320)
    torch.testing.assert_close(logits[..., :257], model(x)[0].detach(), rtol=0, atol=1e-6)
    assert torch.isneginf(logits[..., 257:]).all()


def test_run_folder_of_a_gpt2_style_model_uses_its_plan(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, seq_len=SEQ, mlp="gelu", norm="layer",
                      positions="learned", bias=True)
    model = GPT(cfg).eval()
    run = tmp_path / "run"
    save_hf_folder(model, byte_tokenizer(), run / "final")
    (run / "final" / "config.json").unlink()  # as runs before the remote-code export left it: weights only
    (run / "config.toml").write_text("", encoding="utf-8")
    (run / "plan.json").write_text(json.dumps({"model": cfg.to_dict()}), encoding="utf-8")
    teacher = load(run)
    x, _ = tokens()
    torch.testing.assert_close(teacher.logits(x), model(x)[0].detach(), rtol=0, atol=1e-6)
    with pytest.raises(FlopwiseError, match="shorter than"):
        Teacher.load(str(run), 257, CPU, byte_tokenizer().to_json(), seq_len=2 * SEQ, field=FIELD)


def test_refuses_missing_folder_and_pickles(saved, tmp_path):
    one_line_error(lambda: load(tmp_path / "nowhere"), "not a folder")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bin_only / name).write_bytes((saved[1] / name).read_bytes())
    (bin_only / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    one_line_error(lambda: load(bin_only), "safetensors")
    (bin_only / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    one_line_error(lambda: load(bin_only), "config.json")


def test_refuses_another_tokenizer_or_vocab(saved):
    _, folder = saved
    other = HFTokenizer.from_str(byte_tokenizer().to_json())
    other.add_special_tokens(["<pad>"])
    one_line_error(lambda: load(folder, vocab=258, tokenizer_json=other.to_str()), "same data.tokenizer")
    one_line_error(lambda: load(folder, vocab=200), "same data.tokenizer")
    # the same tokenizer written differently is the same tokenizer
    reformatted = json.dumps(json.loads(byte_tokenizer().to_json()), indent=2, sort_keys=True)
    assert load(folder, tokenizer_json=reformatted).vocab_size == 257


def test_refuses_a_teacher_without_tokenizer(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "hf"
    save_hf_folder(model, byte_tokenizer(), folder)
    (folder / "tokenizer.json").unlink()
    one_line_error(lambda: load(folder), "tokenizer.json")


def kl_float64(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_q = torch.log_softmax(student.double() / t, -1)
    log_p = torch.log_softmax(teacher.double() / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1) * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_loss_is_the_token_kl(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), 3 * torch.randn(2, 5, 11, generator=g)
    loss = distillation_loss(student, teacher, temperature)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss.double(), kl_float64(student, teacher, temperature), rtol=1e-5, atol=1e-6)
    by_kl_div = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                         reduction="none", log_target=True).sum(-1).mean(-1) * temperature ** 2
    torch.testing.assert_close(loss, by_kl_div, rtol=1e-5, atol=1e-6)
    assert distillation_loss(teacher, teacher, temperature).abs().max() < 1e-5


def test_distillation_gradient_reaches_the_student_only():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    distillation_loss(student, teacher, 1.0).sum().backward()
    assert teacher.grad is None
    # d KL / d student logits = (softmax(student) - softmax(teacher)) / positions
    expected = (F.softmax(student.detach(), -1) - F.softmax(teacher.detach(), -1)) / 4
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-6)


def test_distillation_ignores_ids_the_teacher_lacks():
    student = torch.randn(1, 3, 6)
    teacher = torch.cat([torch.randn(1, 3, 4), torch.full((1, 3, 2), -math.inf)], dim=-1)
    loss = distillation_loss(student, teacher, 1.0)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), kl_float64(student, teacher.clamp(min=-1e4), 1.0), rtol=1e-5,
                               atol=1e-6)


def test_kd_weight_follows_a_step_schedule():
    s = SaltConfig(teacher="t")
    assert s.kd_until == pytest.approx(36 / 208)
    assert kd_weight_at(0.0, s) == s.kd_weight == pytest.approx(2 / 3)
    assert kd_weight_at(s.kd_until - 1e-9, s) == s.kd_weight
    assert kd_weight_at(s.kd_until, s) == 0.0 and kd_weight_at(1.0, s) == 0.0
    custom = SaltConfig(teacher="t", kd_weight=0.25, kd_until=0.5)
    assert [kd_weight_at(p, custom) for p in (0.1, 0.49, 0.5, 0.9)] == [0.25, 0.25, 0.0, 0.0]
    assert not selecting_at(0.0, s)
    pooled = SaltConfig(teacher="t", select_pool=2.0, kd_until=0.5)
    assert selecting_at(0.2, pooled) and not selecting_at(0.5, pooled)
    assert pooled.pool_size(8) == 16 and SaltConfig(teacher="t", select_pool=1.5).pool_size(3) == 5
    assert s.pool_size(8) == 8


@pytest.mark.parametrize("field,value", [("kd_weight", 1.5), ("kd_until", -0.1), ("temperature", 0.0),
                                         ("select_pool", 0.5), ("select_top_k", 0)])
def test_settings_refuse_bad_values(field, value):
    with pytest.raises(FlopwiseError, match=f"salt.{field}={value}: must"):
        load_config(None, ["methods.salt.teacher=t", f"methods.salt.{field}={value}"])


def test_select_windows_keeps_the_highest_scores():
    s = SaltConfig(teacher="t", select_pool=2.0)
    scores = torch.tensor([0.5, 3.0, float("nan"), 2.0, 3.0, 0.1])
    assert select_windows(scores, 3, s).tolist() == [1, 3, 4]
    assert select_windows(scores, 1, s).tolist() == [1]  # a tie goes to the earlier candidate
    assert select_windows(scores, 6, s).tolist() == list(range(6))
    assert 2 not in select_windows(scores, 5, s).tolist()  # nothing learnable ranks last
    for keep in (0, 7):
        with pytest.raises(ValueError):
            select_windows(scores, keep, s)


def test_selection_scores_median_over_learnable_tokens():
    # vocab 4, top-2: target ranks per position are 0, 1, 2, 3 -> only the first two count
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0]] * 4])
    y = torch.tensor([[0, 1, 2, 3]])
    losses = F.cross_entropy(logits[0], y[0], reduction="none")
    score = Teacher.scores_from_logits(logits, y, top_k=2)
    assert score.item() == pytest.approx(losses[0].item())  # lower median of two values
    assert Teacher.scores_from_logits(logits, y, top_k=3).item() == pytest.approx(losses[1].item())
    assert Teacher.scores_from_logits(logits, torch.tensor([[3, 3, 3, 3]]), top_k=2).isnan().all()
    # a hard-but-learnable window outranks an easy one and an unlearnable one
    easy = torch.tensor([[[9.0, 0.0, 0.0, 0.0]] * 4])
    hard = torch.tensor([[[1.0, 0.9, 0.0, 0.0]] * 4])
    unlearnable = torch.tensor([[[9.0, 2.0, 1.0, 0.0]] * 4])
    batch = torch.cat([easy, hard, unlearnable])
    targets = torch.tensor([[0] * 4, [1] * 4, [3] * 4])
    scores = Teacher.scores_from_logits(batch, targets, top_k=2)
    assert select_windows(scores, 1, SaltConfig(teacher="t")).tolist() == [1]


def test_teacher_selection_scores_run_on_the_model(saved):
    _, folder = saved
    teacher = load(folder)
    x, y = tokens(4)
    scores = teacher.selection_scores(x, y, top_k=257)  # every token learnable: the median loss
    losses = F.cross_entropy(teacher.logits(x).reshape(-1, 257), y.reshape(-1), reduction="none").view(4, SEQ)
    torch.testing.assert_close(scores, losses.median(-1).values, rtol=1e-6, atol=1e-6)
