"""Loss-based sample weights (Sow et al., ICLR 2025): the weights against an independent numpy computation,
their invariants, the settings the config refuses, and two ranks against one process."""

from __future__ import annotations

import socket
import typing

import numpy as np
import pytest
import torch

from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.methods.base import StepOutputs
from flopwise.methods.reweight import (
    ReweightConfig,
    SampleReweighting,
    normalized_losses,
    sample_weights,
    strategy_scores,
)
from flopwise.runtime import Ranks

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def numpy_weights(losses: np.ndarray, strategy: str, delta: float = 1.0, r: float = 0.4) -> np.ndarray:
    """The paper's recipe written out independently, in float64, in the reference code's form."""
    l_min, l_max = losses.min(), losses.max()
    den = max(l_max - l_min, 1e-6)
    x = 2 * delta * losses / den - delta * (l_max + l_min) / den
    f = {"linupper": np.minimum(x + delta, delta), "quadratic": 1 - x**2 / delta**2,
         "extremes": np.abs(x), "uniform": np.zeros_like(x)}[strategy]
    g = np.exp((f - f.max()) / r)
    return len(losses) * g / g.sum()


def settings(strategy: str = "linupper", **kw) -> ReweightConfig:
    return ReweightConfig(strategy=strategy, **kw)


def test_defaults_are_the_papers():
    s = ReweightConfig()  # the paper's 1000 uniform steps become the first 5% of the budget
    assert (s.strategy, s.temperature, s.delta, s.burn_in) == ("linupper", 0.4, 1.0, 0.05)
    assert typing.get_args(ReweightConfig.model_fields["strategy"].annotation) == ("linupper", *STRATEGIES[2:],
                                                                                  "uniform")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("delta,r", [(1.0, 0.4), (2.5, 1.0), (0.5, 0.1)])
def test_weights_match_independent_numpy(strategy, delta, r):
    rng = np.random.default_rng([STRATEGIES.index(strategy), int(delta * 10), int(r * 100)])
    losses = rng.uniform(1.5, 6.0, size=37)
    w = sample_weights(torch.tensor(losses, dtype=torch.float32), settings(strategy, delta=delta, temperature=r))
    assert w.shape == (37,)
    np.testing.assert_allclose(w.numpy(), numpy_weights(losses, strategy, delta, r), rtol=1e-5, atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w > 0).all()


def test_normalized_range_and_endpoints():
    losses = torch.tensor([3.0, 1.0, 2.0, 5.0])
    x = normalized_losses(losses, delta=2.0)
    assert x.tolist() == pytest.approx([0.0, -2.0, -1.0, 2.0])
    assert normalized_losses(torch.full((6,), 2.7), delta=1.0).tolist() == [0.0] * 6


def test_scores_shapes():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert strategy_scores(x, "linupper", 1.0).tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert strategy_scores(x, "quadratic", 1.0).tolist() == [0.0, 0.75, 1.0, 0.75, 0.0]
    assert strategy_scores(x, "extremes", 1.0).tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert strategy_scores(x, "uniform", 1.0).tolist() == [0.0] * 5


def test_linupper_downweights_low_losses_and_caps_high_ones():
    losses = torch.linspace(2.0, 4.0, 9)  # normalized: -1, -0.75, ..., 1
    w = sample_weights(losses, settings("linupper")).tolist()
    assert all(a < b for a, b in zip(w[:5], w[1:5]))  # strictly rising over the lower half
    assert w[4:] == pytest.approx([w[4]] * 5)  # flat over the upper half: high losses are not boosted further
    assert all(a <= b + 1e-7 for a, b in zip(w, w[1:]))  # never favours a smaller loss


def test_quadratic_favours_the_middle_and_extremes_the_ends():
    losses = torch.linspace(2.0, 4.0, 9)
    q = sample_weights(losses, settings("quadratic")).tolist()
    e = sample_weights(losses, settings("extremes")).tolist()
    assert max(q) == q[4] and q[0] == pytest.approx(q[-1]) and q[0] < q[2] < q[4]
    assert min(e) == e[4] and e[0] == pytest.approx(e[-1]) and e[0] > e[2] > e[4]


