"""Held-out evaluation: the in-run evaluations sample the final evaluation's windows, fewer while few tokens are
trained."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flopwise.evaluate.heldout import IN_RUN_SHARE, Evaluator, heldout_windows
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.rundir import read_metrics
from tests.helpers import TINY, train


@torch.no_grad()
def mean_loss(model: GPT, windows: np.ndarray) -> float:
    x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    return float(model.per_token_loss(x, y).mean())


def toy_evaluation() -> tuple[GPT, dict[str, np.ndarray], Evaluator]:
    """A model, the held-out tokens of two domains (100 and 10 windows of 8) and their evaluator."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=8)).eval()
    rng = np.random.default_rng(0)
    val = {"code": rng.integers(0, 50, 801), "prose": rng.integers(0, 50, 81)}  # 100 and 10 windows of 8
    corpus = SimpleNamespace(domains=["code", "prose"], val_tokens_by_domain=val.__getitem__,
                             meta={"vocab_size": 50}, train_tokens=rng.integers(0, 50, 500))
    return model, val, Evaluator(corpus, np.ones(50, dtype=np.int64), 8, 4, torch.device("cpu"), torch.float32)


def test_a_strided_evaluation_reads_every_kth_final_window_and_keeps_the_domain_mix():
    model, val, evaluator = toy_evaluation()

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


def test_window_losses_are_the_windows_the_evaluation_reads_each_scored_alone():
    model, val, evaluator = toy_evaluation()
    nats, tokens = evaluator.window_losses(model, 320)
    windows = np.concatenate([heldout_windows(val["code"], 8, 320), heldout_windows(val["prose"], 8, 320)])
    assert len(nats) == len(tokens) == 50 and set(tokens) == {8}
    assert np.allclose(nats / tokens, [mean_loss(model, w[None]) for w in windows], atol=1e-5)
    assert np.isclose(nats.sum() / tokens.sum(), evaluator(model, 320)["loss"], atol=1e-9)


def test_an_evaluation_during_the_run_reads_at_most_its_share_of_the_tokens_trained():
    model, val, evaluator = toy_evaluation()
    # at 320 tokens per domain: 40 code and 10 prose windows of 8; stride k reads ceil(40/k) + ceil(10/k) of them
    tokens = {4: (10 + 3) * 8, 8: (5 + 2) * 8, 16: (3 + 1) * 8, 32: (2 + 1) * 8, 64: (1 + 1) * 8}
    assert evaluator.in_run_stride(320, math.inf) == 4  # the largest sample during a run
    assert evaluator.in_run_stride(320, tokens[4] / IN_RUN_SHARE) == 4
    assert evaluator.in_run_stride(320, (tokens[4] - 1) / IN_RUN_SHARE) == 8
    assert evaluator.in_run_stride(320, (tokens[16] - 1) / IN_RUN_SHARE) == 32
    assert evaluator.in_run_stride(320, 0) == 64  # each domain's first window, however few tokens were trained
    final = evaluator(model, 320)
    for stride, expected in tokens.items():
        sampled = evaluator(model, 320, stride=stride)
        assert sampled["tokens"] == expected and sampled["stride"] == stride
        # the whole evaluation gives its loss on each sample too: the same windows, for a paired comparison
        assert final["by_stride"][stride] == pytest.approx(sampled["loss"], abs=1e-6)
    code = heldout_windows(val["code"], 8, 320)
    assert np.isclose(evaluator(model, 320, stride=16)["domains"]["code"]["loss"],
                      mean_loss(model, code[[0, 16, 32]]), atol=1e-5)  # of the final's windows, and of stride 8's


def test_a_run_evaluates_a_small_sample_during_and_the_whole_one_at_the_end(tmp_path, text_folder, capsys):
    run = tmp_path / "r"
    assert train("--data", str(text_folder), "--budget", "12steps", "--out", str(run), *TINY,
                 "--set", "train.eval_every=0.25") == 0
    evals = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]
    *during, final = evals
    assert final["p"] == 1.0 and final["val_tokens"] == 4 * 2048  # 4 x train.eval_tokens: the held-out split is larger
    assert len(during) == 4  # after step 1, at 1/4, 1/2 and 3/4
    for event in during:  # one window of 64 where the share holds less
        assert event["val_tokens"] <= max(IN_RUN_SHARE * event["tokens"], 64)
    out = capsys.readouterr().out
    assert f"val_loss {final['val_loss']:.4f}  bpb {final['val_bpb']:.4f}  (8,192 tokens)" in out
