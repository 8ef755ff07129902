"""Structured width pruning of a trained model (Minitron: Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation", arXiv:2407.14679; Sreenivas et al. 2024, "LLM Pruning and Distillation in
Practice: The Minitron Approach", arXiv:2408.11796).

A run with ``--init-from BIG --method prune_width`` trains a physically narrower model from the start: the resolve
stage asks ``train_shape`` for the shape (fewer attention heads, fewer MLP channels, the same depth, embedding and
head), so plan.json, the FLOP count, the memory estimate, the checkpoints and final/ all describe the small model.
Before the first step the stage loads the big model and hands it, with ``calibration`` windows of the run's training
data, to ``fill_from``: one forward pass scores every head and channel by its activations, and the small model takes
the weights of the most important ones.  The retraining that follows is the run itself (with ``distill``, Minitron's
logit distillation from the big model).

Importance (Minitron section 2.2, activation-based, from a forward pass only):
- an attention head: the L2 norm of its output (its slice of o_proj's input) at each token, averaged over the batch
  and the sequence;
- an MLP channel: the absolute value of its activation (down_proj's input: silu(gate) * up for SwiGLU), averaged
  over the batch and the sequence.
Every layer keeps the same number of heads and channels, the most important of its own, in their original order,
so the result is a uniform Llama/Qwen3 shape that transformers loads.  With grouped-query attention each KV group
keeps the same number of its query heads and every KV head stays (Minitron-4B keeps Nemotron-4 15B's 8 KV groups
with 32 of its 48 query heads); with one query head per KV head whole heads go, keys and values too.  The head
width stays (``model.head_size`` is set where n_heads * head_dim no longer equals d_model; Qwen3 does the same).
The embedding channels, which Minitron prunes too, are kept here.

Defaults: ``heads`` 2/3 and ``mlp`` 3/8, Minitron-4B's shares of Nemotron-4 15B (32 of 48 heads, MLP 9216 of 24576).
``calibration``: Minitron scores on 1024 samples; a small model's importance ranks settle on far fewer, so 64
windows of model.seq_len tokens (the forward's FLOPs are metered as part of the budget's cost).

The big model is needed only before the first step: a resumed run loads its own (small) checkpoint, and a run
restarted before its first checkpoint calibrates again on the same windows, so it prunes the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from flopwise.errors import FlopwiseError
from flopwise.methods.base import PRETRAIN, Calibration, Method, MethodConfig, RunView, World
from flopwise.model.config import ModelConfig
from flopwise.model.flops import forward_flops_per_token
from flopwise.model.gpt import GPT
from flopwise.section import in_range

NO_IMPORT = "width pruning shrinks a trained model: give --init-from RUN/final or a HF folder"


class WidthPruningConfig(MethodConfig):
    """Shares of attention heads (``heads``) and MLP channels (``mlp``) each layer keeps, and the ``calibration``
    windows their importance is measured on; see the module docstring for the defaults' sources."""

    heads: float = 2 / 3
    mlp: float = 3 / 8
    calibration: int = 64

    _shares = in_range("heads", "mlp", low=0, high=1, above=True)
    _calibration = in_range("calibration", low=1)


@dataclass(frozen=True)
class KeptWidth:
    """How many query heads, KV heads and MLP channels each layer keeps."""

    heads: int
    kv_heads: int
    channels: int


def kept_width(config: WidthPruningConfig, model: ModelConfig) -> KeptWidth:
    """The counts each layer of ``model`` keeps (refused in one line where a share keeps none)."""
    group = model.n_heads // model.kv_heads
    if group > 1:  # grouped-query attention: every KV group keeps the same number of its query heads
        per_group = round(config.heads * group)
        if per_group == 0:
            raise FlopwiseError(f"methods.prune_width.heads={config.heads:g} keeps 0 of the {group} query heads of "
                                f"each KV group: raise it to at least {1 / group:.3g}")
        heads, kv_heads = per_group * model.kv_heads, model.kv_heads
    else:
        heads = kv_heads = round(config.heads * model.n_heads)
        if heads == 0:
            raise FlopwiseError(f"methods.prune_width.heads={config.heads:g} keeps 0 of the {model.n_heads} "
                                f"attention heads: raise it to at least {1 / model.n_heads:.3g}")
    channels = round(config.mlp * model.hidden)
    if channels == 0:
        raise FlopwiseError(f"methods.prune_width.mlp={config.mlp:g} keeps 0 of the {model.hidden} MLP channels: "
                            f"raise it to at least {1 / model.hidden:.3g}")
    return KeptWidth(heads, kv_heads, channels)


def pruned_shape(config: WidthPruningConfig, model: ModelConfig) -> ModelConfig:
    """``model`` with each layer's kept heads and channels; the head width stays (``head_size`` set where the heads no
    longer span d_model, unset where they do, as an import of its export reads it)."""
    kept = kept_width(config, model)
    return dataclasses.replace(model, n_heads=kept.heads,
                               n_kv_heads=None if model.n_kv_heads is None else kept.kv_heads,
                               head_size=None if kept.heads * model.head_dim == model.d_model else model.head_dim,
                               mlp_hidden=kept.channels)


