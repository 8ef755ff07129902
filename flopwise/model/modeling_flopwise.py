"""A transformers causal LM around flopwise's own decoder, for a model with options that no transformers
architecture computes: the export copies this file, configuration_flopwise.py and the decoder's modules
(gpt.py, config.py) unchanged into the model folder, whose ``config.json`` maps ``AutoModelForCausalLM`` here
(``auto_map``), so the folder loads with ``trust_remote_code=True`` and computes with the very code that
trained it, without flopwise installed (flopwise/model/remote.py).

The weights are the decoder's under ``model.``; a key/value cache is transformers' own (``generate`` makes
one), which the decoder fills through a view per layer; padding is a sequence of its own, as in packed
training (gpt.py ``Packing``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import ModelConfig
from .configuration_flopwise import FlopwiseConfig
from .gpt import GPT, RotaryEmbedding
from .stored import store_block_linears

# transformers 5 calls the key/value cache `cache`; transformers 4 called it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class FlopwiseForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FlopwiseConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: FlopwiseConfig) -> None:
        super().__init__(config)
        self.model = GPT(ModelConfig.from_dict(config.flopwise))
        storage = getattr(config, "flopwise_storage", None)
        if storage:  # block weights stored as integers and scales, dequantized when the model runs
            store_block_linears(self.model, storage["precision"], storage["group"])
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The RoPE tables, which no checkpoint holds (buffers computed from the shape), as the decoder computes
        them; any other module (only a weight missing from the folder) as transformers initializes its own."""
        if isinstance(module, RotaryEmbedding):
            shape = self.model.config
            tables = RotaryEmbedding(shape.head_dim, shape.context, shape.rope_theta)
            with torch.no_grad():
                module.cos.copy_(tables.cos)
                module.sin.copy_(tables.sin)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        """The head; None when it is the embedding (tied), which the decoder reuses by itself."""
        return self.model.lm_head

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs, with the cache's last token taken from ``input_ids``: the token before the new ones,
        right for every row even after beam search reorders the rows (and the cache's keys and values with them)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache, new = inputs.get(_CACHE_FIELD), inputs["input_ids"].shape[1]
        if cache is not None and new < input_ids.shape[1]:
            cache.flopwise_last_token = input_ids[:, -new - 1:-new]
        return inputs

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: DynamicCache | None = None, past_key_values: DynamicCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` [B, T] after the positions the cache holds (and extending it); with ``labels``
        transformers' causal-LM loss (labels shifted inside, -100 ignored).  ``attention_mask``: zeros before or
        after each row's tokens (left or right padding) without a cache."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        layers = None if cache is None else [_LayerView(cache, i) for i in range(self.model.config.n_layers)]
        logits = self.model.logits(input_ids, layers, _padding_segments(attention_mask, cache))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.model.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


class _LayerView:
    """One layer of a transformers cache, as the decoder reads and extends its own LayerCache: its length, its
    keys and values, and (kept on the cache itself) the last token it holds, which the first new token looks
    back to (smear, the bigram hash)."""

    def __init__(self, cache: DynamicCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.index)

    @property
    def last_token(self) -> torch.Tensor | None:
        return getattr(self.cache, "flopwise_last_token", None)

    @last_token.setter
    def last_token(self, token: torch.Tensor) -> None:
        self.cache.flopwise_last_token = token

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.index)


def _padding_segments(attention_mask: torch.Tensor | None, cache: DynamicCache | None) -> torch.Tensor | None:
    """Sequence ids [B, T] that keep each row's tokens apart from its padding (each run of equal mask values is
    one sequence, with positions from 0), or None when nothing is padded.  The cache holds one position count for
    all rows, so a padded batch cannot use it; a mask with holes has no such runs."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if cache is not None:
        raise ValueError("FlopwiseForCausalLM: a padded batch (attention_mask with zeros) cannot use the key/value "
                         "cache: pass use_cache=False, or one sequence at a time")
    changes = (attention_mask[:, 1:] != attention_mask[:, :-1]).long()
    if bool((changes.sum(dim=1) > 1).any()):
        raise ValueError("FlopwiseForCausalLM: attention_mask has zeros between a row's tokens: pad only before "
                         "or after them")
    return torch.cat((torch.zeros_like(changes[:, :1]), changes), dim=1).cumsum(dim=1)
