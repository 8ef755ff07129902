"""The optimizer side of memory-efficient training: blockwise 8-bit states against a brute-force
code search, 8-bit AdamW/Muon against 32-bit, GaLore against an independent eigendecomposition
(and against torch.optim.AdamW in rotated coordinates), per-layer updates during backward against
the ordinary step, exact checkpoint resume, and a small real training run."""

from __future__ import annotations

import math
import pydoc_data.topics

import pytest
import torch

from flopwise.errors import FlopwiseError
from flopwise.methods import galore
from flopwise.methods.layerwise import LayerwiseUpdates
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.optim.config import OptimSection
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.optim.quantize import dequantize, quantize
from flopwise.optim.routing import is_hidden_matrix
from flopwise.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tests.helpers import resolved_with, stack_of

CPU = torch.device("cpu")


def _wide_range(n: int, seed: int) -> torch.Tensor:
    """Values spread over many orders of magnitude, as optimizer moments are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))


def _nearest_rung(x: torch.Tensor, absmax: float, rungs: int, octaves: float) -> torch.Tensor:
    """Brute force: the ladder value nearest to each |x| in log space (the map's definition)."""
    ladder = absmax * 2.0 ** (-octaves * (rungs - torch.arange(1, rungs + 1, dtype=torch.float64)) / (rungs - 1))
    distance = (torch.log(x.abs().double()).unsqueeze(1) - torch.log(ladder)).abs()
    return ladder[distance.argmin(dim=1)]


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_a_brute_force_nearest_code_and_bounds_the_relative_error(signed):
    x = _wide_range(1000, 0)
    x = x if signed else x.square()
    codes, absmax = quantize(x, block=256, signed=signed)
    assert codes.shape == x.shape and codes.dtype == (torch.int8 if signed else torch.uint8)
    assert absmax.shape == (4,) and absmax.dtype == torch.float32  # ceil(1000 / 256) blocks
    decoded = dequantize(codes, absmax, block=256, signed=signed)
    rungs, octaves = (127, 12.0) if signed else (255, 24.0)
    for b in range(4):
        part, out = x[b * 256:(b + 1) * 256], decoded[b * 256:(b + 1) * 256]
        top = part.abs().max()
        assert absmax[b] == top and out.abs().max() == top  # the largest element is exact
        inside = part.abs() >= top * 2.0 ** -octaves
        expected = _nearest_rung(part[inside], top.item(), rungs, octaves).float() * part[inside].sign()
        assert torch.allclose(out[inside], expected, rtol=1e-5)
        bound = 2.0 ** (octaves / (2 * (rungs - 1))) - 1  # half a rung: 3.4%
        assert ((out[inside] - part[inside]).abs() / part[inside].abs()).max() <= bound + 1e-5


def test_second_moment_never_decodes_to_zero_and_zero_stays_zero():
    v = torch.tensor([1.0, 1e-3, 1e-9, 1e-20, 1e-38, 0.0, 0.5, 3e-30])
    decoded = dequantize(*quantize(v, block=4, signed=False), block=4, signed=False)
    assert (decoded[v > 0] > 0).all() and decoded[v == 0].eq(0).all()
    assert (decoded[v > 0] >= v[v > 0] * (1 - 0.035)).all()  # below the range it rounds up, never down
    first = torch.tensor([1.0, -1e-9, 2e-4, -0.3])  # the signed map may round what is below its range to 0
    decoded = dequantize(*quantize(first, block=4, signed=True), block=4, signed=True)
    assert decoded[1] == 0 and decoded[2] == 2.0 ** -12 and decoded[3] < 0  # 2e-4: up to the lowest rung
    assert dequantize(*quantize(torch.zeros(5), 4, False), 4, False).eq(0).all()


def _regression(bits: int, update: str, lr: float, steps: int) -> tuple[list[torch.Tensor], float]:
    """Least squares with a linearly decaying LR; the weights after every step and the final loss."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 48, generator=g), torch.randn(48, 40, generator=g)
    y = x @ target + 0.01 * torch.randn(256, 40, generator=g)
    w = torch.nn.Parameter(torch.zeros(48, 40))
    optimizer = FlopwiseOptimizer([{"params": [w], "update": update, "lr": lr}], state_bits=bits, state_block=64)
    trajectory = []
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * (1 - step / steps)
        (x @ w - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(w.detach().clone())
    return trajectory, (x @ w - y).square().mean().item()


def test_8bit_adamw_follows_the_32bit_trajectory():
    full, full_loss = _regression(32, "adamw", lr=0.1, steps=150)
    eight, eight_loss = _regression(8, "adamw", lr=0.1, steps=150)
    assert max(((a - b).norm() / a.norm()).item() for a, b in zip(full[5:], eight[5:])) < 0.04
    assert full_loss < 1e-3 and abs(eight_loss - full_loss) < 0.05 * full_loss


def test_8bit_muon_reaches_the_32bit_solution():
    # Muon's orthogonalized steps amplify small differences mid-way; the end point agrees
    full, full_loss = _regression(32, "muon", lr=0.3, steps=300)
    eight, eight_loss = _regression(8, "muon", lr=0.3, steps=300)
    assert full_loss < 1e-3 and abs(eight_loss - full_loss) < 0.05 * full_loss
    assert (full[-1] - eight[-1]).norm() / full[-1].norm() < 2e-3


def _top_subspace(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Independent of the SVD: the top eigenvectors of the Gram matrix on the smaller side."""
    gram = grad.T @ grad if grad.shape[0] >= grad.shape[1] else grad @ grad.T
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, -rank:].float()  # eigh sorts ascending


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_galore_projection_matches_an_eigendecomposition(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    basis = galore.projection(grad, rank=6)
    q = _top_subspace(grad, 6)
    small = min(shape)
    assert basis.shape == (small, 6)
    assert torch.allclose(basis @ basis.T, q @ q.T, atol=1e-4)  # the same subspace
    low = galore.project(grad, basis)
    assert low.shape == ((shape[0], 6) if shape[0] >= shape[1] else (6, shape[1]))
    rank6 = grad @ q @ q.T if shape[0] >= shape[1] else q @ q.T @ grad  # the best rank-6 approximation
    assert torch.allclose(galore.project_back(low, basis, grad.shape), rank6, atol=1e-4)
    assert galore.projection(grad, rank=1000).shape == (small, small)  # rank clamped to min(rows, cols)


def test_galore_first_step_by_hand():
    grad = torch.randn(30, 12, generator=torch.Generator().manual_seed(2))
    w = torch.nn.Parameter(torch.randn(30, 12, generator=torch.Generator().manual_seed(3)))
    start = w.detach().clone()
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "galore", "lr": 0.1, "weight_decay": 0.01}],
                                  rank=4, scale=0.25, eps=0.0)
    w.grad = grad
    optimizer.step()
    q = _top_subspace(grad, 4)
    # Adam's first step is sign(projected gradient); the column signs of q cancel in sign(G q) q^T
    expected = start * (1 - 0.1 * 0.01) - 0.1 * 0.25 * torch.sign(grad @ q) @ q.T
    assert torch.allclose(w.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])
