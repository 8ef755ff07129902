"""Named recipes: sets of config values applied under a config file and ``--set`` overrides.

``default`` is flopwise's own recipe (the config defaults).  ``baseline`` is the classic
GPT-2 small-run setup as nanoGPT's character-level Shakespeare config uses it, run through the
same data, tokenizer, batch and evaluation, so ``flopwise bench`` can measure what the default
buys against a well-known reference.  ``stock`` is the default recipe with a model that a stock
transformers class computes (Llama, or Qwen3 with QK-norm), for users whose tools load no
remote code: every model key that would need flopwise's own modeling code is turned off.
"""

from __future__ import annotations

from typing import Any

from flopwise.errors import FlopwiseError

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "baseline": {
        # GPT-2 architecture: learned absolute positions, LayerNorm, GELU MLP 4x, biases, tied embeddings
        "model.positions": "learned", "model.norm": "layer", "model.mlp": "gelu", "model.bias": True,
        "model.tie_embeddings": True, "model.qk_norm": False, "model.zero_init_out": False,
        # nanoGPT shakespeare_char: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, grad clip 1,
        # 100 of 5000 iterations of linear warmup, then cosine to min_lr = lr / 10; no dropout
        "optim.name": "adamw", "optim.lr": 1e-3, "optim.beta1": 0.9, "optim.beta2": 0.99,
        "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
        "schedule.name": "cosine", "schedule.warmup": 0.02, "schedule.final_lr_frac": 0.1,
        # one shape for the whole run, as nanoGPT trains
        "methods.progressive": False,
    },
}
# RoPE, RMSNorm, SwiGLU, no biases: the layout Llama and Qwen3 compute (ModelConfig.stock_architecture)
STOCK_MODEL = {"model.positions": "rope", "model.norm": "rms", "model.mlp": "swiglu", "model.bias": False,
               "model.value_embeds": False, "model.x0_lambdas": False, "model.unet_skips": False,
               "model.smear": False, "model.logit_softcap": 0.0, "model.bigram_hash": 0}
RECIPES["stock"] = {**RECIPES["default"], **STOCK_MODEL}


def recipe_values(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise FlopwiseError(f"--recipe '{name}' is unknown: choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])
