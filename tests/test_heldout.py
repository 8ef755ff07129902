"""Held-out evaluation: the in-run evaluations sample the final evaluation's windows."""

from types import SimpleNamespace

import numpy as np
import torch

from flopwise.evaluate.heldout import Evaluator, heldout_windows
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT


@torch.no_grad()
def mean_loss(model: GPT, windows: np.ndarray) -> float:
    x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    return float(model.per_token_loss(x, y).mean())


def test_a_strided_evaluation_reads_every_kth_final_window_and_keeps_the_domain_mix():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=8)).eval()
    rng = np.random.default_rng(0)
    val = {"code": rng.integers(0, 50, 801), "prose": rng.integers(0, 50, 81)}  # 100 and 10 windows of 8
    corpus = SimpleNamespace(domains=["code", "prose"], val_tokens_by_domain=val.__getitem__,
                             meta={"vocab_size": 50}, train_tokens=rng.integers(0, 50, 500))
    evaluator = Evaluator(corpus, np.ones(50, dtype=np.int64), 8, 4, torch.device("cpu"), torch.float32)

    final = evaluator(model, 320)  # the first 40 code windows, all 10 prose windows
    sampled = evaluator(model, 320, stride=4)  # code windows 0, 4, ..., 36; prose windows 0, 4, 8
    code, prose = heldout_windows(val["code"], 8, 320), heldout_windows(val["prose"], 8, 320)
    assert final["domains"]["code"]["tokens"] == 320 and final["domains"]["prose"]["tokens"] == 80
    assert sampled["domains"]["code"]["tokens"] == 80 and sampled["domains"]["prose"]["tokens"] == 24
    assert np.isclose(final["domains"]["code"]["loss"], mean_loss(model, code), atol=1e-5)
    assert np.isclose(sampled["domains"]["code"]["loss"], mean_loss(model, code[::4]), atol=1e-5)
    assert np.isclose(sampled["domains"]["prose"]["loss"], mean_loss(model, prose[[0, 4, 8]]), atol=1e-5)
    # prose is 20% of both, as in the final evaluation (the first 80 tokens of each would make it 50%)
    assert final["domains"]["prose"]["tokens"] / final["tokens"] == 0.2
    assert abs(sampled["domains"]["prose"]["tokens"] / sampled["tokens"] - 0.2) < 0.04
    assert evaluator(model, 320, stride=1) == final
