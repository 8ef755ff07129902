"""Model-side memory methods: activation checkpointing, SLTrain (with refactorization and momentum
reset), LoRA, LISA, the dense export and the registry; each against an independent computation,
and each in a short real training run."""

from __future__ import annotations

import math

import pytest
import torch

from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.methods.checkpointing import ActivationCheckpointing
from flopwise.methods.dense import dense_state_dict
from flopwise.methods.eight_bit import EightBitStates
from flopwise.methods.layerwise import PerLayerUpdates
from flopwise.methods.lisa import LISA
from flopwise.methods.lora import LoRA, LoRALinear
from flopwise.methods.sltrain import SLTrain, SparseLowRankLinear, _SparsePlusLowRankLinear
from flopwise.methods.stack import MethodStack
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.resolve import resolve

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, seq_len=16)
BLOCK_LINEARS = 7 * CFG.n_layers  # q, k, v, o, gate, up, down


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one thread is as fast, and does not stall when another process
    holds the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sltrain(seed: int = 0, **settings) -> SLTrain:
    return SLTrain(SLTrain.Config(**settings), seed)


def lisa(seed: int = 0, **settings) -> LISA:
    return LISA(LISA.Config(**settings), seed)


def lora(seed: int = 0, **settings) -> LoRA:
    return LoRA(LoRA.Config(**settings), seed)


