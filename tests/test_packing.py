"""Packed windows: several sequences in one row attend only within themselves, at their own positions."""

from __future__ import annotations

import pytest
import torch

from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT, Packing


@pytest.mark.parametrize("positions, kv_heads", [("rope", None), ("rope", 2), ("learned", None)])
def test_each_packed_sequence_gets_the_logits_it_gets_alone(positions, kv_heads):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, seq_len=24,
                            positions=positions)).eval()
    lengths = [7, 5, 12]
    sequences = [torch.randint(0, 50, (n,)) for n in lengths]
    idx = torch.cat(sequences)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model.logits(idx, segments=segments)[0]
        alone = torch.cat([model.logits(s[None])[0] for s in sequences])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_changing_one_sequence_leaves_the_others_logits_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seq_len=24)).eval()
    idx = torch.randint(0, 50, (2, 20))
    segments = torch.tensor([[0] * 8 + [1] * 12, [0] * 15 + [1] * 5])
    changed = idx.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 50  # inside the first sequence of row 0
    with torch.no_grad():
        before, after = (model.logits(x, segments=segments) for x in (idx, changed))
    assert torch.equal(before[0, 8:], after[0, 8:]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[0, 3:8], after[0, 3:8])


def test_packing_positions_restart_and_mask_is_block_causal():
    packing = Packing.of(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    assert packing.positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = packing.mask[0, 0].int().tolist()
    assert mask[4] == [0, 0, 0, 1, 1, 0] and mask[2] == [1, 1, 1, 0, 0, 0] and mask[5] == [0, 0, 0, 0, 0, 1]