def test_full_rank_galore_is_adamw_in_the_rotated_coordinates(shape):
    """With rank min(m, n) and scale 1 the basis P is orthogonal, so GaLore-Adam on W is AdamW on
    W P (tall; P^T W when wide) with gradients G P; Adam's sign and order equivariance makes any
    eigenbasis of the first gradient serve as P."""
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(*shape, generator=g) for _ in range(6)]
    w = torch.nn.Parameter(torch.randn(*shape, generator=g))
    tall = shape[0] >= shape[1]
    p = _top_subspace(grads[0], min(shape))
    rotated = torch.nn.Parameter((w @ p if tall else p.T @ w).detach().clone())
    ours = FlopwiseOptimizer([{"params": [w], "update": "galore", "lr": 0.05, "weight_decay": 0.1}],
                             rank=min(shape), scale=1.0, update_gap=1000)
    reference = torch.optim.AdamW([rotated], lr=0.05, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for grad in grads:
        w.grad = grad.clone()
        rotated.grad = grad @ p if tall else p.T @ grad
        ours.step()
        reference.step()
    back = rotated.detach() @ p.T if tall else p @ rotated.detach()
    assert torch.allclose(w.detach(), back, atol=1e-5)


def test_galore_refreshes_every_update_gap_steps_and_keeps_its_moments():
    w = torch.nn.Parameter(torch.randn(16, 10))
    optimizer = FlopwiseOptimizer([{"params": [w], "update": "galore", "lr": 0.01}], rank=3, update_gap=3,
                                  betas=(0.9, 0.95))
    state = optimizer.state[w]
    bases = []
    for step in range(1, 9):
        w.grad = torch.randn(16, 10, generator=torch.Generator().manual_seed(step))
        before = state["exp_avg"].clone() if step > 1 else torch.zeros(16, 3)
        optimizer.step()
        bases.append(state["projection"].clone())
        # the first moment carries over a refresh: it is not reset to the new projected gradient
        expected = 0.9 * before + 0.1 * galore.project(w.grad, state["projection"])
        assert torch.allclose(state["exp_avg"], expected, atol=1e-6)
        if step in (1, 4, 7):  # refreshed from this step's gradient
            assert torch.equal(bases[-1], galore.projection(w.grad, 3))
    changed = [step for step in range(2, 9) if not torch.equal(bases[step - 1], bases[step - 2])]
    assert changed == [4, 7]


def test_state_sizes_are_as_documented_for_memory_estimates():
    tall, wide, vector = (torch.nn.Parameter(torch.randn(*shape)) for shape in ((40, 24), (24, 40), (300,)))
    optimizer = FlopwiseOptimizer([{"params": [tall, wide], "update": "galore"}, {"params": [vector]}],
                                  rank=5, state_bits=8, state_block=64)
    for param in (tall, wide, vector):
        param.grad = torch.randn_like(param)
    optimizer.step()

    def nbytes(param: torch.Tensor) -> dict[str, int]:
        return {key: t.numel() * t.element_size() for key, t in optimizer.state[param].items()}

    moments = {"exp_avg_q": 200, "exp_avg_absmax": 4 * 4, "exp_avg_sq_q": 200, "exp_avg_sq_absmax": 4 * 4, "step": 4}
    assert nbytes(tall) == dict(moments, projection=24 * 5 * 4)  # moments of the 40 x 5 projected gradient
    assert nbytes(wide) == dict(moments, projection=24 * 5 * 4)  # ... of the 5 x 40 one
    assert nbytes(vector) == {"exp_avg_q": 300, "exp_avg_absmax": 5 * 4, "exp_avg_sq_q": 300,
                              "exp_avg_sq_absmax": 5 * 4, "step": 4}


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, seq_len=16, tie_embeddings=True))