def test_burn_in_and_uniform_give_ones():
    losses = torch.tensor([1.0, 4.0, 2.0, 9.0])
    method = SampleReweighting(ReweightConfig(burn_in=0.25))
    method.ranks = Ranks()
    outputs = StepOutputs(batch=None, inputs=torch.zeros(4, 3), logits=torch.zeros(4, 3, 5), sequence=losses)
    for p in (0.0, 0.2499):  # uniform weights before burn_in: the loss is left as it is
        assert method.loss(losses, outputs, step=10, p=p) is losses
    weighted = method.loss(losses, outputs, step=10, p=0.25)
    assert torch.equal(weighted, losses * sample_weights(losses, method.config))
    assert sample_weights(losses, settings("uniform")).tolist() == [1.0] * 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_equal_losses_give_ones(strategy):
    w = sample_weights(torch.full((8,), 3.25), settings(strategy))
    assert w.tolist() == pytest.approx([1.0] * 8, abs=1e-6)


def test_large_temperature_is_near_uniform():
    losses = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 5
    for strategy in STRATEGIES:
        w = sample_weights(losses, settings(strategy, temperature=1e4))
        assert (w - 1).abs().max().item() < 1e-3
    sharp = sample_weights(losses, settings("extremes", temperature=0.05))
    assert (sharp - 1).abs().max().item() > 1


def test_no_gradient_flows_through_weights():
    losses = (torch.rand(6, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    w = sample_weights(losses, settings("linupper"))
    assert not w.requires_grad and w.grad_fn is None
    (w * losses).mean().backward()  # the weights act as constants
    assert torch.allclose(losses.grad, w / 6)


def test_low_precision_losses():
    losses = torch.tensor([2.0, 3.0, 2.5, 4.0], dtype=torch.bfloat16)
    w = sample_weights(losses, settings("linupper"))
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), numpy_weights(losses.float().numpy().astype(np.float64), "linupper"),
                               rtol=1e-5)


@pytest.mark.parametrize("setting,field", [
    ("strategy=linear", "methods.reweight.strategy"),
    ("temperature=0.0", "methods.reweight.temperature"),
    ("temperature=.inf", "methods.reweight.temperature"),
    ("delta=-1.0", "methods.reweight.delta"),
    ("burn_in=-5", "methods.reweight.burn_in"),
    ("burn_in=2.5", "methods.reweight.burn_in"),
])
def test_invalid_settings(setting, field):
    with pytest.raises(FlopwiseError) as err:
        load_config(None, ['methods.use=["reweight"]', f"methods.reweight.{setting}"])
    message = str(err.value)
    assert f"{field}=" in message and "\n" not in message


def test_invalid_arguments_of_the_helpers():
    with pytest.raises(ValueError, match="'mid'"):  # the config refuses it first (test_invalid_settings)
        strategy_scores(torch.zeros(3), "mid", 1.0)
    with pytest.raises(ValueError):
        sample_weights(torch.zeros(2, 3), settings())


# --- two processes (gloo) hold halves of the batch --------------------------------------------------


BATCHES = {  # name: (losses, split of the global batch between rank 0 and rank 1)
    "even": (np.random.default_rng(7).uniform(1.0, 8.0, size=12), 6),
    "uneven": (np.random.default_rng(8).uniform(2.0, 3.0, size=8), 3),
    "extremes_on_rank1": (np.array([2.0, 2.1, 2.2, 9.0, 1.0, 2.05]), 3),
}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ranks = Ranks(rank, 2, rank, "cpu")
        results = {}
        for name, (losses, split) in BATCHES.items():
            part = losses[:split] if rank == 0 else losses[split:]
            for strategy in STRATEGIES:
                s = ReweightConfig(strategy=strategy)
                results[name, strategy] = sample_weights(torch.tensor(part, dtype=torch.float32), s, ranks)
            results[name, "normalized"] = normalized_losses(torch.tensor(part, dtype=torch.float32), 1.0, ranks)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, (losses, split) in BATCHES.items():
        full = torch.tensor(losses, dtype=torch.float32)
        for key in STRATEGIES + ("normalized",):
            if key == "normalized":
                expected = normalized_losses(full, 1.0)
            else:
                expected = sample_weights(full, ReweightConfig(strategy=key))
            torch.testing.assert_close(parts[0][name, key], expected[:split], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(parts[1][name, key], expected[split:], rtol=1e-6, atol=1e-6)
        together = torch.cat([parts[0][name, "linupper"], parts[1][name, "linupper"]])
        assert together.mean().item() == pytest.approx(1.0, abs=1e-6)
