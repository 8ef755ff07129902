"""Peak memory of a training step from the model's shapes and what the methods change.

The estimate counts what PyTorch actually keeps: every parameter, gradient and optimizer-state
tensor at its real size (8-bit codes plus one fp32 absmax per block, GaLore's low-rank moments
and projections, SLTrain's factors, sparse values and int32 indices), and the tensors each op of
``GPT`` saves for backward (checked op by op with ``torch.autograd.graph.saved_tensors_hooks``
in tests/test_memory_estimate.py).  The peak is the largest of the moments (``moments``, named
as below) where a step's memory crests:

- ``loss``: start of backward: every activation, the logits (the trainer holds them until the
  step ends), the log-softmax kept for backward, and the two logit-sized gradients its backward makes;
- ``last block`` / ``first block``: inside that block's MLP backward (its hidden gradients on top
  of the activations still alive; the head's gradients, or nearly all, made by then);
- ``embedding backward``: every gradient made; a tied embedding's two parts and their sum at once;
- ``optimizer``: every gradient plus the working tensors of the costliest parameter's update
  (per update rule, as flopwise.plan.measure.StorageTracker measures them);
- with updates inside backward (per-layer updates) each frees its gradient: ``head update``,
  ``block update`` and ``embedding update`` replace the last three.

It does not count the allocator's slack or kernels' private workspaces (a CUDA caching allocator
rounds sizes up; glibc keeps freed pages), nor the memory of other processes or of PyTorch itself.

What the methods change comes in as ``MemoryTraits`` (flopwise/memory/traits.py), which each method
fills in through its ``memory`` hook; the estimate names no method.  No torch import: the CLI and the
planner use it before anything is built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from flopwise.memory.traits import MemoryTraits
from flopwise.model.config import SMEAR_CHANNELS, VALUE_GATE_CHANNELS, ModelConfig
from flopwise.optim.routing import is_hidden_matrix, muon_stacks

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# The options' parameters that act on the embedding, whose gradients backward makes last, with the embedding's
EMBEDDING_OPTIONS = ("bigram_embed.weight", "smear_gate", "smear_lambda")
FP32, INT64, INT32 = 4, 8, 4

# Working memory of one parameter's update beyond its gradient and states, in fp32 bytes per
# element of the parameter, as StorageTracker measures the update rules of flopwise/optim.
# torch.optim.AdamW (single-tensor, CPU): sqrt(v) and its quotient; flopwise's AdamW: the
# denominator; 8-bit: both moments decoded plus quantize()'s intermediates (~22 bytes/element of
# the chunk it encodes at once, flopwise/optim/quantize.py's CHUNK).
TORCH_ADAMW_TEMP, ADAMW_TEMP, QUANTIZE_WORK = 8, 4, 22
QUANTIZE_CHUNK = 1 << 20  # as flopwise/optim/quantize.py (not imported: this module imports no torch)


def _quantize_work(numel: int) -> int:
    """Bytes of quantize()'s intermediates for a tensor of ``numel`` elements, encoded chunk by chunk."""
    return QUANTIZE_WORK * min(numel, QUANTIZE_CHUNK)

@dataclass(frozen=True)
class ParamSpec:
    """One parameter (or buffer) as the model holds it, named as in ``GPT.named_parameters``."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def hidden(self) -> bool:
        """Muon's or GaLore's: a block's dense matrix."""
        return is_hidden_matrix(self.name, len(self.shape))


@dataclass
class MemoryEstimate:
    """Bytes of one training step.  ``weights`` includes a weight average's fp32 copy and a frozen teacher's
    weights.  ``optimizer_states`` holds moments (8-bit codes and their absmax scales with ``8bit``) and step
    counters; GaLore's projection matrices are apart in ``projections``.  ``gradients`` is the most alive at once
    (all of them, except with ``layerwise``).  ``activations`` is what one micro-batch saves for backward as
    configured; ``activations_full``/``activations_checkpointed`` without/with activation checkpointing.
    ``buffers``: RoPE tables, SLTrain's indices, pruning masks, the token batch, a distillation term's logit-sized
    tensors.
    ``logits``: the logits and cross-entropy's tensors at the start of backward.  ``peak``: the largest of
    ``moments``."""

    methods: tuple[str, ...]
    optimizer: str
    weights: int
    gradients: int
    optimizer_states: int
    projections: int
    activations: int
    activations_full: int
    activations_checkpointed: int
    buffers: int
    logits: int
    peak: int
    peak_at: str
    moments: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Parameters


