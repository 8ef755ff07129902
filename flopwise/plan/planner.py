"""From a budget to a plan: which member of the shape family to train, on how many tokens, and the
held-out loss it should reach.

Each candidate width is probed for its real step time on this device (flopwise/plan/throughput.py),
so a seconds budget becomes the tokens that size can actually see; a FLOP budget becomes tokens
through the FLOPs per token of that shape (attention and the vocabulary head included).  The law
then predicts each candidate's loss at its own (N, D), and the plan takes the lowest.  Predicted
loss is unimodal in size (too small: capacity-bound; too large: too few tokens), so the search
walks up the family from the smallest width and stops two widths past the best one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from flopwise.budget import Budget, format_amount, format_bytes
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.scaling.law import interval
from flopwise.scaling.law_file import SIZE_EXTRAPOLATION, PlanningLaw
from flopwise.scaling.shapes import WIDTHS, family_fields, family_shape, non_embedding_parameters

MIN_STEPS = 20  # fewer optimizer steps than this is not a training run worth predicting
PAST_BEST = 2  # candidates tried beyond the best before the search stops


@dataclass
class Candidate:
    d_model: int
    n_layers: int
    n_heads: int
    non_embedding: int
    step_seconds: float
    tokens_per_second: float
    tokens: float
    steps: int
    predicted_loss: float
    methods: list[str] = field(default_factory=list)
    memory_peak: float | None = None


@dataclass
class Plan:
    budget: dict[str, float | None]
    chosen: Candidate
    candidates: list[Candidate]
    interval: tuple[float, float] | None
    law: dict[str, Any]
    law_description: str
    law_is_prior: bool
    throughput_ratio: float
    tokens_per_step: int
    device: str
    assumptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, config: RunConfig) -> RunConfig:
        """The config with its model shape set to the chosen candidate; under a memory cap the run then
        settles its methods for that shape as the candidate did (methods/choose.resolve_memory_methods)."""
        return config.replace(**{f"model.{name}": value for name, value in family_fields(self.chosen.d_model).items()})


StepSeconds = Callable[[ModelConfig, RunConfig], float]


def budget_tokens(budget: Budget, cfg: ModelConfig, tokens_per_step: int, step_seconds: float) -> float:
    """Tokens a run of shape ``cfg`` sees before its first limit binds."""
    per_limit = {"seconds": lambda s: s / step_seconds * tokens_per_step,
                 "flops": lambda f: f / flops_per_token(cfg),
                 "tokens": lambda t: t,
                 "steps": lambda n: n * tokens_per_step}
    return min(per_limit[name](amount) for name, amount in budget.set_limits().items())


def plan_run(config: RunConfig, vocab_size: int, law: PlanningLaw, step_seconds: StepSeconds, device: str,
             widths: tuple[int, ...] = WIDTHS, matmul_peak: float | None = None) -> Plan:
    """The family member with the lowest predicted loss under ``config``'s budget and memory cap;
    ``matmul_peak`` (FLOP/s) only serves to report the plan's MFU."""
    budget = config.budget.build()
    if not {"seconds", "flops"} & set(budget.set_limits()):
        raise FlopwiseError(f"budget {budget.describe()} does not bound the model size (more parameters cost "
                            "nothing under a token or step limit): add seconds or FLOPs, e.g. --budget 10m")
    o = config.optim
    tokens_per_step = o.batch_size * o.grad_accum * family_shape(config.model, widths[0], vocab_size).seq_len
    candidates: list[Candidate] = []
    best = -1  # index of the lowest predicted loss so far
    for width in _within_law(widths, law, config, vocab_size):
        try:
            candidate = _candidate(config, width, vocab_size, budget, law, step_seconds, tokens_per_step)
        except FlopwiseError:  # over the memory cap, and so is every larger width
            if not candidates:
                raise
            break
        if candidate.steps < MIN_STEPS:
            break
        candidates.append(candidate)
        if best < 0 or candidate.predicted_loss < candidates[best].predicted_loss:
            best = len(candidates) - 1
        elif len(candidates) - 1 - best >= PAST_BEST:
            break
    if best < 0:
        raise FlopwiseError(f"budget {budget.describe()} allows fewer than {MIN_STEPS} steps even for the smallest "
                            f"model (d_model {widths[0]}): raise the budget, or shrink optim.batch_size")
    chosen = candidates[best]
    spread = interval(law.bootstrap, chosen.non_embedding, chosen.tokens) if law.bootstrap else None
    return Plan(budget=budget.to_dict(), chosen=chosen, candidates=candidates, interval=spread, law=law.law.to_dict(),
                law_description=law.describe(), law_is_prior=law.is_prior, throughput_ratio=law.throughput_ratio,
                tokens_per_step=tokens_per_step, device=device,
                assumptions=_assumptions(config, law, chosen, budget, device, vocab_size, matmul_peak))


