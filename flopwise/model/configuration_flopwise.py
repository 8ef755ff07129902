"""The transformers config of a flopwise model exported with its own modeling code (loaded with
``trust_remote_code=True``; flopwise/model/remote.py writes the folder).

Its ``flopwise`` entry is the model's shape exactly as flopwise trained it (config.py's ModelConfig as a
dict), which modeling_flopwise.py builds the decoder from.  The names transformers' tools read
(``hidden_size``, ``max_position_embeddings``...) are written beside it by the export."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class FlopwiseConfig(PretrainedConfig):
    model_type = "flopwise"

    def __init__(self, flopwise: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # None only where transformers builds a default config to compare a saved one against
        self.flopwise = flopwise
        super().__init__(**kwargs)