def _norm(cfg: ModelConfig, name: str, width: int, trainable: bool) -> list[ParamSpec]:
    specs = [ParamSpec(f"{name}.weight", (width,), trainable)]
    if cfg.norm == "layer" and cfg.bias:
        specs.append(ParamSpec(f"{name}.bias", (width,), trainable))
    return specs


def _linear(cfg: ModelConfig, name: str, out: int, inp: int, traits: MemoryTraits,
            trainable: bool) -> tuple[list[ParamSpec], list[ParamSpec]]:
    """Parameters and buffers standing for one block Linear: dense, sparse plus low-rank factors, or
    frozen with low-rank adapters."""
    params, buffers = [], []
    adapted = traits.adapter_rank > 0
    if traits.factorized is not None:
        rank = min(traits.factorized.rank, out, inp)
        nnz = round(traits.factorized.density * out * inp)
        params += [ParamSpec(f"{name}.B", (out, rank), trainable), ParamSpec(f"{name}.A", (rank, inp), trainable),
                   ParamSpec(f"{name}.values", (nnz,), trainable)]
        buffers.append(ParamSpec(f"{name}.index", (nnz,), False))
    else:
        params.append(ParamSpec(f"{name}.weight", (out, inp), trainable and not adapted))
    if cfg.bias:
        params.append(ParamSpec(f"{name}.bias", (out,), trainable and not adapted))
    if adapted:
        rank = traits.adapter_rank
        params += [ParamSpec(f"{name}.lora_A", (rank, inp)), ParamSpec(f"{name}.lora_B", (out, rank))]
    return params, buffers


def trained_blocks(cfg: ModelConfig, traits: MemoryTraits) -> int:
    """Blocks whose own weights train: all, the few trained at a time, or none under adapters."""
    if traits.adapter_rank:
        return 0
    return cfg.n_layers if traits.trained_blocks is None else min(traits.trained_blocks, cfg.n_layers)


def tensor_specs(cfg: ModelConfig, traits: MemoryTraits) -> tuple[list[ParamSpec], list[ParamSpec]]:
    """Every parameter (``trainable`` as during a step) and every buffer of the model the methods make."""
    outer = not traits.adapter_rank  # embeddings, final norm and head: frozen only under adapters
    params = [ParamSpec("embed_tokens.weight", (cfg.vocab_size, cfg.d_model), outer)]
    if cfg.positions == "learned":
        params.append(ParamSpec("embed_positions.weight", (cfg.seq_len, cfg.d_model), outer))
    if cfg.bigram_hash:
        params.append(ParamSpec("bigram_embed.weight", (cfg.bigram_hash, cfg.d_model), outer))
    if cfg.smear:
        params += [ParamSpec("smear_gate", (1, min(SMEAR_CHANNELS, cfg.d_model)), outer),
                   ParamSpec("smear_lambda", (1,), outer)]
    buffers = []
    if cfg.positions == "rope":
        buffers += [ParamSpec("rope.cos", (cfg.context, cfg.head_dim), False),
                    ParamSpec("rope.sin", (cfg.context, cfg.head_dim), False)]
    active = trained_blocks(cfg, traits)
    value_embeds = cfg.value_embed_layers()
    for layer in range(cfg.n_layers):
        prefix, trains = f"layers.{layer}", layer < active
        params += _norm(cfg, f"{prefix}.input_layernorm", cfg.d_model, trains)
        if cfg.qk_norm:
            params += _norm(cfg, f"{prefix}.self_attn.q_norm", cfg.head_dim, trains)
            params += _norm(cfg, f"{prefix}.self_attn.k_norm", cfg.head_dim, trains)
        params += _norm(cfg, f"{prefix}.post_attention_layernorm", cfg.d_model, trains)
        for name, out, inp in cfg.block_linears:
            linear_params, linear_buffers = _linear(cfg, f"{prefix}.{name}", out, inp, traits, trains)
            params += linear_params
            buffers += linear_buffers
        if layer in value_embeds:
            params += [ParamSpec(f"{prefix}.self_attn.value_embed", (cfg.vocab_size, cfg.kv_heads * cfg.head_dim),
                                 trains),
                       ParamSpec(f"{prefix}.self_attn.value_gate",
                                 (cfg.kv_heads, min(VALUE_GATE_CHANNELS, cfg.d_model)), trains)]
        if cfg.x0_lambdas:
            params.append(ParamSpec(f"{prefix}.lambdas", (2,), trains))
        if cfg.skip_source(layer) is not None:
            params.append(ParamSpec(f"{prefix}.skip_weight", (1,), trains))
    params += _norm(cfg, "norm", cfg.d_model, outer)
    if not cfg.tie_embeddings:
        params.append(ParamSpec("lm_head.weight", (cfg.vocab_size, cfg.d_model), outer))
    return params, buffers


