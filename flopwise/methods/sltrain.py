"""SLTrain (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", NeurIPS 2024; github.com/andyjm3/SLTrain), with the weight refactorization
and momentum reset of Glentis et al. 2025 ("Scalable Parameter and Memory Efficient Pretraining for
LLM: Recent Algorithmic Advances and Benchmarking"; github.com/OptimAI-Lab/Memory_Efficient_Pretraining).

Every block Linear becomes W = (alpha / r) * B @ A + S: a rank-r product plus a sparse S whose
support (delta * m * n entries) is drawn uniformly once and fixed; only B, A and S's values train.
The low rank learns the head of W's spectrum, the random sparse part its tail, so the sum can be
of full rank with only r(m + n) + delta*m*n parameters.  Initialization and scaling follow the SLTrain repo:
B = 0, A and the sparse values U(-1/sqrt(in), 1/sqrt(in)) (A by Kaiming-uniform with a=sqrt(5),
the same bound), alpha = 32 (its default; its 130M script uses 16).

Every ``refactor_every`` steps the factors are rebalanced (B, A <- U sqrt(S), sqrt(S) V^T for
B A = U S V^T; same product), their and the sparse values' optimizer states are reset, and the LR
restarts from 0.001 of the schedule, back to it linearly over ``rewarmup`` steps (the paper's
"cosine_quick_recovery" schedule, 200 and 10 steps in its 1B run).  Their code rebuilds the whole
optimizer at each restart; here only the factorized layers' states are cleared, since only their
coordinates change.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flopwise.memory.traits import Factorization, MemoryTraits
from flopwise.methods.base import Method, MethodConfig, RunView, World, default_rank
from flopwise.methods.dense import replace_block_linears
from flopwise.model.config import ModelConfig
from flopwise.section import in_range

ALPHA = 32.0
REWARMUP_START = 1e-3


def sparse_plus_low_rank(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The dense weight scale * B @ A + S (S given by its flat row-major ``index`` and ``values``),
    in the factors' dtype even under autocast, so the sparse values add at full precision."""
    with torch.autocast(B.device.type, enabled=False):
        weight = (B @ A).mul_(scale)
        weight.view(-1).index_add_(0, index, values)
    return weight


