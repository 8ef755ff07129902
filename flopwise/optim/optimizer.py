"""flopwise's optimizer: one object whose parameter groups each choose an update rule.

- ``muon``: Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") for the blocks'
  2-D weights: momentum, then the update orthogonalized by Newton-Schulz or Polar Express
  (flopwise/optim/muon.py).
- ``normuon``: NorMuon (Li et al. 2025): Muon with each neuron's orthogonalized update divided by the
  root of an EMA of its mean square (flopwise/optim/muon.py's ``normalize_neurons``).
- ``adamw``: AdamW (Loshchilov & Hutter 2019, decoupled weight decay), as torch.optim.AdamW.
- rules that methods register (``register_update_rule``): GaLore's Adam on projected gradients
  (flopwise/methods/galore.py).

One object rather than several, so the LR schedule, checkpoints and PyTorch's state-dict tools
see a single optimizer.  ``cautious_weight_decay`` decays a weight only where the update moves it
towards zero too (Chen et al. 2025), in every rule (``decay_weights``).  ``state_bits=8`` stores every
moment buffer blockwise in 8 bits (flopwise/optim/quantize.py; Dettmers et al. 2022).  Parameters
stored in bf16 are updated through an fp32 copy and rounded back as ``rounding`` says
(flopwise/optim/rounding.py).  ``update_param`` updates one parameter; it serves ``step`` and updates
made during backward by a method's gradient hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from flopwise.optim.muon import (
    ITERATIONS,
    PRECISIONS,
    neuron_second_moment_shape,
    newton_schulz,
    normalize_neurons,
    on_full_matrix,
    orthogonalize_all,
)
from flopwise.optim.quantize import read_moment, write_moment
from flopwise.optim.rounding import ROUNDINGS, update_rounded
from flopwise.optim.routing import muon_stacks

Rule = Callable[[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]], None]  # (param, grad, state, group)


@dataclass(frozen=True)
class UpdateRule:
    """How a group's parameters are updated: ``apply`` one parameter with its gradient, its state and its
    group's settings; ``matrices_only``: the rule takes 2-D weights only; ``defaults``: the settings of its own
    that a group leaves out; ``check_group``: refuses a group whose settings the rule cannot use (ValueError)."""

    apply: Rule
    matrices_only: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    check_group: Callable[[dict[str, Any]], None] | None = None


RULES: dict[str, UpdateRule] = {}
MUON_UPDATES = ("muon", "normuon")  # the rules whose matrices ``step`` orthogonalizes in batched stacks


def register_update_rule(name: str, rule: UpdateRule) -> None:
    """Make ``name`` a group's ``update`` (a method's rule, registered when its module is imported)."""
    RULES[name] = rule


class FlopwiseOptimizer(torch.optim.Optimizer):
    """Groups carry ``update`` (adamw, muon, normuon, or a registered rule), ``lr``, ``weight_decay``,
    ``cautious_weight_decay``, ``state_bits`` (32 or 8), ``state_block`` and ``rounding`` (of bf16-stored
    parameters), plus their rule's keys: muon and normuon: momentum, nesterov, ns_steps, ns_coefficients (a
    name in flopwise/optim/muon.py's ITERATIONS), ns_precision (fp32 or bf16); normuon also normuon_beta2;
    adamw: betas, eps; a registered rule's own (``rule_defaults`` gives their defaults).

    Muon scales the orthogonalized update of a rows x cols matrix by sqrt(max(1, rows / cols)), as
    in the speedrun, so tall matrices get updates of the same per-entry size.  Parameters without
    a gradient (frozen ones) are skipped.

    State keys per parameter (no dots, so checkpoints can name tensors ``<param>.<key>``): ``step``
    and ``exp_avg``/``exp_avg_sq`` (adamw), ``momentum_buffer`` (muon; normuon adds ``neuron_second_moment``,
    one value per row or column, never quantized), a registered rule's own; with 8-bit
    states each moment ``m`` is ``m_q`` and ``m_absmax``; bf16 parameters add ``compensation`` (kahan) or
    ``rounding_updates`` (stochastic).  ``seed`` seeds stochastic rounding.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_coefficients: str = "newton_schulz", ns_precision: str = "fp32",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, cautious_weight_decay: bool = False,
                 state_bits: int = 32, state_block: int = 256, rounding: str = "nearest", seed: int = 0,
                 **rule_defaults: Any) -> None:
        defaults = {"lr": 0.02, "weight_decay": 0.0, "update": "adamw", "momentum": momentum, "nesterov": nesterov,
                    "ns_steps": ns_steps, "ns_coefficients": ns_coefficients, "ns_precision": ns_precision,
                    "betas": betas, "eps": eps,
                    "cautious_weight_decay": cautious_weight_decay, "state_bits": state_bits,
                    "state_block": state_block, "rounding": rounding, **rule_defaults}
        groups = [dict(group) for group in groups]
        for group in groups:  # a registered rule's own settings: the group's, else these keywords', else its defaults
            rule = RULES.get(group.get("update", "adamw"))
            for key, value in (rule.defaults if rule is not None else {}).items():
                group.setdefault(key, rule_defaults.get(key, value))
        super().__init__(groups, defaults)
        self._seeds = {param: hash((seed, index)) for index, param in
                       enumerate(p for group in self.param_groups for p in group["params"])}
        for group in self.param_groups:
            _check_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # with per-layer updates, backward has used and freed every gradient
            batched = _muon_batch(group) if group["update"] in MUON_UPDATES else []
            done = {id(p) for p in batched}
            for indices in muon_stacks([p.shape for p in batched]):  # a stack at a time: its working memory is small
                params = [batched[i] for i in indices]
                directions = [_muon_direction(p.grad, self.state[p], group) for p in params]
                updates = orthogonalize_all(directions, group["ns_steps"], group["ns_coefficients"],
                                            group["ns_precision"])
                for param, update in zip(params, updates):
                    _muon_apply(param, _normalized(update, self.state[param], group), group)
            for param in group["params"]:
                if id(param) not in done:
                    self.update_param(param, group)
        return loss

    @torch.no_grad()
    def update_param(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """Apply ``group``'s rule to ``param`` with its current gradient (nothing without one)."""
        if param.grad is None:
            return
        rule = RULES[group["update"]].apply
        if param.dtype == torch.bfloat16:
            update_rounded(param, param.grad, self.state[param], group, rule, self._seeds[param])
        else:
            rule(param, param.grad, self.state[param], group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but every state tensor keeps the dtype it was saved with: torch casts
        floating-point states to the parameter's dtype, which would turn 8-bit codes into floats; and a group
        setting that the saved groups lack (a checkpoint written before the setting existed) keeps the value
        this optimizer was built with, where torch's would drop it."""
        built = [dict(group) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, built):
            for key, value in settings.items():
                group.setdefault(key, value)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            state = self.state[param]
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(param.device)


def _check_group(group: dict[str, Any]) -> None:
    rule = RULES.get(group["update"])
    if rule is None:
        raise ValueError(f"update='{group['update']}' is unknown: choose one of {', '.join(RULES)}")
    if rule.matrices_only and any(p.ndim != 2 for p in group["params"]):
        raise ValueError(f"{group['update']} groups take 2-D weight matrices only; give the others to AdamW groups")
    if group["rounding"] not in ROUNDINGS:
        raise ValueError(f"rounding='{group['rounding']}' is unknown: choose one of {', '.join(ROUNDINGS)}")
    if group["state_bits"] not in (8, 32):
        raise ValueError(f"state_bits={group['state_bits']}: optimizer states are stored in 32 or 8 bits")
    if rule.check_group is not None:
        rule.check_group(group)


def _muon_batch(group: dict[str, Any]) -> list[torch.Tensor]:
    """The group's fp32 local matrices with gradients, whose orthogonalization ``step`` batches; bf16-stored
    weights (updated through a working copy) and FSDP2 shards take the one-by-one path."""
    return [p for p in group["params"]
            if p.grad is not None and p.dtype == torch.float32 and not isinstance(p.grad, DTensor)]


def _muon_direction(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    """Update the momentum buffer with ``grad``; returns the (Nesterov) direction to orthogonalize."""
    bits, block = group["state_bits"], group["state_block"]
    buffer = read_moment(state, "momentum_buffer", grad, bits, block, signed=True)
    buffer.lerp_(grad, 1 - group["momentum"])
    write_moment(state, "momentum_buffer", buffer, bits, block, signed=True)
    return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer


def _normalized(update: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    """NorMuon's per-neuron normalization of the whole orthogonalized ``update`` (normuon groups); Muon's
    update as it is."""
    if group["update"] != "normuon":
        return update
    if "neuron_second_moment" not in state:
        shape = neuron_second_moment_shape(*update.shape)
        state["neuron_second_moment"] = torch.zeros(shape, dtype=update.dtype, device=update.device)
    return normalize_neurons(update, state["neuron_second_moment"], group["normuon_beta2"])


def _muon_apply(param: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> None:
    """Decay, then step along the orthogonalized ``update``, scaled for the matrix's aspect ratio."""
    rows, cols = param.shape
    decay_weights(param, update, group)
    param.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))


def _muon(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    def orthogonalized(direction: torch.Tensor) -> torch.Tensor:
        update = newton_schulz(direction, group["ns_steps"], coefficients=group["ns_coefficients"],
                               precision=group["ns_precision"])
        return _normalized(update, state, group)

    _muon_apply(param, on_full_matrix(_muon_direction(grad, state, group), orthogonalized), group)


def _check_muon_group(group: dict[str, Any]) -> None:
    iteration = ITERATIONS.get(group["ns_coefficients"])
    if iteration is None:
        raise ValueError(f"ns_coefficients='{group['ns_coefficients']}' is unknown: "
                         f"choose one of {', '.join(ITERATIONS)}")
    iteration.coefficients(group["ns_steps"])  # refuses more steps than the iteration has coefficients for
    if group["ns_precision"] not in PRECISIONS:
        raise ValueError(f"ns_precision='{group['ns_precision']}' is unknown: choose one of {', '.join(PRECISIONS)}")
    if group["update"] == "normuon" and not 0 <= group["normuon_beta2"] < 1:
        raise ValueError(f"normuon_beta2={group['normuon_beta2']} must lie in [0, 1)")


def decay_weights(param: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> None:
    """Decoupled weight decay, ``param *= 1 - lr * weight_decay``, before the step ``param -= lr * update``
    (any positive multiple of it: only its sign is read).  With ``cautious_weight_decay``, only where the
    update has the weight's sign (or is 0), so the decay never pulls a weight against the update (Chen et al.
    2025, "Cautious Weight Decay", arXiv:2510.12402; as modded-nanoGPT and nanochat apply it)."""
    if not group["weight_decay"]:
        return
    factor = group["lr"] * group["weight_decay"]
    if group["cautious_weight_decay"]:
        agreeing = (update * param).ge_(0).mul_(param)  # the weight where the signs agree, else 0: one temporary
        param.sub_(agreeing, alpha=factor)
    else:
        param.mul_(1 - factor)


def adam_moments(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Updated first moment, bias-corrected sqrt(second moment) + eps, and the first moment's bias
    correction; the update direction is their quotient divided by the correction."""
    bits, block = group["state_bits"], group["state_block"]
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    exp_avg = read_moment(state, "exp_avg", grad, bits, block, signed=True)
    exp_avg_sq = read_moment(state, "exp_avg_sq", grad, bits, block, signed=False)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = state["step"].item()
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    write_moment(state, "exp_avg", exp_avg, bits, block, signed=True)
    write_moment(state, "exp_avg_sq", exp_avg_sq, bits, block, signed=False)
    denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
    return exp_avg, denominator, 1 - beta1 ** step


def _adamw(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    exp_avg, denominator, correction = adam_moments(grad, state, group)
    decay_weights(param, exp_avg, group)  # the update exp_avg / denominator has exp_avg's signs
    param.addcdiv_(exp_avg, denominator, value=-group["lr"] / correction)


register_update_rule("adamw", UpdateRule(_adamw))
register_update_rule("muon", UpdateRule(_muon, matrices_only=True, check_group=_check_muon_group))
register_update_rule("normuon", UpdateRule(_muon, matrices_only=True, check_group=_check_muon_group,
                                           defaults={"normuon_beta2": 0.95}))