# ---------------------------------------------------------------------------------------------
# Optimizer states


def update_rule(spec: ParamSpec, optimizer: str, traits: MemoryTraits) -> str:
    """Which update ``build_optimizer`` gives this parameter: torch's AdamW when no method changes the
    optimizer, else flopwise's ``adamw``, ``muon``, ``normuon`` or ``low_rank`` (Adam on projected gradients,
    GaLore's; it and (Nor)Muon for hidden matrices only)."""
    if optimizer == "adamw" and not traits.flopwise_optimizer:
        return "torch_adamw"
    if spec.hidden and traits.low_rank_gradients:
        return "low_rank"
    if spec.hidden and optimizer in ("muon", "normuon"):
        return optimizer
    return "adamw"


def _moment_bytes(numel: int, param_bytes: int, bits8: bool, block: int) -> int:
    """One moment buffer: as the parameter's dtype, or one byte per element plus an fp32 absmax per block."""
    return numel + FP32 * math.ceil(numel / block) if bits8 else numel * param_bytes


def _low_rank_shapes(spec: ParamSpec, rank: int) -> tuple[int, int]:
    """Elements of GaLore's projected gradient (r x the longer side) and of its projection (the
    shorter side x r), rank clamped to the matrix as flopwise/methods/galore.py does."""
    rows, cols = spec.shape
    rank = min(rank, rows, cols)
    return rank * max(rows, cols), rank * min(rows, cols)


def muon_stack_sizes(specs: list[ParamSpec]) -> dict[str, int]:
    """How many matrices each fp32 Muon matrix is orthogonalized with (flopwise/optim/routing.py's
    ``muon_stacks``): its stack's working memory is that many times one matrix's."""
    sizes = {}
    for stack in muon_stacks([spec.shape for spec in specs]):
        sizes.update({specs[i].name: len(stack) for i in stack})
    return sizes


