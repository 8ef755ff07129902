"""A run's model rounded to int4, as ``flopwise eval --quantize int4`` scores it (flopwise/model/int4.py): the check
that a group fits the model, and the rounding itself."""

from __future__ import annotations

from pathlib import Path

import torch

from flopwise.errors import FlopwiseError
from flopwise.methods.dense import block_linears
from flopwise.model.gpt import GPT
from flopwise.model.int4 import check_group, fake_quantize
from flopwise.rundir import planned_model_config


def check_int4(run_dir: Path, quantize: str, group: int) -> None:
    """Refuse, in one line, a quantization other than int4, or a group that does not fit the run's model
    (before any model or data is loaded)."""
    if quantize != "int4":
        raise FlopwiseError(f"--quantize {quantize} is unknown: int4 is the one quantization there is")
    if group < 1:
        raise FlopwiseError(f"--group {group} must be a positive number of input columns per int4 scale, e.g. 32")
    check_group(planned_model_config(run_dir), group, f"--group {group}")


@torch.no_grad()
def round_to_int4(model: GPT, group: int) -> None:
    """Round every block Linear's weight to int4 in place (round-to-nearest, one scale per ``group``
    input columns), as a 4-bit export would; embeddings, head and norms stay as they are."""
    for _, _, _, linear in block_linears(model):
        linear.weight.copy_(fake_quantize(linear.weight, group))