def _within_law(widths: tuple[int, ...], law: PlanningLaw, config: RunConfig, vocab_size: int) -> list[int]:
    """The widths whose size the law may plan (PlanningLaw.size_range); refuses when none is left."""
    limits = law.size_range()
    if limits is None:
        return list(widths)
    inside = [w for w in widths
              if limits[0] <= non_embedding_parameters(family_shape(config.model, w, vocab_size)) <= limits[1]]
    if not inside:
        raise FlopwiseError(f"no family member lies within the law's size range ({_describe_range(limits)}): fit the "
                            "law on runs of this family (flopwise scan)")
    return inside


def _describe_range(limits: tuple[float, float]) -> str:
    return f"{limits[0] / 1e6:.2f}M to {limits[1] / 1e6:.2f}M non-embedding parameters"


def _candidate(config: RunConfig, width: int, vocab_size: int, budget: Budget, law: PlanningLaw,
               step_seconds: StepSeconds, tokens_per_step: int) -> Candidate:
    """One family member's cost and predicted loss; FlopwiseError when no memory-saving methods fit the cap."""
    from flopwise.methods.choose import estimate_for, memory_methods_of, resolve_memory_methods  # imports torch

    cfg = family_shape(config.model, width, vocab_size)
    run_config = config
    peak = None
    if config.memory.limit is not None:  # the methods the run itself would settle on for this shape
        from flopwise.plan.resolve import compute_dtype

        dtype, o = compute_dtype(config), config.optim
        run_config, _ = resolve_memory_methods(config, cfg, o.batch_size, dtype)
        peak = estimate_for(cfg, o.batch_size, memory_methods_of(run_config), run_config.methods,
                            run_config.optim.name, dtype, grad_accum=o.grad_accum).peak
    seconds = step_seconds(cfg, run_config) / law.throughput_ratio
    tokens = budget_tokens(budget, cfg, tokens_per_step, seconds)
    n = non_embedding_parameters(cfg)
    return Candidate(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, non_embedding=n,
                     step_seconds=seconds, tokens_per_second=tokens_per_step / seconds, tokens=tokens,
                     steps=int(tokens // tokens_per_step), predicted_loss=float(law.law.loss(n, tokens)),
                     methods=memory_methods_of(run_config), memory_peak=peak)


def _assumptions(config: RunConfig, law: PlanningLaw, best: Candidate, budget: Budget, device: str,
                 vocab_size: int, matmul_peak: float | None) -> list[str]:
    o, s = config.optim, config.schedule
    shape = family_shape(config.model, best.d_model, vocab_size)
    flops = flops_per_token(shape) * best.tokens_per_second
    mfu = f", {flops / 1e9:.1f} GFLOP/s" + (f" = {flops / matmul_peak:.0%} of the measured matmul peak "
                                            f"{matmul_peak / 1e9:.0f} GFLOP/s" if matmul_peak else "")
    limits = law.size_range()
    lines = [f"law: {law.describe()}",
             f"throughput: measured on {device}: {best.tokens_per_second:,.0f} tokens/s{mfu} for the chosen shape "
             f"({best.step_seconds:.3f} s per step of {o.batch_size * o.grad_accum} x {shape.seq_len} "
             "tokens" + (f", scaled by {law.throughput_ratio:.3f}, what the scan's runs achieved against the probe)"
                         if law.throughput_ratio != 1.0 else ")"),
             f"budget: {budget.describe()}; the first limit to bind decides the tokens"
             + (f"; sizes from {_describe_range(limits)}, within {SIZE_EXTRAPOLATION:g}x of the law's runs"
                if limits else ""),
             f"recipe: {o.name} (lr {o.lr:g}" + (f", muon_lr {o.muon_lr:g}" if o.name == "muon" else "")
             + f"), batch {o.batch_size} x {o.grad_accum} accumulation, {s.name} schedule (warmup {s.warmup:g}, "
               f"decay {s.decay:g}) as configured; the law holds for this recipe"]
    if config.memory.limit is not None:
        lines.append(f"memory: cap {format_bytes(config.memory.limit)}; estimated peak "
                     f"{format_bytes(best.memory_peak or 0)} with {', '.join(best.methods) or 'no methods'}")
    else:
        lines.append("memory: no cap given (--memory)")
    longest = law.longest_run_tokens()
    lines.append(f"tokens: {format_amount('tokens', best.tokens)} = {best.tokens / best.non_embedding:.1f} per "
                 "non-embedding parameter"
                 + (f"; {best.tokens / longest:.1f}x the law's longest run ({format_amount('tokens', longest)}), "
                    "so its token term is extrapolated that far" if longest and best.tokens > longest else ""))
    return lines