def optimizer_bytes(spec: ParamSpec, rule: str, param_bytes: int, bits8: bool, block: int, rank: int
                    ) -> tuple[int, int, int]:
    """(state bytes, GaLore projection bytes, update working bytes) for one trainable parameter.  Cautious
    weight decay's one temporary (the size of the parameter) is left out: this estimate does not see
    ``optim.cautious_weight_decay``, and it adds to AdamW's and GaLore's working memory only of matrices that
    decay (not embeddings)."""
    n = spec.numel
    if rule == "torch_adamw":
        return FP32 + 2 * n * param_bytes, 0, TORCH_ADAMW_TEMP * n
    if rule in ("muon", "normuon"):
        shorter = min(spec.shape)
        temp = 20 * n + 4 * shorter**2  # Newton-Schulz: update, iterate, three products; the Gram matrix
        if bits8:
            temp = max(4 * n + _quantize_work(n), temp + 4 * n)  # the decoded momentum, or quantizing it back
        # NorMuon's second moment, one per neuron of the longer side, never quantized; its work (the update, its
        # square, the normalized copy) and cautious decay's one temporary fit in Newton-Schulz's
        neurons = param_bytes * max(spec.shape) if rule == "normuon" else 0
        return _moment_bytes(n, param_bytes, bits8, block) + neurons, 0, temp
    if rule == "low_rank":
        low, projection = _low_rank_shapes(spec, rank)
        temp = 4 * n + 8 * low  # the update mapped back to full size, the low-rank step's quotients
        if bits8:
            temp = max(4 * n + 16 * low, 12 * low + _quantize_work(low))
        return FP32 + 2 * _moment_bytes(low, param_bytes, bits8, block), FP32 * projection, temp
    temp = 8 * n + _quantize_work(n) if bits8 else ADAMW_TEMP * n
    return FP32 + 2 * _moment_bytes(n, param_bytes, bits8, block), 0, temp


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class _Compute:
    """Byte sizes of one forward: ``c`` for matmul outputs (the autocast dtype), fp32 elsewhere;
    ``matrix`` those of the stored matrices; ``float8``: the block Linears are torchao's Float8Linear, which
    saves its input in the autocast dtype (a cast per Linear, as autocast's) and the weight itself,
    casting both to fp8 again in backward; ``fake_quant``: they read fake-quantized weights."""

    c: int
    tokens: int
    matrix: int = FP32
    float8: bool = False
    fake_quant: bool = False

    @property
    def autocast(self) -> bool:
        return self.c != FP32

    @property
    def head_weight_copy(self) -> int:
        """Bytes per element of the head weight's copy kept for backward: autocast's cast of a weight
        stored in another dtype, or none (fp32 compute upcasts a bf16 weight again in backward instead,
        flopwise/model/gpt.py ``linear``)."""
        return self.c if self.autocast and self.c != self.matrix else 0

    @property
    def block_weight_copy(self) -> int:
        """The same for a block Linear's weight: none under fp8, a dtype cast, or else the fake-quantized
        weight itself (QAT's matmul reads a new tensor, which it keeps)."""
        if self.float8:
            return 0
        return self.head_weight_copy or (self.matrix if self.fake_quant else 0)

    def saved_input(self, width: int, savers: int) -> int:
        """Bytes of a tensor [tokens, width] saved by ``savers`` Linears: one shared fp32 tensor, or
        under autocast a separate low-precision cast per Linear (autocast casts at each call)."""
        if savers == 0:
            return 0
        return self.tokens * width * (self.c * savers if self.autocast else FP32)


def _norm_saved(cfg: ModelConfig, run: _Compute, width: int, groups: int, trains: bool, input_bytes: int) -> int:
    """RMSNorm (in fp32: its input upcast, rstd per group, the normalized tensor when the gain
    trains, in the input's dtype) or LayerNorm (input, mean and rstd)."""
    if cfg.norm == "layer":
        return run.tokens * (FP32 * width + 2 * FP32 * groups)
    normalized = input_bytes * width if trains else 0
    return run.tokens * (FP32 * width + FP32 * groups + normalized)


def _block_activations(cfg: ModelConfig, run: _Compute, traits: MemoryTraits, trains: bool,
                       input_grad: bool = True, layer: int = 0) -> int:
    """Bytes one block saves for backward: norms, projections, QK-norm, attention (q, k, v, output,
    log-sum-exp), MLP; plus, under autocast, each Linear's weight cast; plus what the options add to block
    ``layer`` (``_block_option_activations``).  ``trains``: the block's own weights train; ``input_grad``:
    its input needs a gradient (not the first block under LoRA).  o_proj's input costs nothing: it is a
    view of the attention output, which SDPA lays out as [batch, time, heads, head_dim]."""
    c, n = run.c, run.tokens
    d, hidden, attn, kv = cfg.d_model, cfg.hidden, cfg.attn_dim, cfg.kv_heads * cfg.head_dim
    adapted, factorized = traits.adapter_rank > 0, traits.factorized is not None
    keeps_input = trains or adapted or factorized  # which Linears save their input for backward
    total = 0
    if input_grad:  # input norm: the residual stream is fp32 (the embedding's dtype), so is its normalized copy
        total += _norm_saved(cfg, run, d, 1, trains, FP32)
    # q, k, v read the norm's output; SLTrain's own Function keeps it uncast (fp32 under autocast)
    total += n * d * FP32 if factorized else run.saved_input(d, 3 if keeps_input else 0)
    if cfg.qk_norm:  # q and k, upcast to fp32, normalized, kept in their own dtype for the gain's gradient
        total += _norm_saved(cfg, run, attn, cfg.n_heads, trains, c)
        total += _norm_saved(cfg, run, kv, cfg.kv_heads, trains, c)
    elif run.autocast and cfg.positions == "rope":  # RoPE's cos and sin, cast to the low-precision q
        total += 2 * cfg.seq_len * cfg.head_dim * c
    total += n * (c * (2 * attn + 2 * kv) + FP32 * cfg.n_heads)  # attention: q, k, v, output, log-sum-exp
    total += _norm_saved(cfg, run, d, 1, trains, FP32)
    total += n * d * FP32 if factorized else run.saved_input(d, (2 if cfg.mlp == "swiglu" else 1) if keeps_input
                                                             else 0)
    mlp_kept = 3 if cfg.mlp == "swiglu" else 1  # SwiGLU: gate, silu(gate), up; GELU/ReLU²: the activation's input
    total += n * hidden * c * (mlp_kept + (1 if keeps_input else 0))  # + down_proj's input
    if adapted:
        total += n * traits.adapter_rank * c * len(cfg.block_linears)  # x A^T, kept for B's gradient
    if not factorized:
        total += run.block_weight_copy * _cast_weights(cfg, traits.adapter_rank, input_grad)
    return total + _block_option_activations(cfg, run, trains, input_grad, layer)