def _batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 256, (4, 17), generator=g) for _ in range(count)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


SETUPS = {"adamw": ("adamw", []), "muon": ("muon", []), "galore": ("adamw", ["galore"]),
          "muon-8bit": ("muon", ["8bit"]), "galore-8bit": ("adamw", ["galore", "8bit"])}


def _build(setup: str, layerwise: bool, seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    name, methods = SETUPS[setup]
    model = _tiny_gpt(seed)
    stack = stack_of(methods + ["layerwise"] * layerwise, "methods.galore.update_gap=3", "methods.galore.rank=8",
                     "methods.8bit.block=64", f"optim.name={name}")
    optim = OptimSection(name=name, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    return model, build_optimizer(model, optim, CPU, stack.shape_optimizer)


def _train(model: GPT, optimizer: torch.optim.Optimizer, batches, first_step: int = 0) -> list[float]:
    losses = []
    for step, (x, y) in enumerate(batches, start=first_step):
        for group in optimizer.param_groups:  # as the trainer does: the LR changes every step
            group["lr"] = group["peak_lr"] * (1 - 0.05 * step)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("setup", ["adamw", "muon", "galore", "galore-8bit"])
def test_layerwise_updates_equal_the_ordinary_step_with_fewer_gradients_alive(setup):
    batches = _batches(4)
    plain_model, plain = _build(setup, layerwise=False)
    model, optimizer = _build(setup, layerwise=True)
    assert LayerwiseUpdates.of(optimizer) is not None and LayerwiseUpdates.of(plain) is None
    plain_alive, plain_fired = _count_gradients(plain_model)
    alive, fired = _count_gradients(model)
    _train(plain_model, plain, batches)
    _train(model, optimizer, batches)
    for (name, a), b in zip(plain_model.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # once per backward and parameter, the tied embedding/head weight included
    assert set(fired.values()) == set(plain_fired.values()) == {len(batches)}
    assert max(plain_alive) == len(list(model.parameters()))  # the ordinary step holds every gradient at once
    assert max(alive) == 0  # per layer, each gradient is used and freed the moment it is complete


def _count_gradients(model: GPT) -> tuple[list[int], dict[int, int]]:
    """Hooks registered after the optimizer's: how many gradients are alive after each parameter's
    hooks ran, and how often each parameter's hook fired."""
    params = list(model.parameters())
    alive: list[int] = []
    fired: dict[int, int] = {}

    def count(param: torch.Tensor) -> None:
        fired[id(param)] = fired.get(id(param), 0) + 1
        alive.append(sum(p.grad is not None for p in params))

    for param in params:
        param.register_post_accumulate_grad_hook(count)
    return alive, fired


def test_removing_the_layerwise_hooks_restores_the_ordinary_step():
    model, optimizer = _build("adamw", layerwise=True)
    LayerwiseUpdates.of(optimizer).remove()
    assert LayerwiseUpdates.of(optimizer) is None
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    model(x, y)[1].backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook consumed them
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("setup,layerwise", [("muon-8bit", False), ("galore", False), ("galore-8bit", True)])
def test_checkpoint_round_trip_continues_bit_exactly(tmp_path, setup, layerwise):
    batches = _batches(5)
    model, optimizer = _build(setup, layerwise)
    _train(model, optimizer, batches[:2])
    save_checkpoint(tmp_path, 2, model, optimizer, state={}, keep=1)
    dtypes = {key: value.dtype for state in optimizer.state.values() for key, value in state.items()}
    expected = _train(model, optimizer, batches[2:], first_step=2)  # refreshes GaLore's projection at step 3

    resumed_model, resumed = _build(setup, layerwise, seed=1)
    load_checkpoint(list_checkpoints(tmp_path)[-1], resumed_model, resumed)
    assert {key: value.dtype for state in resumed.state.values() for key, value in state.items()} == dtypes
    assert _train(resumed_model, resumed, batches[2:], first_step=2) == expected
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_build_routes_parameters_and_rejects_galore_with_muon():
    model = _tiny_gpt()
    with pytest.raises(FlopwiseError, match="set optim.name=adamw"):
        resolved_with(["galore"], "optim.name=muon")
    assert isinstance(build_optimizer(model, OptimSection(name="adamw"), CPU), torch.optim.AdamW)
    optimizer = build_optimizer(model, OptimSection(name="adamw"), CPU,
                                stack_of(["galore", "8bit"], "optim.name=adamw").shape_optimizer)
    galore_group = next(g for g in optimizer.param_groups if g["update"] == "galore")
    assert galore_group["rank"] == 32 // 4 and galore_group["update_gap"] == 200 and galore_group["scale"] == 0.25
    assert all(g["state_bits"] == 8 for g in optimizer.param_groups)
    hidden = {id(p) for n, p in model.named_parameters() if is_hidden_matrix(n, p.ndim)}
    assert {id(p) for p in galore_group["params"]} == hidden and len(hidden) == 2 * 7
    factor = torch.zeros(4, 8)
    assert not is_hidden_matrix("layers.0.self_attn.q_proj.B", factor.ndim)
    assert not is_hidden_matrix("layers.0.self_attn.q_proj.lora_A", factor.ndim)
    assert is_hidden_matrix("layers.0.self_attn.q_proj.weight", factor.ndim)


@pytest.mark.slow
def test_galore_8bit_layerwise_training_learns():
    text = torch.tensor(list(" ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
                             .encode()[:200_000]))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, seq_len=64))
    stack = stack_of(["galore", "8bit", "layerwise"], "methods.galore.update_gap=20", "optim.name=adamw")
    optimizer = build_optimizer(model, OptimSection(name="adamw", lr=1e-2), CPU, stack.shape_optimizer)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        starts = torch.randint(0, len(text) - 65, (8,), generator=g)
        chunk = torch.stack([text[s:s + 65] for s in starts])
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > math.log(256) - 0.5
    assert sum(losses[-10:]) / 10 < losses[0] - 2.0


def test_quantization_in_chunks_gives_the_codes_of_one_pass(monkeypatch):
    """Large states are encoded and decoded a chunk of whole blocks at a time: the same codes, scales and
    values as in one pass (a chunk boundary inside the last, partial block too)."""
    from flopwise.optim import quantize as q

    x = torch.randn(10_007, generator=torch.Generator().manual_seed(0))
    for signed, tensor in ((True, x), (False, x.square())):
        whole = q.quantize(tensor, 64, signed)
        monkeypatch.setattr(q, "CHUNK", 1000)  # 15 blocks of 64 per chunk
        chunked = q.quantize(tensor, 64, signed)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
        decoded = q.dequantize(*chunked, 64, signed)
        monkeypatch.undo()
        assert torch.equal(decoded, q.dequantize(*whole, 64, signed))


def test_the_estimator_chunks_quantization_as_the_optimizer_does():
    from flopwise.memory.estimate import QUANTIZE_CHUNK
    from flopwise.optim.quantize import CHUNK

    assert QUANTIZE_CHUNK == CHUNK
