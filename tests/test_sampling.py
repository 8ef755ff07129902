"""Sampling: top-k/top-p filtering against a plain-Python reference, KV-cached decoding against
full recomputation, and the `flopwise sample` command."""

from __future__ import annotations

import math

import pytest
import torch

from flopwise.cli import main
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT, filter_logits, sample_next
from tests.helpers import TINY


def reference_allowed(logits: list[float], temperature: float, top_k: int | None, top_p: float | None) -> set[int]:
    """Token ids kept by top-k then top-p, computed with sorted lists and no torch."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k else order
    if top_p is not None:
        z = sum(math.exp(scaled[i]) for i in kept)
        mass, nucleus = 0.0, []
        for i in kept:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(scaled[i]) / z
        kept = nucleus
    return set(kept)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 0.5), (0.7, None, 0.9), (1.3, 5, 0.8),
                                                     (1.0, 3, None), (1.0, None, 1.0), (2.0, 8, 0.3)])
def test_filter_matches_reference(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 12) * 2
    filtered = filter_logits(logits, temperature, top_k, top_p)
    for row in range(4):
        allowed = {i for i in range(12) if filtered[row, i] != float("-inf")}
        assert allowed == reference_allowed(logits[row].tolist(), temperature, top_k, top_p)
        # kept tokens keep their temperature-scaled logits, so their relative probabilities are unchanged
        for i in allowed:
            assert filtered[row, i].item() == pytest.approx(logits[row, i].item() / temperature, rel=1e-6)


def test_sampling_draws_only_from_the_nucleus_and_greedy_is_argmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, None, 0.75, generator)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there
    assert int(sample_next(logits, 0.0)) == 0


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "seq_len": 16, "qk_norm": True, **overrides})
    return GPT(cfg).eval()


def uncached_greedy(model: GPT, idx: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole window each step (the definition a cache must match)."""
    context = model.config.context
    window, out = idx, []
    for _ in range(steps):
        with torch.no_grad():
            token = model(window)[0][:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
        window = torch.cat((window, token), dim=1)
        if window.shape[1] > context:
            window = window[:, -(context // 2):]  # the cache is rebuilt from the last half of the context
    return out


def test_kv_cache_logits_equal_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    caches = model.new_cache(2)
    with torch.no_grad():
        full = model(idx)[0]
        prefix = model.logits(idx[:, :5], caches)
        steps = [model.logits(idx[:, i:i + 1], caches) for i in range(5, 12)]
    cached = torch.cat([prefix, *steps], dim=1)
    assert (cached - full).abs().max().item() < 1e-5


def test_cached_generation_matches_recomputation_past_the_context():
    model = tiny_model()
    idx = torch.randint(0, 50, (1, 5))
    produced = model.generate(idx, 40, temperature=0)[0, 5:].tolist()  # 45 tokens through a 16-token context
    assert produced == uncached_greedy(model, idx, 40)


def test_sample_command_is_seeded_and_streams(tmp_path, text_folder, capsys):
    run = tmp_path / "r"
    assert main(["train", "--data", str(text_folder), "--budget", "8steps", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        assert main(["sample", str(run), "--prompt", "The ", "--max-tokens", "30", "--top-p", "0.9"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("The ") and len(outputs[0]) > 4
    assert main(["sample", str(run), "--top-p", "1.5"]) == 2
    assert "--top-p 1.5 must lie in (0, 1]" in capsys.readouterr().err