def _block_option_activations(cfg: ModelConfig, run: _Compute, trains: bool, input_grad: bool, layer: int) -> int:
    """Bytes the options add to block ``layer``'s saved tensors, as flopwise/model/gpt.py computes them:

    - x0_lambdas: lambdas[0] * x keeps x, the block's input before the mix (block 0's is x0 itself, counted
      once before the blocks);
    - unet_skips: skip_weight * skip keeps the mirror layer's output, already kept as the next layer's input
      except at an even depth's middle, where that next layer is this one;
    - a value embedding: the gate's sigmoid, 3 * sigmoid and the table's rows (in the compute dtype), and under
      autocast the gate's input and weight casts.  The gate's input is otherwise q/k/v's.
    Frozen options' parameters keep only what the gradient of the stream needs."""
    n, c = run.tokens, run.c
    total = 0
    if cfg.x0_lambdas and trains and layer > 0:
        total += n * cfg.d_model * FP32
    if cfg.skip_source(layer) == layer - 1 and trains:
        total += n * cfg.d_model * FP32
    if layer in cfg.value_embed_layers():
        gate_input_grad = input_grad or trains
        kv_heads, channels = cfg.kv_heads, min(VALUE_GATE_CHANNELS, cfg.d_model)
        if trains and run.autocast:
            total += n * channels * c  # the gate's input, cast
        if gate_input_grad:
            total += run.head_weight_copy * kv_heads * channels + n * c * (kv_heads + cfg.kv_heads * cfg.head_dim)
        if trains:
            total += n * kv_heads * c  # 3 * sigmoid, for the table's gradient
    return total


def _embedding_option_activations(cfg: ModelConfig, run: _Compute, traits: MemoryTraits) -> int:
    """Bytes the options save before the blocks (kept to the end of backward), where the embedding trains:

    - smear: the gate's input (the token embedding, or under autocast its cast channels and the gate's weight
      cast), the sigmoid, the gate (fp32), the previous tokens' ids, their masked embeddings and the mask;
    - the bigram hash: the rows' ids;
    - x0_lambdas: x0, which every block reads."""
    n, d = run.tokens, cfg.d_model
    total = n * d * FP32 if cfg.x0_lambdas and trained_blocks(cfg, traits) else 0
    if traits.adapter_rank:  # the embedding and the options' own parameters are frozen
        return total
    if cfg.smear:
        channels = min(SMEAR_CHANNELS, d)
        gate_input = (n * channels * run.c + run.head_weight_copy * channels) if run.autocast else n * d * FP32
        total += gate_input + n * run.c + n * FP32 + n * INT64 + n * d * FP32 + n
    if cfg.bigram_hash:
        total += n * INT64
    return total


