"""The held-out assistant-token loss against an independent per-conversation computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.posttrain.heldout import AssistantEvaluator
from flopwise.posttrain.sampler import Rendered


def test_assistant_loss_per_source_equals_each_conversation_scored_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, seq_len=16))
    rng = np.random.default_rng(1)
    conversations = []
    for index in range(7):
        n = int(rng.integers(4, 15))
        mask = np.zeros(n, bool)
        mask[n // 2:] = True
        conversations.append(Rendered(rng.integers(1, 40, n).astype(np.int64), mask, source=index % 2))
    result = AssistantEvaluator(conversations, ["a", "b"], 3, torch.device("cpu"), torch.float32, pad_id=0)(model)
    expected = {0: [0.0, 0], 1: [0.0, 0]}
    with torch.no_grad():
        for c in conversations:
            ids = torch.from_numpy(c.ids)
            log_probs = F.log_softmax(model(ids[None, :-1])[0][0], -1)
            picked = -log_probs.gather(1, ids[1:, None]).squeeze(1)
            keep = torch.from_numpy(c.mask[1:])
            expected[c.source][0] += float(picked[keep].sum())
            expected[c.source][1] += int(keep.sum())
    for source, name in enumerate(["a", "b"]):
        nats, tokens = expected[source]
        assert result["sources"][name]["tokens"] == tokens
        assert result["sources"][name]["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    total_nats = sum(v[0] for v in expected.values())
    total_tokens = sum(v[1] for v in expected.values())
    assert result["loss"] == pytest.approx(total_nats / total_tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert model.training  # put back as it was
