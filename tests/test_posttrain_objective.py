"""The SFT objective through the training loop's own step: it learns the assistant's replies and nothing else."""

from __future__ import annotations

import numpy as np
import torch

from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.posttrain.objective import SFTObjective
from flopwise.posttrain.sampler import ConversationSampler, Rendered
from flopwise.runtime import Ranks
from flopwise.train.trainer import train_step
from tests.helpers import stack_of

CPU = torch.device("cpu")


def conversations() -> list[Rendered]:
    """A prompt of random tokens, then a fixed reply (the targets)."""
    rng = np.random.default_rng(0)
    result = []
    for index in range(12):
        prompt = rng.integers(10, 40, size=int(rng.integers(3, 8)))
        reply = np.array([5, 6, 7, 8])
        ids = np.concatenate([prompt, reply])
        mask = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(reply), bool)])
        result.append(Rendered(ids.astype(np.int64), mask, source=0))
    return result


def test_train_step_with_the_sft_objective_learns_the_reply_and_not_the_prompt():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, seq_len=24))
    sampler = ConversationSampler(conversations(), seq_len=24, batch_size=4, seed=0, pack=True, pad_id=0)
    objective = SFTObjective(sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = train_step(model, optimizer, stack_of(), 1, 1.0, CPU, torch.float32, Ranks(), objective)
    for _ in range(40):
        last = train_step(model, optimizer, stack_of(), 1, 1.0, CPU, torch.float32, Ranks(), objective)
    assert last < first / 4  # the fixed reply is learnable; the random prompts are not trained on
    batch = sampler.next_batch()
    with torch.no_grad():
        loss, _ = objective.loss(model, batch, CPU, torch.float32)
        logits = model(batch.inputs, segments=batch.segments)[0]
    predicted = logits.argmax(-1)[batch.mask]
    assert torch.equal(predicted, batch.targets[batch.mask])  # every reply token right
    assert loss.item() < 0.5