def _cast_weights(cfg: ModelConfig, adapter_rank: int, qkv_input_grad: bool) -> int:
    """Elements of the autocast weight casts a block keeps: each Linear's (for its input's
    gradient) and LoRA's A (the same) and B (for A's gradient).  Where q, k and v read a tensor
    that needs no gradient, only B's cast is kept."""
    total = 0
    for name, out, inp in cfg.block_linears:
        needs_input_grad = qkv_input_grad or name not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        total += adapter_rank * out + (out * inp + adapter_rank * inp if needs_input_grad else 0)
    return total


def _outer_activations(cfg: ModelConfig, run: _Compute, traits: MemoryTraits) -> tuple[int, int]:
    """(bytes the final norm and the head save, freed early in backward: with logit_softcap also the tanh's
    fp32 output; bytes saved before the blocks, kept to the end: learned positions' index and the options')."""
    d = cfg.d_model
    outer = not traits.adapter_rank
    head = _norm_saved(cfg, run, d, 1, outer, FP32) + run.saved_input(d, 1 if outer else 0)
    head += run.head_weight_copy * cfg.vocab_size * d
    head += run.tokens * cfg.vocab_size * FP32 if cfg.logit_softcap else 0
    before = cfg.seq_len * INT64 if cfg.positions == "learned" else 0
    return head, before + _embedding_option_activations(cfg, run, traits)


@dataclass(frozen=True)
class _Activations:
    """Bytes saved for backward: by all blocks as run (only their inputs when checkpointed), by
    the largest single block in full, by the final norm and head, and before the blocks."""

    blocks: int
    block: int
    head: int
    before: int

    @property
    def total(self) -> int:
        return self.blocks + self.head + self.before


def _activations(cfg: ModelConfig, run: _Compute, traits: MemoryTraits, checkpointed: bool) -> _Activations:
    active = trained_blocks(cfg, traits)
    first_input_grad = not traits.adapter_rank
    blocks = [_block_activations(cfg, run, traits, layer < active, layer > 0 or first_input_grad, layer)
              for layer in range(cfg.n_layers)]
    head, before = _outer_activations(cfg, run, traits)
    # non-reentrant checkpointing keeps each block's inputs (the fp32 residual stream, and x0 and the U-net
    # skips, which are earlier blocks' inputs too) and nothing else
    kept = cfg.n_layers * run.tokens * cfg.d_model * FP32 if checkpointed else sum(blocks)
    if checkpointed and cfg.x0_lambdas:  # x0 is block 0's input: kept once
        before -= run.tokens * cfg.d_model * FP32 if trained_blocks(cfg, traits) else 0
    return _Activations(kept, max(blocks), head, before)