def head_scores(attention_output: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads]: the mean over batch and sequence of each head's output L2 norm, from o_proj's input
    [B, T, n_heads * head_dim]."""
    b, t, _ = attention_output.shape
    return attention_output.float().view(b, t, n_heads, -1).norm(dim=-1).mean(dim=(0, 1))


def channel_scores(activation: torch.Tensor) -> torch.Tensor:
    """[hidden]: the mean over batch and sequence of each MLP channel's absolute activation (down_proj's input)."""
    return activation.float().abs().mean(dim=(0, 1))


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest ``scores``, in ascending (original) order."""
    return torch.topk(scores, k).indices.sort().values


def kept_heads(scores: torch.Tensor, kept: KeptWidth, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, KV heads kept), ascending: the top heads of each KV group where KV heads are shared, else
    the top heads overall with their own KV heads."""
    n_heads = scores.numel()
    if kv_heads == n_heads:  # one query head per KV head: whole heads go
        heads = top_sorted(scores, kept.heads)
        return heads, heads
    group = n_heads // kv_heads
    per_group = kept.heads // kv_heads
    heads = [g * group + top_sorted(scores[g * group:(g + 1) * group], per_group) for g in range(kv_heads)]
    return torch.cat(heads), torch.arange(kv_heads)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (channels) of the heads ``heads`` in a [heads * head_dim, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def importance(model: GPT, windows: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores, channel scores) of every layer of ``model`` over the calibration ``windows`` [N, T] of token ids,
    run ``batch_size`` windows at a time: the batches' scores averaged, each weighted by its windows."""
    n_heads = model.config.n_heads
    heads: list[list[torch.Tensor]] = [[] for _ in model.layers]  # per layer, one score vector per batch
    channels: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda _, args, i=i: heads[i].append(head_scores(args[0], n_heads).cpu())))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda _, args, i=i: channels[i].append(channel_scores(args[0]).cpu())))
    device = model.embed_tokens.weight.device
    sizes = []
    try:
        model.eval()
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            sizes.append(len(chunk))
            model(chunk.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    shares = torch.tensor(sizes, dtype=torch.float32) / len(windows)
    return [shares @ torch.stack(scores) for scores in heads], [shares @ torch.stack(scores) for scores in channels]


@torch.no_grad()
def slice_into(big: GPT, small: GPT, heads: list[torch.Tensor], channels: list[torch.Tensor]) -> None:
    """Fill ``small`` with ``big``'s weights of the most important query heads (and their KV heads) and MLP channels
    of each layer, by the layers' ``heads`` and ``channels`` scores, as many as ``small`` has; every other weight
    (embeddings, norms, the head, the QK-norm gains that all heads share) is copied as it is."""
    cfg, small_cfg = big.config, small.config
    kept = KeptWidth(small_cfg.n_heads, small_cfg.kv_heads, small_cfg.hidden)
    state = dict(big.state_dict())
    head_dim = cfg.head_dim
    for i in range(cfg.n_layers):
        q_heads, kv_heads = kept_heads(heads[i], kept, cfg.kv_heads)
        q_rows, kv_rows = head_rows(q_heads, head_dim), head_rows(kv_heads, head_dim)
        mlp_rows = top_sorted(channels[i], kept.channels)
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                "mlp.gate_proj": mlp_rows, "mlp.up_proj": mlp_rows}
        columns = {"self_attn.o_proj": q_rows, "mlp.down_proj": mlp_rows}
        prefix = f"layers.{i}."
        for name, index in rows.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{name}.{kind}"
                if key in state:
                    state[key] = state[key][index]
        for name, index in columns.items():
            key = f"{prefix}{name}.weight"
            if key in state:
                state[key] = state[key][:, index]
        if f"{prefix}self_attn.value_embed" in state:  # a value embedding per KV channel, a gate per KV head
            state[f"{prefix}self_attn.value_embed"] = state[f"{prefix}self_attn.value_embed"][:, kv_rows]
            state[f"{prefix}self_attn.value_gate"] = state[f"{prefix}self_attn.value_gate"][kv_heads]
    small.load_state_dict(state, strict=True)


def calibration_flops(model: ModelConfig, windows: int) -> float:
    """FLOPs of one forward pass of ``model`` over ``windows`` windows of model.seq_len tokens."""
    return forward_flops_per_token(model) * windows * model.seq_len


class WidthPruning(Method):
    """Minitron's structured width pruning; see the module docstring."""

    name: ClassVar[str] = "prune_width"
    Config = WidthPruningConfig
    stages = PRETRAIN

    def __init__(self, config: WidthPruningConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self._unmetered = 0.0

    @classmethod
    def check(cls, config: WidthPruningConfig, run: RunView, world: World | None) -> None:
        if not run.imported:
            raise FlopwiseError(f"methods.use 'prune_width': {NO_IMPORT}")

    @classmethod
    def train_shape(cls, config: WidthPruningConfig, model: ModelConfig) -> ModelConfig:
        return pruned_shape(config, model)

    @classmethod
    def calibration_windows(cls, config: WidthPruningConfig) -> int:
        return config.calibration

    def fill_from(self, imported: GPT, model: GPT, calibration: Calibration) -> bool:
        windows = calibration.windows
        heads, channels = importance(imported, windows, calibration.batch_size)
        slice_into(imported, model, heads, channels)
        # every process scores the same windows (so all prune alike): each one's forward is spent
        self._unmetered += calibration_flops(dataclasses.replace(imported.config, seq_len=windows.shape[1]),
                                             len(windows)) * calibration.processes
        return True

    def take_extra_flops(self) -> float:
        flops, self._unmetered = self._unmetered, 0.0
        return flops