def checkpointing() -> ActivationCheckpointing:
    return ActivationCheckpointing(ActivationCheckpointing.Config())


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def batch(shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch with structure (each row counts up by its own stride), so loss can fall fast."""
    rows = [(torch.arange(CFG.seq_len + 1) * stride + start + shift) % CFG.vocab_size
            for stride, start in ((1, 0), (3, 5), (5, 9), (7, 2))]
    tokens = torch.stack(rows)
    return tokens[:, :-1], tokens[:, 1:]


def train(model: GPT, methods: list, steps: int = 30, lr: float = 1e-2, shift: int = 0) -> list[float]:
    """The trainer's order of hooks: before_step, LR times every lr_factor, step, after_step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    x, y = batch(shift)
    losses = []
    for step in range(steps):
        for method in methods:
            method.before_step(step, model, optimizer)
        for group in optimizer.param_groups:
            group["lr"] = lr * math.prod(method.lr_factor(step) for method in methods)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for method in methods:
            method.after_step(step + 1, model, optimizer)
        losses.append(loss.item())
    return losses


def configured(*methods) -> GPT:
    model = tiny_gpt()
    for method in methods:
        method.configure(model)
    return model


def perturb(module: torch.nn.Module, name: str, seed: int) -> None:
    """Give a zero-initialized factor random values, so tests see a non-trivial product."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in module.named_parameters():
            if param_name.endswith(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --- activation checkpointing ---------------------------------------------------------------------

def saved_bytes(model: GPT) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Bytes of the distinct tensors autograd saves for backward (outside checkpointed regions),
    with the loss and the gradients."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, y = batch()
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return sum(storages.values()), loss.detach(), grads(model)


def test_checkpointing_gives_the_same_loss_and_grads_and_saves_less():
    model = tiny_gpt()
    plain_bytes, plain_loss, plain_grads = saved_bytes(model)
    checkpointing().configure(model)
    assert model.checkpoint_blocks
    ckpt_bytes, ckpt_loss, ckpt_grads = saved_bytes(model)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)
    # even counting the block inputs checkpointing keeps (one residual stream per block)
    x, _ = batch()
    block_inputs = CFG.n_layers * x.numel() * CFG.d_model * 4
    assert ckpt_bytes + block_inputs < plain_bytes / 2


def test_checkpointing_only_wraps_blocks_in_training(monkeypatch):
    import flopwise.model.gpt as gpt

    calls = []
    monkeypatch.setattr(gpt, "checkpoint", lambda *args, **kw: calls.append(1) or torch.utils.checkpoint.checkpoint(
        *args, **kw))
    model = configured(checkpointing())
    x, y = batch()
    model(x, y)
    assert len(calls) == CFG.n_layers
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.generate(x[:1, :4], 5, temperature=0)
    assert len(calls) == CFG.n_layers
    assert torch.equal(model.generate(x[:1, :4], 5, temperature=0), tiny_gpt().generate(x[:1, :4], 5, temperature=0))


def test_checkpointing_trains():
    losses = train(configured(checkpointing()), [])
    assert losses[-1] < losses[0] - 1.0


# --- SLTrain -------------------------------------------------------------------------------------

def small_layer(dtype: torch.dtype = torch.float32, seed: int = 0) -> SparseLowRankLinear:
    layer = SparseLowRankLinear(6, 5, rank=2, delta=0.3, alpha=4.0, generator=torch.Generator().manual_seed(seed))
    perturb(layer, "B", seed)
    return layer.to(dtype)


def dense_formula(layer: SparseLowRankLinear) -> torch.Tensor:
    """W = scale * B @ A + S with S built entry by entry, differentiable by plain autograd."""
    sparse = torch.zeros(layer.out_features * layer.in_features, dtype=layer.B.dtype)
    sparse = sparse.index_put((layer.index.long(),), layer.values)
    return layer.scale * layer.B @ layer.A + sparse.view(layer.out_features, layer.in_features)


def test_sltrain_autograd_function_passes_gradcheck():
    layer = small_layer(torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.B, layer.A, layer.values, layer.index, layer.scale)
    assert torch.autograd.gradcheck(_SparsePlusLowRankLinear.apply, inputs)


def test_sltrain_matches_autograd_through_the_dense_formula():
    layer = small_layer()
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, layer.B, layer.A, layer.values), grad_out)
    reference_out = x @ dense_formula(layer).T
    reference = torch.autograd.grad(reference_out, (x, layer.B, layer.A, layer.values), grad_out)
    torch.testing.assert_close(out, reference_out)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.dense_weight(), dense_formula(layer).detach())


def test_sltrain_under_autocast_matches_an_autocast_linear_of_the_dense_weight():
    layer = small_layer()
    x = torch.randn(2, 3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, layer.B, layer.A, layer.values), grad_out)
    weight = dense_formula(layer)  # in fp32, as the layer builds it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_out = torch.nn.functional.linear(x, weight)
    reference = torch.autograd.grad(reference_out, (x, layer.B, layer.A, layer.values), grad_out)
    assert out.dtype == reference_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_out)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_sltrain_keeps_no_dense_weight_for_backward():
    layer = SparseLowRankLinear(48, 40, rank=4, delta=0.03)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(torch.randn(3, 48)).sum().backward()
    assert (40, 48) not in shapes and (48, 40) not in shapes
    assert sorted(shapes) == sorted([(3, 48), (40, 4), (4, 48), (58,), (58,)])  # x, B, A, values, index


def test_sltrain_support_and_parameter_count():
    delta = 0.03
    model = configured(sltrain(rank=6, delta=delta, seed=3))
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    assert len(layers) == BLOCK_LINEARS
    assert not any(isinstance(m, torch.nn.Linear) for m in model.layers.modules())
    expected = 0
    for layer in layers:
        m, n = layer.out_features, layer.in_features
        nnz = round(delta * m * n)
        assert layer.index.dtype == torch.int32 and layer.index.shape == (nnz,)
        assert torch.unique(layer.index).numel() == nnz
        assert torch.equal(layer.index, layer.index.sort().values)
        assert 0 <= int(layer.index.min()) and int(layer.index.max()) < m * n
        r = min(6, m, n)
        assert (layer.B.shape, layer.A.shape, layer.values.shape) == ((m, r), (r, n), (nnz,))
        assert layer.scale == 32.0 / r
        assert sum(p.numel() for p in layer.parameters()) == r * (m + n) + nnz
        expected += r * (m + n) + nnz
    others = sum(p.numel() for name, p in model.named_parameters() if not name.endswith((".B", ".A", ".values")))
    assert model.num_parameters() == expected + others
    # no factor is named like a dense matrix (optimizers send ".weight" matrices to Muon/GaLore)
    assert not any(name.endswith(".weight") for name, _ in model.layers.named_parameters() if _.ndim == 2)


def test_sltrain_init_follows_the_repo():
    layer = SparseLowRankLinear(400, 300, rank=50, delta=0.1)
    bound = 1 / math.sqrt(400)
    assert torch.count_nonzero(layer.B) == 0
    for tensor in (layer.A, layer.values):
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.95 * bound
        assert abs(tensor.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_sltrain_support_is_seeded_and_saved_in_the_state_dict():
    x, _ = batch()
    a, b = configured(sltrain(seed=1)), configured(sltrain(seed=2))
    q = "layers.0.self_attn.q_proj.index"
    assert not torch.equal(a.state_dict()[q], b.state_dict()[q])
    assert torch.equal(configured(sltrain(seed=1)).state_dict()[q], a.state_dict()[q])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


def test_refactorization_keeps_the_product_and_balances_the_factors():
    layer = SparseLowRankLinear(24, 16, rank=5, delta=0.03)
    perturb(layer, "B", 0)
    product = (layer.B @ layer.A).detach().clone()
    layer.refactorize()
    torch.testing.assert_close(layer.B @ layer.A, product, rtol=0, atol=1e-5)
    gram_b, gram_a = layer.B.T @ layer.B, layer.A @ layer.A.T
    torch.testing.assert_close(gram_b, gram_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(gram_b, torch.diag(torch.diagonal(gram_b)), rtol=0, atol=1e-5)
    singular_values = torch.linalg.svdvals(product.double())[:5].float()
    torch.testing.assert_close(torch.diagonal(gram_b).sort(descending=True).values, singular_values,
                               rtol=1e-5, atol=1e-6)


def test_refactorization_leaves_an_untrained_layer_alone():
    layer = SparseLowRankLinear(12, 8, rank=3, delta=0.1)
    a = layer.A.detach().clone()
    layer.refactorize()
    assert torch.count_nonzero(layer.B) == 0 and torch.equal(layer.A, a)


def test_momentum_reset_clears_only_the_factorized_layers_states():
    method = sltrain(rank=4, refactor_every=5, rewarmup=3)
    model = configured(method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch()
    model(x, y)[1].backward()
    optimizer.step()
    factorized = [p for m in model.modules() if isinstance(m, SparseLowRankLinear) for p in m.parameters()]
    assert all(p in optimizer.state for p in model.parameters())
    method.after_step(4, model, optimizer)
    assert all(p in optimizer.state for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    method.after_step(5, model, optimizer)
    assert not any(p in optimizer.state for p in factorized)
    assert all(p in optimizer.state for p in model.parameters() if all(p is not f for f in factorized))
    for name, p in model.named_parameters():  # only B and A changed, and their products did not
        if not name.endswith((".B", ".A")):
            assert torch.equal(p, before[name])
    for m_name, m in model.named_modules():
        if isinstance(m, SparseLowRankLinear):
            torch.testing.assert_close(m.B @ m.A, before[f"{m_name}.B"] @ before[f"{m_name}.A"], rtol=0, atol=1e-5)


def test_lr_rewarmup_after_each_refactorization():
    method = sltrain(refactor_every=200, rewarmup=10)
    factors = [method.lr_factor(step) for step in range(0, 420)]
    assert all(f == 1.0 for f in factors[:200])
    assert factors[200] == pytest.approx(1e-3)
    assert factors[209] == 1.0 and factors[210] == 1.0
    assert factors[204] == pytest.approx(1e-3 + (1 - 1e-3) * 4 / 9)
    assert all(a < b for a, b in zip(factors[200:210], factors[201:210]))
    assert factors[400:410] == factors[200:210]
    assert sltrain(refactor_every=200, rewarmup=1).lr_factor(200) == 1.0


def test_sltrain_trains_through_refactorizations():
    method = sltrain(rank=8, refactor_every=10, rewarmup=3)
    losses = train(configured(method), [method], steps=30)
    assert losses[-1] < losses[0] - 1.0


def test_sltrain_with_checkpointing_gives_the_same_grads():
    plain = configured(sltrain(seed=4))
    checkpointed = configured(sltrain(seed=4), checkpointing())
    for model in (plain, checkpointed):
        perturb(model, ".B", 1)
    x, y = batch()
    for model in (plain, checkpointed):
        model(x, y)[1].backward()
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(checkpointed)[name], grad, rtol=1e-5, atol=1e-7)


# --- LoRA ----------------------------------------------------------------------------------------

def test_lora_starts_as_the_base_model_and_trains_only_adapters():
    x, y = batch()
    base = tiny_gpt()
    model = configured(lora(rank=4, alpha=8.0))
    torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * BLOCK_LINEARS
    assert all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    perturb(model, "lora_B", 0)
    model(x, y)[1].backward()
    assert set(grads(model)) == trainable
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.shape == (4, CFG.d_model) and layer.lora_B.shape == (CFG.hidden, 4)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(CFG.d_model)
    # the base weights are the imported ones, under their own names
    name = "layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], base.state_dict()[name])


def test_lora_merge_matches_the_adapted_forward():
    x, _ = batch()
    model = configured(lora(rank=4, alpha=16.0, seed=2))
    perturb(model, "lora_B", 1)
    merged = GPT(CFG)
    merged.load_state_dict(dense_state_dict(model))
    torch.testing.assert_close(merged(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    layer = model.layers[1].self_attn.v_proj
    expected = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(dense_state_dict(model)["layers.1.self_attn.v_proj.weight"], expected)


def test_lora_fine_tunes_a_trained_model():
    model = tiny_gpt()
    train(model, [], steps=20)  # the "imported" model: a frozen random one could barely move its logits
    lora(rank=8, alpha=16.0).configure(model)
    losses = train(model, [], steps=30, lr=3e-2, shift=1)
    assert losses[-1] < losses[0] - 1.0


# --- LISA ----------------------------------------------------------------------------------------

def trainable_blocks(model: GPT) -> set[int]:
    return {i for i, block in enumerate(model.layers) if all(p.requires_grad for p in block.parameters())}


def test_lisa_trains_exactly_gamma_blocks_plus_embeddings_and_head():
    method = lisa(layers=2, interval=5, seed=7)
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters())
    for step in range(0, 40, 3):
        method.before_step(step, model, optimizer)
        active = trainable_blocks(model)
        assert len(active) == 2 and active == method.active_blocks(step, CFG.n_layers)
        assert not any(p.requires_grad for i, b in enumerate(model.layers) if i not in active for p in b.parameters())
        assert model.embed_tokens.weight.requires_grad and model.norm.weight.requires_grad


def test_lisa_choice_is_a_function_of_seed_and_period():
    method = lisa(layers=2, interval=10, seed=3)
    assert all(method.active_blocks(step, 8) == method.active_blocks(20, 8) for step in range(20, 30))
    assert method.active_blocks(25, 8) == lisa(layers=2, interval=10, seed=3).active_blocks(21, 8)
    draws = {method.active_blocks(10 * k, 8) for k in range(30)}
    assert len(draws) > 5  # redrawn across periods
    assert len({lisa(layers=2, interval=10, seed=seed).active_blocks(0, 8) for seed in range(30)}) > 5
    assert lisa(layers=9, interval=10).active_blocks(0, 8) == frozenset(range(8))


def test_lisa_keeps_optimizer_states_only_for_active_blocks_and_resumes_them():
    method = lisa(layers=2, interval=4, seed=0)
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()
    for step in range(12):
        method.before_step(step, model, optimizer)
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def blocks_with_state(optimizer: torch.optim.Optimizer) -> set[int]:
        return {i for i, b in enumerate(model.layers) if any(p in optimizer.state for p in b.parameters())}

    assert blocks_with_state(optimizer) == method.active_blocks(11, CFG.n_layers)
    assert model.embed_tokens.weight in optimizer.state and model.norm.weight in optimizer.state
    # a resumed run (fresh method, states loaded) re-applies the same blocks and keeps every state
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(optimizer.state_dict())
    lisa(layers=2, interval=4, seed=0).before_step(11, model, resumed)
    assert len(resumed.state) == len(optimizer.state)
    # at the next switch the states of the blocks that stop training go; the others' stay
    method.before_step(12, model, optimizer)
    kept = method.active_blocks(11, CFG.n_layers) & method.active_blocks(12, CFG.n_layers)
    assert blocks_with_state(optimizer) == kept
    assert model.embed_tokens.weight in optimizer.state


def test_lisa_trains():
    losses = train(tiny_gpt(), [lisa(layers=2, interval=5, seed=1)], steps=30)
    assert losses[-1] < losses[0] - 1.0


# --- dense export and registry -------------------------------------------------------------------

def test_dense_state_dict_of_sltrain_loads_into_a_plain_gpt():
    x, _ = batch()
    model = configured(sltrain(rank=4, seed=5))
    perturb(model, ".B", 2)
    state = dense_state_dict(model)
    assert list(state) == list(GPT(CFG).state_dict())
    plain = GPT(CFG)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


def test_the_stack_builds_the_methods_in_registry_order_with_their_settings():
    config = RunConfig.model_validate({"train": {"seed": 11}, "methods": {
        "use": ["8bit", "sltrain", "checkpointing", "layerwise", "sltrain"], "sltrain": {"rank": 12,
                                                                                        "refactor_every": 50}}})
    assert config.methods.use == ["8bit", "checkpointing", "layerwise", "sltrain"]  # once each, registry order
    methods = MethodStack(config.methods, config.train.seed).methods
    assert [type(m) for m in methods] == [EightBitStates, ActivationCheckpointing, PerLayerUpdates, SLTrain]
    sltrain = methods[3]
    assert (sltrain.rank, sltrain.seed, sltrain.refactor_every, sltrain.rewarmup) == (12, 11, 50, 10)
    lisa = MethodStack(RunConfig.model_validate({"methods": {"use": ["lisa"]}}).methods).methods[0]
    lora = MethodStack(RunConfig.model_validate({"methods": {"use": ["lora"]}}).methods).methods[0]
    assert (lisa.layers, lisa.interval, lora.rank, lora.alpha) == (2, 20, 8, 16.0)  # LMFlow's LISA defaults


@pytest.mark.parametrize("methods", [["sltrain", "lora"], ["lora", "lisa"], ["galore", "sltrain"],
                                     ["lora", "galore"]])
def test_methods_refuse_combinations_that_cannot_work(methods):
    with pytest.raises(FlopwiseError, match="methods.use cannot combine") as error:
        resolve(RunConfig.model_validate({"optim": {"name": "adamw"}, "methods": {"use": methods}}))
    assert "\n" not in str(error.value) and "keep one" in str(error.value)