def _mlp_backward_extra(cfg: ModelConfig, run: _Compute, traits: MemoryTraits, trains: bool) -> int:
    """Bytes a block's MLP backward adds at its crest beyond the block's saved activations: the
    gradients of the MLP's hidden tensors (SwiGLU: of down_proj's input, then of silu(gate) and of
    up), less what down_proj's backward has freed by then: its input and its weight's autocast cast."""
    factorized = traits.factorized is not None
    keeps_input = trains or traits.adapter_rank > 0 or factorized
    made = {"swiglu": 3, "gelu": 2, "relu2": 3}[cfg.mlp]
    extra = run.tokens * cfg.hidden * run.c * (made - (1 if keeps_input else 0))
    if not factorized:
        extra -= run.block_weight_copy * cfg.hidden * cfg.d_model
        extra -= run.c * traits.adapter_rank * (cfg.hidden + cfg.d_model) if run.autocast else 0
    return extra


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate_memory(model_cfg: ModelConfig, micro_batch: int, traits: MemoryTraits, optim_name: str,
                    dtype: str = "fp32", param_dtype: str = "fp32", grad_accum: int = 1) -> MemoryEstimate:
    """Bytes of one training step of ``micro_batch`` sequences of ``model_cfg.seq_len`` tokens.

    ``dtype``: the compute dtype (autocast's: bf16 on GPUs, fp32 on most CPUs); ``param_dtype``:
    that of weights, gradients and 32-bit states (fp32 in flopwise; bf16 for pure-bf16 training as
    the GaLore paper counts it).  Projected gradients run Adam, whatever ``optim_name`` says.
    ``grad_accum`` > 1: gradients of earlier micro-batches are alive during later ones."""
    cfg = model_cfg
    optimizer = "adamw" if traits.low_rank_gradients else optim_name
    pb = DTYPE_BYTES[param_dtype]
    matrix = min(pb, traits.matrix_bytes)
    run = _Compute(DTYPE_BYTES[dtype], micro_batch * cfg.seq_len, matrix, traits.fp8_block_matmuls,
                   traits.fake_quantized_blocks)
    params, buffer_specs = tensor_specs(cfg, traits)
    trainable = [p for p in params if p.trainable]
    stored = {p.name: matrix if len(p.shape) >= 2 else pb for p in params}  # bytes per element, grads alike

    weights = sum(p.numel * stored[p.name] for p in params)
    weights += sum(p.numel * FP32 for p in trainable) if traits.averaged_weights else 0  # the fp32 average beside them
    weights += traits.frozen_parameters * FP32  # a teacher's
    buffers = sum(b.numel * (INT32 if b.name.endswith(".index") else FP32) for b in buffer_specs)
    buffers += 2 * run.tokens * INT64  # the token batch: inputs and targets
    if traits.pruning_masks:  # one bool per block matmul weight
        buffers += cfg.n_layers * sum(out * inp for _, out, inp in cfg.block_linears)
    buffers += traits.kept_logits * run.tokens * cfg.vocab_size * FP32  # a distillation term's logit-sized tensors
    bits8, rank = traits.state_bits == 8, traits.low_rank_gradients or 0
    rules = {p.name: update_rule(p, optimizer, traits) for p in trainable}
    costs = {p.name: optimizer_bytes(p, rules[p.name], pb, bits8, traits.state_block, rank) for p in trainable}
    stacked = muon_stack_sizes([p for p in trainable if rules[p.name] in ("muon", "normuon")
                                and stored[p.name] == FP32])
    step = _Step(cfg, run, traits, grads={p.name: p.numel * stored[p.name] for p in trainable},
                 temps={p.name: stacked.get(p.name, 1) * costs[p.name][2] * pb // FP32
                        + _rounding_work(p, stored[p.name], pb) for p in trainable}, grad_accum=grad_accum)
    states = sum(s for s, _, _ in costs.values())
    states += sum(_rounding_state(p, traits.rounding) for p in trainable if stored[p.name] < pb)
    projections = sum(p for _, p, _ in costs.values())
    full = _activations(cfg, run, traits, checkpointed=False)
    checkpointed = _activations(cfg, run, traits, checkpointed=True)
    acts = checkpointed if traits.recompute_blocks else full
    moments = step.moments(weights + states + projections + buffers, acts)
    peak_at = max(moments, key=moments.__getitem__)
    return MemoryEstimate(methods=traits.names, optimizer=optimizer, weights=weights, gradients=step.alive_grads,
                          optimizer_states=states, projections=projections, activations=acts.total,
                          activations_full=full.total, activations_checkpointed=checkpointed.total,
                          buffers=buffers, logits=step.logits, peak=moments[peak_at], peak_at=peak_at,
                          moments=moments)


def _rounding_state(spec: ParamSpec, rounding: str) -> int:
    """Bytes a low-precision parameter's rounding keeps: Kahan's bf16 compensation (stochastic rounding
    keeps only a Python int)."""
    return 2 * spec.numel if rounding == "kahan" else 0


def _rounding_work(spec: ParamSpec, stored: int, state_bytes: int) -> int:
    """A low-precision parameter's update runs on copies in the states' precision (flopwise/optim/rounding.py):
    the weight's and its gradient's."""
    return 2 * spec.numel * state_bytes if stored < state_bytes else 0


