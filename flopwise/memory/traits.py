"""What the methods of a run change in the memory of a training step, in the estimator's terms.

Each method records its part through its ``memory`` hook (flopwise/methods/base.py); the estimator
(flopwise/memory/estimate.py) reads only these traits, so it knows no method by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Factorization:
    """Block Linears stored as sparse plus low-rank factors (SLTrain): the rank and the sparse density."""

    rank: int
    density: float


@dataclass
class MemoryTraits:
    """The step as the methods make it.  Defaults: dense fp32 weights, every block trains, torch's
    AdamW or Muon with 32-bit states, gradients kept until the optimizer step, nothing recomputed,
    matmuls in the compute dtype on the weights as stored."""

    names: tuple[str, ...] = ()  # the methods, for the report
    flopwise_optimizer: bool = False  # flopwise's optimizer even for plain AdamW (torch's keeps other temporaries)
    state_bits: int = 32  # bits per optimizer-state element (8: blockwise quantized)
    state_block: int = 256  # elements per absmax of 8-bit states
    low_rank_gradients: int | None = None  # Adam on the blocks' matrices' gradients projected to this rank
    updates_in_backward: bool = False  # each weight updated, its gradient freed, during backward
    recompute_blocks: bool = False  # each block's activations recomputed in backward
    factorized: Factorization | None = None  # block Linears as sparse plus low-rank factors
    adapter_rank: int = 0  # low-rank adapters on frozen block Linears, everything else frozen too
    trained_blocks: int | None = None  # how many blocks train at a time (None: all)
    matrix_bytes: int = 4  # bytes per element of the stored matrices (embeddings, head, blocks): 2 for bf16
    rounding: str = "nearest"  # of updates into low-precision matrices: kahan keeps a bf16 buffer per element
    # (flopwise/optim/rounding.py)
    fp8_block_matmuls: bool = False  # block Linears are torchao's Float8Linear: no weight cast kept for backward
    fake_quantized_blocks: bool = False  # block Linears keep a fake-quantized copy of their weight for backward
    pruning_masks: bool = False  # a bool mask (1 byte) is kept beside every block matmul weight (pruning)
    averaged_weights: bool = False  # an fp32 average of every trained weight is kept beside it (weight averaging)
    frozen_parameters: int = 0  # parameters of frozen fp32 models kept beside the student (a teacher)
    kept_logits: int = 0  # extra fp32 tensors of the logits' size alive through backward (a distillation term's)