class _SparsePlusLowRankLinear(torch.autograd.Function):
    """x @ W^T with W = scale * B @ A + S, keeping only x and the factors for backward: W is rebuilt
    there, so one layer's dense weight (and its gradient) exists at a time, never all of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor,  # type: ignore[override]
                index: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, B, A, values, index)
        ctx.scale = scale
        return F.linear(x, sparse_plus_low_rank(B, A, values, index, scale))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, B, A, values, index = ctx.saved_tensors
        need_x, need_b, need_a, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_b = grad_a = grad_values = None
        # As autograd through an autocast Linear: products in the output gradient's dtype,
        # gradients returned in each input's dtype.
        dtype = grad_out.dtype
        if need_x:
            weight = sparse_plus_low_rank(B, A, values, index, ctx.scale)
            grad_x = (grad_out @ weight.to(dtype)).to(x.dtype)
            del weight
        if need_b or need_a or need_values:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(B.dtype)  # dL/dW, [out, in]
            if need_b:
                grad_b = ctx.scale * (grad_w @ A.T)
            if need_a:
                grad_a = ctx.scale * (B.T @ grad_w)
            if need_values:
                grad_values = grad_w.view(-1)[index]
        return grad_x, grad_b, grad_a, grad_values, None, None


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class SparseLowRankLinear(nn.Module):
    """Stand-in for ``nn.Linear(in_features, out_features)`` with W = (alpha / rank) * B @ A + S.

    Parameters: ``B`` [out, rank] and ``A`` [rank, in] (dtype of the replaced weight), ``values``
    [nnz] with nnz = round(delta * out * in), and ``bias`` [out] when the Linear had one.  Buffer
    (persistent, in the state dict): ``index`` [nnz] int32, the sorted flat row-major positions
    (row * in + col) of S's support.  ``rank`` is capped at min(in, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, delta: float, alpha: float = ALPHA,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if in_features * out_features >= 2**31:
            raise ValueError(f"a {out_features} x {in_features} weight has too many entries for int32 indices")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.in_features, self.out_features = in_features, out_features
        self.rank = min(rank, in_features, out_features)
        self.scale = alpha / self.rank
        bound = 1 / math.sqrt(in_features)
        self.B = nn.Parameter(torch.zeros(out_features, self.rank))
        self.A = nn.Parameter(_uniform((self.rank, in_features), bound, generator))
        nnz = round(delta * in_features * out_features)
        support = torch.randperm(in_features * out_features, generator=generator)[:nnz]
        self.register_buffer("index", support.sort().values.to(torch.int32))
        self.values = nn.Parameter(_uniform((nnz,), bound, generator))
        self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, delta: float, alpha: float,
                    generator: torch.Generator) -> SparseLowRankLinear:
        """A fresh factorization in the Linear's place (its weight is dropped, its bias kept)."""
        module = cls(linear.in_features, linear.out_features, rank, delta, alpha, generator)
        module.to(device=linear.weight.device, dtype=linear.weight.dtype)
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SparsePlusLowRankLinear.apply(x, self.B, self.A, self.values, self.index, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W as an ordinary Linear weight [out, in], for export and evaluation."""
        return sparse_plus_low_rank(self.B, self.A, self.values, self.index, self.scale)

    @torch.no_grad()
    def refactorize(self) -> None:
        """Rebalance B, A to U sqrt(S), sqrt(S) V^T of B A = U S V^T (so B^T B = A A^T = S) with the
        product unchanged.  The SVD is taken of the r x r core of thin QRs of B and A^T, the same
        factorization as an SVD of B A at O((m + n) r^2) cost.  A never-trained B (all zero) is left
        alone: its balanced factors would both be zero and could never move again."""
        if not self.B.any():
            return
        q_b, r_b = torch.linalg.qr(self.B.double())
        q_a, r_a = torch.linalg.qr(self.A.double().T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        root = s.sqrt()
        self.B.copy_((q_b @ u) * root)
        self.A.copy_(root[:, None] * (vh @ q_a.T))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")


class SLTrainConfig(MethodConfig):
    """``rank`` (unset: d_model // 4), sparse density ``delta``, scaling ``alpha``; refactorize every
    ``refactor_every`` steps and re-warm the LR over ``rewarmup`` steps (see the module docstring)."""

    rank: int | None = None
    delta: float = 0.03
    alpha: float = ALPHA
    refactor_every: int = 200
    rewarmup: int = 10

    _counts = in_range("rank", "refactor_every", low=1)  # rank None: d_model // 4
    _rewarmup = in_range("rewarmup", low=0)  # 0 or 1: no re-warming
    _density = in_range("delta", low=0, high=1, above=True, below=True)
    _alpha = in_range("alpha", low=0, above=True)


class SLTrain(Method):
    """Replace every block Linear by a ``SparseLowRankLinear`` (rank: ``rank`` or d_model // 4);
    refactorize, reset the factorized layers' optimizer states and re-warm the LR every
    ``refactor_every`` steps.  ``seed`` fixes the sparse supports and the initial factors."""

    name: ClassVar[str] = "sltrain"
    Config = SLTrainConfig
    saves_memory = True
    legacy_keys = {f"memory.sltrain_{key}": key for key in ("rank", "delta", "alpha", "refactor_every", "rewarmup")}
    conflicts = {"lora": "SLTrain replaces the dense weights that LoRA would adapt",
                 "galore": "GaLore projects the gradients of dense matrices, and SLTrain leaves none"}

    def __init__(self, config: SLTrainConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.rank, self.delta, self.alpha = config.rank, config.delta, config.alpha
        self.refactor_every, self.rewarmup = config.refactor_every, config.rewarmup

    @classmethod
    def check(cls, config: SLTrainConfig, run: RunView, world: World | None) -> None:
        cls.refuse_sharded(world)

    @classmethod
    def memory(cls, config: SLTrainConfig, traits: MemoryTraits, model: ModelConfig) -> None:
        traits.factorized = Factorization(default_rank(config.rank, model.d_model), config.delta)

    def configure(self, model: nn.Module) -> None:
        rank = default_rank(self.rank, model.config.d_model)
        generator = torch.Generator().manual_seed(self.seed)
        replace_block_linears(
            model, lambda linear: SparseLowRankLinear.from_linear(linear, rank, self.delta, self.alpha, generator))

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step % self.refactor_every:
            return
        for module in model.modules():
            if isinstance(module, SparseLowRankLinear):
                module.refactorize()
                for param in module.parameters():
                    optimizer.state.pop(param, None)

    def lr_factor(self, step: int) -> float:
        """0.001 right after a refactorization, rising linearly to 1 at its ``rewarmup - 1``-th step."""
        since = step % self.refactor_every
        if step < self.refactor_every or since >= self.rewarmup or self.rewarmup < 2:
            return 1.0
        return REWARMUP_START + (1 - REWARMUP_START) * since / (self.rewarmup - 1)
