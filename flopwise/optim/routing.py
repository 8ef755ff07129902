"""Which parameters the optimizer-side methods touch, decided from names and shapes alone (no torch
import), so the optimizer builder and the memory estimator route every parameter the same way."""

from __future__ import annotations


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """A 2-D weight of a transformer block (attention or MLP), which Muon or GaLore updates: not an
    embedding, head, gain or bias, nor a factor of a low-rank or sparse module (``q_proj.B``,
    ``q_proj.lora_A``), which AdamW trains."""
    return ndim == 2 and name.startswith("layers.") and name.endswith(".weight")
