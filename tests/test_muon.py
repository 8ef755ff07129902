"""Muon: Newton-Schulz against the SVD polar factor, its update rule by hand, its AdamW half
against torch.optim.AdamW, and a real training run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flopwise.cli import main
from flopwise.optim.muon import newton_schulz
from flopwise.optim.optimizer import FlopwiseOptimizer
from tests.helpers import TINY


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (48, 12)])
def test_newton_schulz_approximates_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    ns = newton_schulz(g, steps=5)
    singular_values = torch.linalg.svdvals(ns)
    # the quintic iteration leaves singular values in about [0.7, 1.2] rather than exactly at 1 ...
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # ... with the same singular vectors: the update points where the polar factor does
    cosine = (ns * polar).sum() / (ns.norm() * polar.norm())
    assert cosine > 0.98


def test_muon_step_matches_the_rule_by_hand():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 4))
    start = w.detach().clone()
    grads = [torch.randn(12, 4) for _ in range(3)]
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "muon", "lr": 0.1, "weight_decay": 0.01}], momentum=0.9)
    buffer = torch.zeros(12, 4)
    expected = start.clone()
    for g in grads:
        w.grad = g.clone()
        optimizer.step()
        buffer = 0.9 * buffer + 0.1 * g
        nesterov = 0.1 * g + 0.9 * buffer
        expected = expected * (1 - 0.1 * 0.01) - 0.1 * math.sqrt(12 / 4) * newton_schulz(nesterov)
    assert torch.allclose(w.detach(), expected, atol=1e-5)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = FlopwiseOptimizer([{"params": [a], "lr": 1e-2, "weight_decay": 0.1}], betas=(0.8, 0.95), eps=1e-8)
    reference = torch.optim.AdamW([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        FlopwiseOptimizer([{"params": [torch.nn.Parameter(torch.ones(3))], "update": "muon"}])


@pytest.mark.slow
def test_training_with_muon_learns_and_resumes_exactly(tmp_path, text_folder):
    args = ["--data", str(text_folder), *TINY, "--set", "optim.name=muon", "--set", "optim.muon_lr=0.02"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--budget", "20steps", "--out", str(full), *args]) == 0
    assert main(["train", "--budget", "20steps", "--stop-after", "10steps", "--out", str(part), *args]) == 0
    assert main(["train", "--resume", str(part)]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "train"]

    assert losses(full) == losses(part)
    assert losses(full)[-1] < losses(full)[0] - 1.0


def test_batched_orthogonalization_matches_one_matrix_at_a_time():
    """Matrices of one shape up to transposition share one batched iteration; each result is that matrix's
    own Newton-Schulz (to float rounding), in its own orientation."""
    from flopwise.optim.muon import orthogonalize_all

    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(*shape, generator=g) for shape in [(16, 16), (8, 24), (24, 8), (16, 16), (5, 7)]]
    batched = orthogonalize_all(updates, steps=5)
    for update, result in zip(updates, batched):
        assert result.shape == update.shape
        assert torch.allclose(result, newton_schulz(update, steps=5), atol=1e-5)


def test_muon_step_batches_same_shaped_matrices_as_the_rule_by_hand():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(12, 4), (4, 12), (12, 4)]]
    starts = [w.detach().clone() for w in weights]
    optimizer = FlopwiseOptimizer([{"params": weights, "update": "muon", "lr": 0.1}], momentum=0.9, nesterov=False)
    grads = [torch.randn_like(w) for w in weights]
    for w, grad in zip(weights, grads):
        w.grad = grad.clone()
    optimizer.step()
    for w, start, grad in zip(weights, starts, grads):
        rows, cols = w.shape
        expected = start - 0.1 * math.sqrt(max(1, rows / cols)) * newton_schulz(0.1 * grad)
        assert torch.allclose(w.detach(), expected, atol=1e-5)
