"""Screening the speed-recipe pieces of issue 37 (the speedrun anchors' model options, document windows and
masks, weight averaging, the Muon variants) at one seconds budget, each added alone to the default recipe and
in combinations; the harness is bench/screen.py (one core and one thread per run, two at a time).

    python bench/recipe_screen.py --seconds 22.5 --seeds 0 1 --out bench/results/recipe_screen.json
"""

from __future__ import annotations

from pathlib import Path

from screen import main

HERE = Path(__file__).parent
MODEL = ["model.value_embeds=true", "model.bigram_hash=20480", "model.unet_skips=true", "model.smear=true"]
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "value_embeds": ["model.value_embeds=true"],
    "bigram_hash 5x vocab": ["model.bigram_hash=20480"],
    "unet_skips": ["model.unet_skips=true"],
    "smear": ["model.smear=true"],
    "x0_lambdas": ["model.x0_lambdas=true"],
    "logit_softcap 15": ["model.logit_softcap=15"],
    "mtp 2 tokens": ["model.mtp_tokens=2"],
    "doc_start windows": ["data.windows=doc_start"],
    "doc_mask": ["data.doc_mask=true"],
    "weight_average": ['methods.use=["weight_average"]'],
    "polar_express": ["optim.ns_coefficients=polar_express"],
    "normuon": ["optim.name=normuon"],
    "cautious wd 0.05": ["optim.muon_weight_decay=0.05", "optim.cautious_weight_decay=true"],
    "model four": MODEL,
    "model four + softcap": [*MODEL, "model.logit_softcap=15"],
    "model four + x0": [*MODEL, "model.x0_lambdas=true"],
    "model four + doc_mask": [*MODEL, "data.doc_mask=true"],
    "model four + doc_start": [*MODEL, "data.windows=doc_start"],
    "model four + weight_average": [*MODEL, 'methods.use=["weight_average"]'],
    "model four + polar_express": [*MODEL, "optim.ns_coefficients=polar_express"],
    "model four + normuon": [*MODEL, "optim.name=normuon"],
    "normuon + polar_express": ["optim.name=normuon", "optim.ns_coefficients=polar_express"],
    "normuon + ve + unet": ["optim.name=normuon", "model.value_embeds=true", "model.unet_skips=true"],
    "normuon + pe + ve + unet": ["optim.name=normuon", "optim.ns_coefficients=polar_express",
                                 "model.value_embeds=true", "model.unet_skips=true"],
    "normuon + pe + ve + unet + bigram": ["optim.name=normuon", "optim.ns_coefficients=polar_express",
                                          "model.value_embeds=true", "model.unet_skips=true",
                                          "model.bigram_hash=20480"],
}


if __name__ == "__main__":
    main(VARIANTS, __doc__, HERE / "results" / "recipe_screen.json", "speed-recipe pieces", seconds=22.5)
