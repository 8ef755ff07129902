"""Checkpoints: exact round trip, atomic writes, pruning that keeps the pinned one."""

from __future__ import annotations

import pytest
import torch

import flopwise.train.checkpoint as ckpt
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def step(model, optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 16), generator=g)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_round_trip_continues_identically(tmp_path):
    model, optimizer = make()
    for i in range(3):
        step(model, optimizer, i)
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, {"note": "x"}, keep=2)
    expected = [step(model, optimizer, i) for i in range(3, 6)]

    fresh, fresh_opt = make(seed=1)
    info = ckpt.list_checkpoints(tmp_path)[-1]
    state = ckpt.load_checkpoint(info, fresh, fresh_opt)
    assert state["note"] == "x" and info.step == 3
    assert [step(fresh, fresh_opt, i) for i in range(3, 6)] == expected
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = make()
    step(model, optimizer, 0)
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=3)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {}, keep=3)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [1]
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {}, keep=3)
    assert not list(tmp_path.glob(".tmp-*"))  # the half-written folder was cleaned up
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [1, 2]


def test_keep_last_k_but_never_the_pinned_one(tmp_path):
    model, optimizer = make()
    step(model, optimizer, 0)
    for number in range(1, 7):
        ckpt.save_checkpoint(tmp_path, number, model, optimizer, {"pinned": number == 2}, keep=2)
    kept = ckpt.list_checkpoints(tmp_path)
    assert [info.step for info in kept] == [2, 5, 6]
    assert [info.pinned for info in kept] == [True, False, False]


def test_a_checkpoint_without_its_manifest_is_skipped_for_the_newest_intact_one(tmp_path):
    """Every checkpoint flopwise writes has a manifest: one without it is unverified, so treated as damaged,
    even where its other files were damaged too (safetensors would fail on them mid-load)."""
    model, optimizer = make()
    step(model, optimizer, 0)
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {}, keep=3)
    (newest / "manifest.json").unlink()
    optimizer_file = newest / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    said = []
    chosen = ckpt.newest_intact(tmp_path.parent, ckpt.list_checkpoints(tmp_path), said.append)
    assert chosen.step == 1
    assert said == [f"checkpoint '{newest}' is corrupt (no manifest.json, so it cannot be verified): skipping it"]
    fresh, fresh_opt = make(seed=1)
    ckpt.load_checkpoint(chosen, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
