"""A budget on the model's size (``--budget 2m,4MB``): the bytes of the exported ``final/`` folder, the precision
its weights are stored in to fit, and that stored model, as the export writes it and as evaluation scores it.

The bytes of the weights follow from the shape exactly (flopwise/model/flops.py ``count_parameters``; a tied head
is stored once): fp32 4 bytes a parameter, bf16 2; int8 and int4 (flopwise/model/stored.py) store the block
Linears as integers with fp32 scales (int8: one per row; int4: one per group of input columns, two values a
byte) and every other parameter (embeddings, norms) in bf16.  The rest of the folder (the safetensors header,
config and tokenizer files, the README, the remote code) is bounded from above here, and the export measures the
folder it wrote and refuses to keep one above the cap.

Rounding costs loss, so a size-capped run keeps the highest precision that fits: fp32, else bf16, else int8,
else int4 with quantization-aware training (the ``qat`` method) added so that the run trains for it.  A shape
too large even at int4 is refused, naming the largest named size that fits: the run's shape is the user's
choice (``--auto`` plans its own), so it is not changed behind their back.  The int artifacts follow Parameter
Golf's (openai/parameter-golf: a 16 MB artifact of int-quantized weights) and llama.cpp's Q8_0/Q4_0 layouts.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from flopwise.budget import format_size
from flopwise.errors import FlopwiseError
from flopwise.model.config import NAMED_SIZES, ModelConfig
from flopwise.model.flops import count_parameters
from flopwise.model.gpt import GPT
from flopwise.model.int4 import check_group
from flopwise.model.remote import source_files
from flopwise.model.stored import dequantize, quantize, stored_linears

PRECISIONS = ("fp32", "bf16", "int8", "int4")  # best first: each step down rounds the weights more
_BYTES = {"fp32": 4, "bf16": 2}
HEADER_PER_TENSOR = 128  # a safetensors header entry's JSON beyond its name, from above ("dtype", shape, offsets)
JSON_FILES = 4096  # config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json, README.md
TOKENIZER_PER_TOKEN = 64  # tokenizer.json per vocabulary entry (the token and a merge), from above


@dataclass(frozen=True)
class SizePlan:
    """What a size budget chose: the ``precision`` of final/'s weights, the folder's estimated ``bytes`` (the
    weights' exact, ``weights``), the ``cap``, and every precision's bytes (``candidates``; None: int4's group
    does not fit the shape)."""

    precision: str
    bytes: int
    weights: int
    cap: float
    candidates: dict[str, int | None] = field(default_factory=dict)
    qat_added: bool = False

    def note(self) -> str:
        shown = ", ".join(f"{name} {format_size(size) if size is not None else '(group does not fit)'}"
                          for name, size in self.candidates.items())
        why = ("fp32 fits" if self.precision == "fp32" else
               f"the highest precision that fits (fp32 {format_size(self.candidates['fp32'])} does not)")
        qat = "; qat added so that the run trains for int4" if self.qat_added else ""
        return (f"size: final/ stored in {self.precision}, about {format_size(self.bytes)} of the "
                f"{format_size(self.cap)} cap: {why} ({shown}){qat}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weights_bytes(cfg: ModelConfig, precision: str, group: int) -> int:
    """The bytes of the weights final/ stores in ``precision`` (the tensors' data, exactly; no header)."""
    total = count_parameters(cfg)["total"]
    if precision in _BYTES:
        return total * _BYTES[precision]
    shapes = _stored_shapes(cfg)
    integers = sum(rows * columns for rows, columns in shapes)
    scales = sum(rows * (1 if precision == "int8" else columns // group) for rows, columns in shapes)
    return integers // (2 if precision == "int4" else 1) + 4 * scales + 2 * (total - integers)


def artifact_bytes(cfg: ModelConfig, precision: str, group: int) -> int:
    """final/'s bytes in ``precision``, from above: the weights exactly, the rest bounded."""
    names = _tensor_names(cfg)
    tensors = len(names) + (len(_stored_shapes(cfg)) if precision in ("int8", "int4") else 0)
    header = 8 + 64 + sum(len(name) + len(".scale") for name in names) + HEADER_PER_TENSOR * tensors
    remote = precision in ("int8", "int4") or not cfg.stock_architecture
    code = sum(path.stat().st_size for path in source_files()) if remote else 0
    files = JSON_FILES + len(str(cfg.to_dict())) + TOKENIZER_PER_TOKEN * cfg.vocab_size + code
    return weights_bytes(cfg, precision, group) + header + files


def plan_size(cfg: ModelConfig, cap: float, group: int, precision: str | None = None) -> SizePlan:
    """The precision final/ is stored in under ``cap`` bytes (``precision``: the one the user set, checked),
    or a one-line refusal naming the change that fits."""
    candidates = {name: _bytes_or_none(cfg, name, group) for name in PRECISIONS}
    fitting = [name for name, size in candidates.items() if size is not None and size <= cap]
    if precision is not None and precision not in fitting:
        raise FlopwiseError(f"artifact.precision={precision} gives a final/ of about "
                            f"{format_size(candidates[precision] or 0)}, above the size budget "
                            f"{format_size(cap)}: " + (f"use {fitting[0]}, or drop the setting to let the budget "
                                                       "choose" if fitting else "give a smaller model"))
    if not fitting:
        raise FlopwiseError(_too_large(cfg, cap, group, candidates["int4"]))
    chosen = precision or fitting[0]
    return SizePlan(chosen, candidates[chosen], weights_bytes(cfg, chosen, group), cap, candidates)


def int4_training(sections: Any) -> tuple[str, int]:
    """The method that trains a model for int4 (the one that declares an int4 group: quantization-aware
    training) and its group; ``sections``: the run config's ``methods``."""
    from flopwise.methods.registry import METHODS

    for method in METHODS:
        group = method.int4_group(getattr(sections, method.name))
        if group is not None:
            return method.name, group
    raise FlopwiseError("no method trains for int4, which a size budget needs: register one")


def _too_large(cfg: ModelConfig, cap: float, group: int, int4: int | None) -> str:
    """Why no precision fits: the largest named size that fits at int4, or the smallest model's bytes."""
    fits = [name for name, shape in NAMED_SIZES.items()
            if (size := _bytes_or_none(_named(cfg, shape), "int4", group)) is not None and size <= cap]
    if fits:
        largest = max(fits, key=lambda name: count_parameters(_named(cfg, NAMED_SIZES[name]))["total"])
        return (f"the size budget {format_size(cap)} is below this model even at int4 (about "
                f"{format_size(int4 or 0)}): use a smaller model, e.g. --set model.size={largest}, or a larger cap")
    smallest = min(NAMED_SIZES, key=lambda name: count_parameters(_named(cfg, NAMED_SIZES[name]))["total"])
    least = _bytes_or_none(_named(cfg, NAMED_SIZES[smallest]), "int4", group)
    return (f"the size budget {format_size(cap)} is smaller than the smallest model (model.size={smallest} at "
            f"int4, about {format_size(least or 0)} with this vocabulary): give a cap of at least that")


def _named(cfg: ModelConfig, shape: dict[str, Any]) -> ModelConfig:
    """``cfg`` with a named size's width and depth (its vocabulary, context and options kept)."""
    widths = {key: value for key, value in shape.items() if key != "seq_len"}
    return dataclasses.replace(cfg, n_kv_heads=None, head_size=None, mlp_hidden=None, **widths)


def _bytes_or_none(cfg: ModelConfig, precision: str, group: int) -> int | None:
    if precision == "int4":
        try:
            check_group(cfg, group, "int4")
        except FlopwiseError:
            return None
    return artifact_bytes(cfg, precision, group)


def _meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):  # names and shapes only: no memory, no initialization
        return GPT(cfg)


def _stored_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    return [tuple(linear.weight.shape) for *_, linear in stored_linears(_meta_model(cfg))]


def _tensor_names(cfg: ModelConfig) -> list[str]:
    return [f"model.{name}" for name in _meta_model(cfg).state_dict()]


@torch.no_grad()
def as_stored(model: GPT, precision: str, group: int) -> GPT:
    """A copy of ``model`` (a plain GPT) with the weights final/ stores in ``precision``, read back in fp32: what
    the exported folder computes, for evaluation.  ``model`` itself is left as it is."""
    stored = copy.deepcopy(model).float()
    if precision == "fp32":
        return stored
    linears = {id(linear.weight) for *_, linear in stored_linears(stored)} if precision != "bf16" else set()
    for parameter in stored.parameters():
        if id(parameter) not in linears:
            parameter.copy_(parameter.to(torch.bfloat16).float())
    for *_, linear in stored_linears(stored) if linears else ():
        linear.weight.copy_(dequantize(*quantize(linear.weight, precision, group), precision))
    return stored


def with_artifact(evaluate: Callable[[GPT], dict[str, Any]], model: GPT, precision: str, group: int
                  ) -> dict[str, Any]:
    """``evaluate(model)``, and, for weights stored in less than fp32, the same evaluation of the model as final/
    stores it under ``artifact`` (precision, loss, bpb): what the run ships, which is what `eval` reports."""
    from flopwise.methods.dense import plain_model

    result = evaluate(model)
    if precision == "fp32":
        return result
    stored = evaluate(as_stored(plain_model(model), precision, group))
    return {**result, "artifact": {"precision": precision, "loss": stored["loss"], "bpb": stored["bpb"]}}
