"""From a budget to a plan: which member of the shape family to train, on how many tokens, and the
held-out loss it should reach.

A seconds budget becomes the tokens each candidate width can see from its step time: probed on this
device (flopwise/plan/throughput.py), or, for hardware this machine is not, from a device profile's
declared peak and MFU (flopwise/plan/device_profile.py).  A FLOP budget becomes tokens through the
FLOPs per token of that shape (attention and the vocabulary head included), and needs no step time,
so no probe and no model.  A token budget alone does not bound the size; it is planned as the
compute whose law-optimal token count it is.  The law then scores each candidate at its own (N, D),
and the plan takes the lowest.  Loss is unimodal in size (too small: capacity-bound; too large: too
few tokens), so the search walks up the family from the smallest width and stops two widths past
the best one.

Only a law fitted on this data predicts a loss: the prior (another corpus and tokenizer) ranks the
sizes, so it gives the allocation, and a fitted law's loss at or above the data's unigram baseline
(where it extrapolates beyond its runs) is not stated either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Literal

from flopwise.budget import Budget, format_amount, format_bytes
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.flops import block_matmul_parameters, flops_per_token
from flopwise.scaling.law import interval
from flopwise.scaling.law_file import SIZE_EXTRAPOLATION, PlanningLaw
from flopwise.scaling.shapes import WIDTHS, family_fields, family_shape, non_embedding_parameters

if TYPE_CHECKING:
    from flopwise.plan.device_profile import DeviceProfile

MIN_STEPS = 20  # fewer optimizer steps than this is not a training run worth predicting
PAST_BEST = 2  # candidates tried beyond the best before the search stops


@dataclass
class Candidate:
    d_model: int
    n_layers: int
    n_heads: int
    non_embedding: int
    step_seconds: float | None  # None: the budget needed no step time (FLOPs or tokens)
    tokens_per_second: float | None
    tokens: float
    steps: int
    law_loss: float  # the law's loss at (N, D): what sizes are ranked by
    predicted_loss: float | None  # what the plan states: None for the prior, or at/above the unigram baseline
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
    unigram_loss: float | None  # the data's unigram baseline, where the law's runs recorded it
    optimum: tuple[float, float] | None  # the law's continuous compute-optimal (N, D) for a FLOP budget
    throughput_ratio: float
    tokens_per_step: int
    device: str
    assumptions: list[str]

    @property
    def loss_basis(self) -> Literal["fitted", "prior"]:
        """What the plan's loss is: a prediction of a law fitted on this data, or none (the prior's allocation)."""
        return "prior" if self.law_is_prior else "fitted"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_basis": self.loss_basis}

    def apply(self, config: RunConfig) -> RunConfig:
        """The config with its model shape set to the chosen candidate; under a memory cap the run then
        settles its methods for that shape as the candidate did (when it is resolved: flopwise/resolve.py)."""
        return config.replace(**{f"model.{name}": value for name, value in family_fields(self.chosen.d_model).items()})


StepSeconds = Callable[[ModelConfig, RunConfig], float]


@dataclass(frozen=True)
class Speed:
    """Where a seconds budget's step times come from: this device's probe, or a device profile."""

    probe: StepSeconds | None = None
    profile: DeviceProfile | None = None
    matmul_peak: float | None = None  # measured here: only to report the probe's MFU


def budget_tokens(budget: Budget, cfg: ModelConfig, tokens_per_step: int, step_seconds: float | None,
                  block_density: float = 1.0) -> float:
    """Tokens a run of shape ``cfg`` sees before its first limit binds (``step_seconds`` is read only
    under a seconds limit); ``block_density``: its block weights' average nonzero share (pruning), at which a
    FLOP budget counts them."""
    per_limit = {"seconds": lambda s: s / step_seconds * tokens_per_step,
                 "flops": lambda f: f / flops_per_token(cfg, 1.0 - block_density),
                 "tokens": lambda t: t,
                 "steps": lambda n: n * tokens_per_step}
    return min(per_limit[name](amount) for name, amount in budget.set_limits().items())


def plan_run(config: RunConfig, vocab_size: int, law: PlanningLaw, device: str, speed: Speed = Speed(),
             widths: tuple[int, ...] = WIDTHS) -> Plan:
    """The family member with the lowest predicted loss under ``config``'s budget and memory cap.
    ``speed`` is only asked for step times when the budget has a seconds limit."""
    budget = config.budget.build()
    limits = budget.set_limits()
    notes = []
    if not {"seconds", "flops"} & set(limits):
        if "tokens" not in limits:
            raise FlopwiseError(f"budget {budget.describe()} does not bound the model size (more parameters cost "
                                "nothing under a step limit): add seconds, FLOPs or tokens, e.g. --budget 10m")
        flops = law.law.compute_for_tokens(limits["tokens"])
        budget = replace(budget, flops=flops)
        notes.append(f"a token budget alone does not bound the size: planned for {format_amount('flops', flops)}, "
                     f"the compute for which the law's optimal token count is {format_amount('tokens', limits['tokens'])}")
    if "seconds" in limits and speed.probe is None and speed.profile is None:
        raise FlopwiseError("a seconds budget needs step times: probe this device, or give --device-profile")
    o = config.optim
    tokens_per_step = o.batch_size * o.grad_accum * family_shape(config.model, widths[0], vocab_size).seq_len
    if speed.profile is not None:
        config = _on_profile(config, speed.profile)
    candidates: list[Candidate] = []
    best = -1  # index of the lowest loss so far
    for width in _within_law(widths, law, config, vocab_size):
        if not _fits_size(config, family_shape(config.model, width, vocab_size), bool(candidates)):
            break  # above the size budget even at int4, and so is every larger width
        try:
            candidate = _candidate(config, width, vocab_size, budget, law, speed, tokens_per_step)
        except FlopwiseError:  # over the memory cap, and so is every larger width
            if not candidates:
                raise
            break
        if candidate.steps < MIN_STEPS:
            break
        candidates.append(candidate)
        if best < 0 or candidate.law_loss < candidates[best].law_loss:
            best = len(candidates) - 1
        elif len(candidates) - 1 - best >= PAST_BEST:
            break
    if best < 0:
        raise FlopwiseError(f"budget {budget.describe()} allows fewer than {MIN_STEPS} steps even for the smallest "
                            f"model (d_model {widths[0]}): raise the budget, or shrink optim.batch_size")
    chosen = candidates[best]
    stated = chosen.predicted_loss is not None
    spread = interval(law.bootstrap, chosen.non_embedding, chosen.tokens) if law.bootstrap and stated else None
    optimum = _optimum(law, budget, chosen, vocab_size, config)
    return Plan(budget=budget.to_dict(), chosen=chosen, candidates=candidates, interval=spread, law=law.law.to_dict(),
                law_description=law.describe(), law_is_prior=law.is_prior,
                unigram_loss=law.unigram_loss(),
                optimum=optimum, throughput_ratio=law.throughput_ratio, tokens_per_step=tokens_per_step,
                device=speed.profile.name if speed.profile else device,
                assumptions=notes + _assumptions(config, law, chosen, budget, device, vocab_size, speed, optimum))


def _fits_size(config: RunConfig, shape: ModelConfig, others: bool) -> bool:
    """Whether ``shape``'s final/ fits the size budget (budget.size) in some precision (flopwise/size.py; the run
    then stores it in the highest that fits); the refusal itself when no smaller candidate did (``others``)."""
    if config.budget.size is None:
        return True
    from flopwise.size import int4_training, plan_size

    try:
        plan_size(shape, config.budget.size, int4_training(config.methods)[1])
    except FlopwiseError:
        if not others:
            raise
        return False
    return True


def _on_profile(config: RunConfig, profile: DeviceProfile) -> RunConfig:
    """The config as it would run on the profiled device: its dtype, and its memory as the cap."""
    from flopwise.plan.device_profile import profile_dtype

    changes: dict[str, Any] = {}
    dtype = profile_dtype(config, profile)
    if dtype in ("fp32", "bf16") and config.train.precision == "auto":
        changes["train.precision"] = dtype
    if config.memory.limit is None and profile.memory_gib:
        changes["memory.limit"] = int(profile.memory_gib * 2**30)
    return config.replace(**changes) if changes else config


def _optimum(law: PlanningLaw, budget: Budget, chosen: Candidate, vocab_size: int,
             config: RunConfig) -> tuple[float, float] | None:
    """The law's continuous compute-optimal (N, D) at the plan's FLOPs, with the chosen shape's FLOPs per
    token and parameter; None without a FLOP limit or where the law has no optimum."""
    from flopwise.methods.stack import average_block_density  # imports torch

    if budget.flops is None:
        return None
    sparsity = 1.0 - average_block_density(config.methods)
    per_param = flops_per_token(family_shape(config.model, chosen.d_model, vocab_size), sparsity) / chosen.non_embedding
    try:
        return law.law.compute_optimal(budget.flops, per_param)
    except FlopwiseError:
        return None


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


def _candidate(config: RunConfig, width: int, vocab_size: int, budget: Budget, law: PlanningLaw, speed: Speed,
               tokens_per_step: int) -> Candidate:
    """One family member's cost and loss; FlopwiseError when no memory-saving methods fit the cap."""
    from flopwise.methods.choose import estimate_for, memory_methods_of, settle_memory_methods  # imports torch
    from flopwise.methods.stack import average_block_density

    cfg = family_shape(config.model, width, vocab_size)
    run_config = config
    peak = None
    if config.memory.limit is not None:  # the methods the run itself would settle on for this shape
        from flopwise.resolve import compute_dtype

        dtype, o = compute_dtype(config, None), config.optim
        settled = settle_memory_methods(config.methods.use, config.methods, o, cfg, o.batch_size, dtype,
                                        config.memory.limit)
        if settled.added:
            run_config = config.replace(**{"methods.use": [*config.methods.use, *settled.added],
                                           "optim.name": settled.optimizer})
        peak = estimate_for(cfg, o.batch_size, memory_methods_of(run_config.methods.use), run_config.methods,
                            run_config.optim.name, dtype, grad_accum=o.grad_accum).peak
    seconds = _step_seconds(speed, cfg, run_config, law, tokens_per_step) if budget.seconds is not None else None
    # a pruned run's law counts its average parameter count over the run (Jin et al. 2025, arXiv:2501.12486)
    density = average_block_density(run_config.methods)
    tokens = budget_tokens(budget, cfg, tokens_per_step, seconds, density)
    n = round(non_embedding_parameters(cfg) - (1.0 - density) * block_matmul_parameters(cfg))
    loss = float(law.law.loss(n, tokens))
    baseline = law.unigram_loss()
    stated = None if law.is_prior or (baseline is not None and loss >= baseline) else loss
    return Candidate(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, non_embedding=n,
                     step_seconds=seconds, tokens_per_second=tokens_per_step / seconds if seconds else None,
                     tokens=tokens, steps=int(tokens // tokens_per_step), law_loss=loss, predicted_loss=stated,
                     methods=memory_methods_of(run_config.methods.use), memory_peak=peak)


def _step_seconds(speed: Speed, cfg: ModelConfig, config: RunConfig, law: PlanningLaw, tokens_per_step: int) -> float:
    if speed.profile is not None:
        from flopwise.plan.device_profile import profile_dtype

        return speed.profile.step_seconds(cfg, tokens_per_step, profile_dtype(config, speed.profile))
    assert speed.probe is not None  # plan_run refuses a seconds budget without either
    return speed.probe(cfg, config) / law.throughput_ratio


def _assumptions(config: RunConfig, law: PlanningLaw, best: Candidate, budget: Budget, device: str,
                 vocab_size: int, speed: Speed, optimum: tuple[float, float] | None) -> list[str]:
    o, s = config.optim, config.schedule
    limits = law.size_range()
    lines = [f"loss: {_loss_basis(law, best)}",
             f"law: {law.describe()}",
             _throughput_line(config, law, best, budget, device, vocab_size, speed),
             f"budget: {budget.describe()}; the first limit to bind decides the tokens"
             + (f"; sizes from {_describe_range(limits)}, within {SIZE_EXTRAPOLATION:g}x of the law's runs"
                if limits else ""),
             f"recipe: {o.name} (lr {o.lr:g}" + (f", muon_lr {o.muon_lr:g}" if o.name != "adamw" else "")
             + f"), batch {o.batch_size} x {o.grad_accum} accumulation, {s.name} schedule (warmup {s.warmup:g}, "
               f"decay {s.decay:g}) as configured"
             + ("; the prior's allocation is for Chinchilla's recipe" if law.is_prior else
                "; the law holds for this recipe")]
    if config.memory.limit is not None:
        source = " (the device profile's memory)" if speed.profile and speed.profile.memory_gib else ""
        lines.append(f"memory: cap {format_bytes(config.memory.limit)}{source}; estimated peak "
                     f"{format_bytes(best.memory_peak or 0)} with {', '.join(best.methods) or 'no methods'}")
    else:
        lines.append("memory: no cap given (--memory)")
    longest = law.longest_run_tokens()
    lines.append(f"tokens: {format_amount('tokens', best.tokens)} = {best.tokens / best.non_embedding:.1f} per "
                 "non-embedding parameter"
                 + (f"; {best.tokens / longest:.1f}x the law's longest run ({format_amount('tokens', longest)}), "
                    "so its token term is extrapolated that far" if longest and best.tokens > longest else ""))
    if optimum is not None:
        n, d = optimum
        lines.append(f"the law's compute-optimal allocation at {format_amount('flops', budget.flops)}: "
                     f"{n / 1e6:,.1f}M non-embedding parameters on {format_amount('tokens', d)} ({d / n:.1f} tokens "
                     "per parameter); the plan is the family member with the least loss")
    return lines


def _loss_basis(law: PlanningLaw, best: Candidate) -> str:
    """Whether the plan's loss is a prediction, and from what."""
    if law.is_prior:
        return ("prior: no loss is predicted, since the prior's losses belong to another corpus and tokenizer; it "
                "gives the allocation only (`flopwise scan` fits a law on this data that predicts one)")
    baseline = law.unigram_loss()
    if best.predicted_loss is None:
        return (f"fitted on this data, but its loss here ({best.law_loss:.2f}) is not below the data's unigram "
                f"baseline {baseline:.2f}, so it is no prediction: the law is extrapolated beyond its runs")
    return "fitted on this data and device" + (f"; the data's unigram baseline is {baseline:.4f}" if baseline else "")


def _throughput_line(config: RunConfig, law: PlanningLaw, best: Candidate, budget: Budget, device: str,
                     vocab_size: int, speed: Speed) -> str:
    if best.step_seconds is None or best.tokens_per_second is None:
        return ("throughput: not needed: the budget is in FLOPs or tokens, so each size's tokens come from its FLOPs "
                "per token (no probe, no model built)")
    o = config.optim
    shape = family_shape(config.model, best.d_model, vocab_size)
    step = (f"{best.step_seconds:.3f} s per step of {o.batch_size * o.grad_accum} x {shape.seq_len} tokens")
    if speed.profile is not None:
        from flopwise.plan.device_profile import profile_dtype

        return (f"throughput: {best.tokens_per_second:,.0f} tokens/s for the chosen shape ({step}) from the "
                + speed.profile.assumptions(profile_dtype(config, speed.profile)))
    flops = flops_per_token(shape) * best.tokens_per_second
    peak = speed.matmul_peak
    mfu = f", {flops / 1e9:.1f} GFLOP/s" + (f" = {flops / peak:.0%} of the measured matmul peak "
                                            f"{peak / 1e9:.0f} GFLOP/s" if peak else "")
    return (f"throughput: measured on {device}: {best.tokens_per_second:,.0f} tokens/s{mfu} for the chosen shape "
            f"({step}" + (f", scaled by {law.throughput_ratio:.3f}, what the scan's runs achieved against the probe)"
                          if law.throughput_ratio != 1.0 else ")"))