@dataclass
class _Step:
    """The order in which a training step makes and frees tensors, enough to find its crests."""

    cfg: ModelConfig
    run: _Compute
    traits: MemoryTraits
    grads: dict[str, int]  # bytes of each trainable parameter's gradient
    temps: dict[str, int]  # bytes of each one's update working tensors
    grad_accum: int

    @property
    def updates_in_backward(self) -> bool:
        return self.traits.updates_in_backward

    @property
    def logits(self) -> int:
        """The log-softmax kept for backward, and backward's fp32 gradients with respect to it and to
        the logits (the logits themselves are freed when the forward returns: nothing keeps them)."""
        return 3 * self.run.tokens * self.cfg.vocab_size * FP32

    @property
    def tied_head_grad(self) -> int:
        """A tied embedding's gradient from the head, made first in backward and kept to the end,
        when autograd adds the embedding's own part to it out of place: the two and their sum
        exist at once."""
        return self.grads.get("embed_tokens.weight", 0) if self.cfg.tie_embeddings else 0

    @property
    def alive_grads(self) -> int:
        """Gradients alive at once: all; with updates inside backward the largest, plus a tied head's."""
        if self.updates_in_backward:
            return self.tied_head_grad + max(self.grads.values(), default=0)
        return sum(self.grads.values())

    def _update(self, name: str) -> int:
        """Gradient plus update working bytes of one parameter (0 when it does not train)."""
        return self.grads.get(name, 0) + self.temps.get(name, 0)

    def _largest_block_update(self) -> int:
        return max((self._update(n) for n in self.grads if n.startswith("layers.")), default=0)

    def moments(self, base: int, acts: _Activations) -> dict[str, int]:
        """Live bytes where the step crests; ``base``: weights, states and buffers."""
        cfg, run = self.cfg, self.run
        stream = run.tokens * cfg.d_model * FP32  # the residual stream's gradient
        all_grads = sum(self.grads.values())
        earlier = all_grads if self.grad_accum > 1 else 0  # accumulated by earlier micro-batches
        # made before the blocks' backward: the head's and final norm's; made last: the embeddings'
        # (a tied embedding's first part comes with the head's)
        late = {"embed_positions.weight", *EMBEDDING_OPTIONS} | (set() if cfg.tie_embeddings
                                                                    else {"embed_tokens.weight"})
        head_grads = sum(v for k, v in self.grads.items() if not k.startswith("layers.") and k not in late)
        late_grads = sum(self.grads.get(k, 0) for k in late)
        block_grads = (all_grads - head_grads - late_grads) // cfg.n_layers
        mlp = self._mlp_crest()
        recompute = acts.block - stream if self.traits.recompute_blocks else 0  # its input is kept anyway
        in_blocks = base + acts.blocks + acts.before + stream
        if self.updates_in_backward:  # updates inside backward: the head's first, the blocks', the embedding's last
            return {
                "loss": base + acts.total + self.logits,
                "head update": base + acts.total + stream + self._update("lm_head.weight"),
                "last block": in_blocks + self.tied_head_grad + mlp + recompute,
                "block update": in_blocks + self.tied_head_grad + recompute + self._largest_block_update(),
                "embedding update": base + max(self._update("embed_tokens.weight"), 3 * self.tied_head_grad),
            }
        return {
            "loss": base + earlier + acts.total + self.logits,
            "last block": in_blocks + max(earlier, head_grads) + mlp + recompute,
            "first block": base + max(earlier, all_grads - late_grads - block_grads) + acts.block + acts.before
            + stream + mlp,
            "embedding backward": base + all_grads + max(stream, 2 * self.tied_head_grad),
            "optimizer": base + all_grads + max(self.temps.values(), default=0),
        }

    def _mlp_crest(self) -> int:
        """What a block's MLP backward adds at its crest: its hidden gradients and, unless an update inside
        backward has spent it already, down_proj's weight gradient.  A block LISA leaves frozen keeps less
        for backward but frees less during it; which block is on top is random, so the larger."""
        cfg, run, traits = self.cfg, self.run, self.traits
        down_grad = max((v for k, v in self.grads.items() if k.startswith("layers.") and ".down_proj." in k),
                        default=0)
        crest = _mlp_backward_extra(cfg, run, traits, True) + (0 if self.updates_in_backward else down_grad)
        if traits.factorized is not None:  # SLTrain's own backward of up (or gate): its factors' gradients on
            # top, and under autocast its dense weight gradient in both precisions for a moment
            crest += sum(v for k, v in self.grads.items() if k.startswith("layers.0.mlp.up_proj.")
                         and k.endswith((".A", ".B")))
            crest += run.c * cfg.hidden * cfg.d_model if run.autocast else 0
        if trained_blocks(cfg, traits) < cfg.n_layers and not traits.adapter_rank:
            crest = max(crest, _mlp_backward_extra(cfg, run, traits, False))
        return crest
