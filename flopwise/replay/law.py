"""How much general data to replay when continuing to pretrain a model on a new domain.

Gu, Yang, Ding, Zhao and Tan 2024, "CMR Scaling Law: Predicting Critical Mixture Ratios for Continual
Pre-training of Language Models" (EMNLP 2024, arXiv 2407.17467).  A model with general loss G0 and
domain loss D0 is trained for T more tokens on a mix whose domain share is R (the rest replays general
data).  The paper's objective (Definition 1): the general loss at the end stays within a tolerance
epsilon of G0 (their eq. 1) while the domain loss falls (eq. 2).  Shares meeting eq. 1 form the set A
(Definition 2); the Critical Mixture Ratio is the largest feasible share (Definition 3), the most domain
data the model can take without losing its general ability.  They set epsilon = 0.05, an absolute
loss (nats per token), in section 5.1; ``critical_ratio`` takes a relative tolerance.

The paper fits two one-variable laws to loss increments dL = L - L(T=0):

- in tokens at a fixed share (eq. 6): dL_dom(T) = a1 T^s1 + b1 and dL_gen(T) = a2 T^s2 + a3 T^s3 + b2,
  two terms for the general loss because it first rises (forgetting) and then falls back;
- in the share at the final T (section 5.1): L(R) = a R^s + b, for each loss.

It does not say how a1, a2 and a3 move with R (its fits are per share), nor the signs of the exponents.
``ReplayLaw`` is the simplest surface whose sections are both of those forms, with t = T / tokens_ref:

    L_gen(R, T) = G0 + forget * R^forget_ratio_exponent * t^forget_token_exponent
                     + recovery * t^recovery_token_exponent
    L_dom(R, T) = D0 + adapt * R^adapt_ratio_exponent * t^adapt_token_exponent

At fixed R these are eq. 6 with a2 = forget * R^p, a3 = recovery, a1 = adapt * R^q; at fixed T they
are a R^s + b.  Two choices are ours: the biases b1 and b2 are pinned to 0 (the increments vanish at
T = 0, where the losses are the measured G0 and D0, so all token exponents are positive), and
``forget`` is kept >= 0 (the paper's Figure 3: general loss does not fall as the domain share grows),
which makes the general loss monotone in R and the critical ratio a closed form.  The positive
exponents mean the law grows without bound in T: trust it inside the pilots' token range, not far past it.

``fit_replay_law`` fits the two losses separately, as the paper does, by the Huber loss on log L
that ``flopwise.scaling.law`` uses (Hoffmann et al. 2022; the paper reports MSE on the increments).
The paper's eq. 8, a power law R_CMR(T) = a4 T^s4 + b3 fitted to critical ratios at several T, is
not needed here: ``critical_ratio`` solves for the ratio at any T from the loss law.

No torch import: the planner uses it before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

from flopwise.errors import FlopwiseError
from flopwise.scaling.law import HUBER_DELTA

PAPER_EPSILON = 0.05  # Gu et al. 2024, section 5.1: the general loss may end at most 0.05 nats above G0
FIELDS = ("base_general_loss", "base_domain_loss", "tokens_ref", "forget", "forget_ratio_exponent",
          "forget_token_exponent", "recovery", "recovery_token_exponent", "adapt", "adapt_ratio_exponent",
          "adapt_token_exponent")
GENERAL_PARAMS = 5  # forget, its two exponents, recovery and its exponent
MIN_RATIOS = 3  # two shares cannot split the general increment into its R-dependent and R-free parts
MIN_TOKEN_COUNTS = 2  # each token exponent needs two lengths
MIN_POINTS = GENERAL_PARAMS + 1  # one more than the larger fit's parameters, as scaling.fit_law asks
MAX_RATIO_EXPONENT = 4.0
TOKEN_EXPONENT_BOUNDS = (0.01, 2.0)  # positive, so the increments vanish at T = 0
RATIO_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
TOKEN_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5, 2.0)
FIT_STARTS = 6  # refinements from the best grid points, the coefficients solved by least squares there
# scipy's least_squares with loss="huber" and f_scale=delta minimizes exactly sum(Huber_delta(r)), the
# objective scaling.fit_law gives L-BFGS-B.  Not L-BFGS-B here: since scipy 1.15 it calls LAPACK on
# every step and runs ~10x slower with a multi-threaded OpenBLAS on busy cores (scipy issue #22438);
# least_squares reaches the same optimum unaffected.  Tolerances far below the default 1e-8, as the
# residuals themselves are ~1e-3 (Besiroglu et al. 2024 on fits stopped early, see scaling.py).
LEAST_SQUARES_OPTIONS = {"ftol": 1e-14, "xtol": 1e-14, "gtol": 1e-14, "max_nfev": 2000, "x_scale": "jac"}
DEFAULT_SOURCE = "fit: Gu et al. 2024 CMR loss law (Huber loss on log L)"


@dataclass(frozen=True)
class ReplayPoint:
    """One pilot: ``ratio`` is the domain share of the mix in (0, 1], ``tokens`` the continual-training
    tokens, and the held-out general and domain losses (nats per token) measured after them."""

    ratio: float
    tokens: float
    general_loss: float
    domain_loss: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and 0 < self.ratio <= 1):
            raise FlopwiseError(f"replay pilot ratio={self.ratio!r} must be a domain share in (0, 1]")
        for name in ("tokens", "general_loss", "domain_loss"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise FlopwiseError(f"replay pilot {name}={value!r} must be a positive finite number "
                                    f"(the starting model's losses go in base_general_loss/base_domain_loss)")


@dataclass(frozen=True)
class ReplayLaw:
    """General and domain loss after continual training on a mix with domain share R for T tokens.

    L_gen = base_general_loss + forget * R^forget_ratio_exponent * t^forget_token_exponent
            + recovery * t^recovery_token_exponent
    L_dom = base_domain_loss + adapt * R^adapt_ratio_exponent * t^adapt_token_exponent,  t = T / tokens_ref.
    """

    base_general_loss: float
    base_domain_loss: float
    tokens_ref: float
    forget: float
    forget_ratio_exponent: float
    forget_token_exponent: float
    recovery: float
    recovery_token_exponent: float
    adapt: float
    adapt_ratio_exponent: float
    adapt_token_exponent: float
    source: str

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise FlopwiseError(f"replay law {name}={value!r} must be a finite number")
        for name in ("base_general_loss", "base_domain_loss", "tokens_ref"):
            if getattr(self, name) <= 0:
                raise FlopwiseError(f"replay law {name}={getattr(self, name)!r} must be positive")
        for name in ("forget", "forget_ratio_exponent", "forget_token_exponent", "recovery_token_exponent",
                     "adapt_ratio_exponent", "adapt_token_exponent"):
            if getattr(self, name) < 0:
                raise FlopwiseError(f"replay law {name}={getattr(self, name)!r} must be non-negative")

    def _terms(self, ratio: float, tokens: float) -> tuple[float, float, float]:
        """The forgetting, recovery and adaptation increments at (ratio, tokens), after checking both."""
        if not (math.isfinite(ratio) and 0 <= ratio <= 1):
            raise FlopwiseError(f"replay law: ratio={ratio!r} must be a domain share in [0, 1]")
        if not (math.isfinite(tokens) and tokens >= 0):
            raise FlopwiseError(f"replay law: tokens={tokens!r} must be a non-negative finite number")
        if tokens == 0:
            return 0.0, 0.0, 0.0
        t = tokens / self.tokens_ref
        return (self.forget * ratio ** self.forget_ratio_exponent * t ** self.forget_token_exponent,
                self.recovery * t ** self.recovery_token_exponent,
                self.adapt * ratio ** self.adapt_ratio_exponent * t ** self.adapt_token_exponent)

    def general_loss(self, ratio: float, tokens: float) -> float:
        """Predicted general (replayed-distribution) loss after ``tokens`` at domain share ``ratio``."""
        forget, recovery, _ = self._terms(ratio, tokens)
        return self.base_general_loss + forget + recovery

    def domain_loss(self, ratio: float, tokens: float) -> float:
        """Predicted domain loss after ``tokens`` at domain share ``ratio``."""
        return self.base_domain_loss + self._terms(ratio, tokens)[2]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ReplayLaw:
        missing = [key for key in (*FIELDS, "source") if key not in data]
        if missing:
            raise FlopwiseError(f"replay law is missing key(s) {', '.join(missing)}: give all of "
                                f"{', '.join(FIELDS)} and source")
        try:
            values = {name: float(data[name]) for name in FIELDS}
        except (TypeError, ValueError):
            raise FlopwiseError(f"replay law values must be numbers, got {({n: data[n] for n in FIELDS})}") from None
        return cls(**values, source=str(data["source"]))

    def describe(self) -> str:
        return (f"L_gen = {self.base_general_loss:.4g} + {self.forget:.4g} R^{self.forget_ratio_exponent:.3f} "
                f"t^{self.forget_token_exponent:.3f} {'-' if self.recovery < 0 else '+'} {abs(self.recovery):.4g} "
                f"t^{self.recovery_token_exponent:.3f}; L_dom = {self.base_domain_loss:.4g} "
                f"{'-' if self.adapt < 0 else '+'} {abs(self.adapt):.4g} R^{self.adapt_ratio_exponent:.3f} "
                f"t^{self.adapt_token_exponent:.3f}; t = T / {self.tokens_ref:.4g} ({self.source})")


# ---------------------------------------------------------------------------------------------
# Fitting
#
# Each loss is base + sum_k c_k * R^(p_k) * t^(s_k): coefficients c and exponents (p, s), with
# p = 0 for the recovery term.  For fixed exponents the increments are linear in c, so a grid of
# exponents with c by weighted least squares gives the starts; least_squares then minimizes the Huber
# objective on log L over all parameters with the analytic Jacobian.


@dataclass(frozen=True)
class _Terms:
    """Which exponents each term has: (ratio exponent index or None, token exponent index) in theta."""

    coefficient: tuple[int, ...]
    ratio_exponent: tuple[int | None, ...]
    token_exponent: tuple[int, ...]
    bounds: tuple[tuple[float | None, float | None], ...]


# theta = (forget, forget_ratio_exponent, forget_token_exponent, recovery, recovery_token_exponent)
GENERAL = _Terms((0, 3), (1, None), (2, 4), ((0.0, None), (0.0, MAX_RATIO_EXPONENT), TOKEN_EXPONENT_BOUNDS,
                                             (None, None), TOKEN_EXPONENT_BOUNDS))
# theta = (adapt, adapt_ratio_exponent, adapt_token_exponent)
DOMAIN = _Terms((0,), (1,), (2,), ((None, None), (0.0, MAX_RATIO_EXPONENT), TOKEN_EXPONENT_BOUNDS))


def _features(theta: np.ndarray, terms: _Terms, log_r: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    """R^p * t^s per term and point, shape (terms, points)."""
    rows = []
    for ratio_index, token_index in zip(terms.ratio_exponent, terms.token_exponent):
        exponent = theta[token_index] * log_t
        if ratio_index is not None:
            exponent = exponent + theta[ratio_index] * log_r
        rows.append(np.exp(exponent))
    return np.array(rows)


def _residuals(theta: np.ndarray, terms: _Terms, base: float, log_r: np.ndarray, log_t: np.ndarray,
               log_loss: np.ndarray) -> np.ndarray:
    """log L_hat - log L per point; a law predicting a non-positive loss is held at a tiny floor."""
    predicted = base + theta[list(terms.coefficient)] @ _features(theta, terms, log_r, log_t)
    return np.log(np.maximum(predicted, 1e-12 * base)) - log_loss


def _jacobian(theta: np.ndarray, terms: _Terms, base: float, log_r: np.ndarray, log_t: np.ndarray,
              log_loss: np.ndarray) -> np.ndarray:
    """d(log L_hat)/d theta per point, shape (points, parameters); zero where the floor holds."""
    features = _features(theta, terms, log_r, log_t)
    coefficients = theta[list(terms.coefficient)]
    predicted = base + coefficients @ features
    scale = np.where(predicted > 1e-12 * base, 1.0 / np.maximum(predicted, 1e-12 * base), 0.0)
    jacobian = np.zeros((len(log_loss), len(theta)))
    for k, (c_index, p_index, s_index) in enumerate(zip(terms.coefficient, terms.ratio_exponent,
                                                         terms.token_exponent)):
        jacobian[:, c_index] += scale * features[k]
        term = scale * coefficients[k] * features[k]
        jacobian[:, s_index] += term * log_t
        if p_index is not None:
            jacobian[:, p_index] += term * log_r
    return jacobian


def _least_squares_starts(terms: _Terms, base: float, log_r: np.ndarray, log_t: np.ndarray,
                          loss: np.ndarray) -> list[np.ndarray]:
    """Every exponent combination of the grids, coefficients by least squares on the increments
    weighted by 1/L^2 (the log residual to first order), the FIT_STARTS of least weighted error."""
    exponent_indices = sorted({i for i in (*terms.ratio_exponent, *terms.token_exponent) if i is not None})
    axes = [RATIO_GRID if i in terms.ratio_exponent else TOKEN_GRID for i in exponent_indices]
    weights = 1.0 / loss ** 2
    increment = loss - base
    scored = []
    for combination in np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes)):
        theta = np.zeros(len(terms.bounds))
        theta[exponent_indices] = combination
        features = _features(theta, terms, log_r, log_t)
        coefficients = _weighted_least_squares(features, increment, weights, terms)
        if coefficients is None:
            continue
        theta[list(terms.coefficient)] = coefficients
        error = float(weights @ (coefficients @ features - increment) ** 2)
        scored.append((error, theta))
    scored.sort(key=lambda item: item[0])
    return [theta for _, theta in scored[:FIT_STARTS]]


def _weighted_least_squares(features: np.ndarray, target: np.ndarray, weights: np.ndarray,
                            terms: _Terms) -> np.ndarray | None:
    """Coefficients minimizing sum w (c @ features - target)^2 within their lower bounds: one the
    unconstrained solution breaks is held at its bound and the rest refitted.  None if singular."""
    coefficients = np.zeros(len(features))
    free = list(range(len(features)))
    while free:
        x = features[free]
        gram = (x * weights) @ x.T
        if np.linalg.cond(gram) > 1e12:
            return None
        held = [k for k in range(len(features)) if k not in free]
        rest = target - coefficients[held] @ features[held]
        coefficients[free] = np.linalg.solve(gram, (x * weights) @ rest)
        lows = [terms.bounds[terms.coefficient[k]][0] for k in free]
        broken = [k for k, low in zip(free, lows) if low is not None and coefficients[k] < low]
        if not broken:
            return coefficients
        coefficients[broken[0]] = terms.bounds[terms.coefficient[broken[0]]][0]
        free.remove(broken[0])
    return coefficients


def _fit_loss(terms: _Terms, base: float, log_r: np.ndarray, log_t: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The theta of least Huber objective over refinements from the least-squares starts."""
    lower = np.array([-np.inf if low is None else low for low, _ in terms.bounds])
    upper = np.array([np.inf if high is None else high for _, high in terms.bounds])
    args = (terms, base, log_r, log_t, np.log(loss))
    best_theta, best_cost = None, math.inf
    for start in _least_squares_starts(terms, base, log_r, log_t, loss):
        result = least_squares(_residuals, np.clip(start, lower, upper), jac=_jacobian, bounds=(lower, upper),
                               loss="huber", f_scale=HUBER_DELTA, args=args, **LEAST_SQUARES_OPTIONS)
        if result.cost < best_cost:
            best_theta, best_cost = result.x, float(result.cost)
    if best_theta is None:
        raise FlopwiseError("replay fit: the pilots do not separate the law's terms (every candidate was "
                            "singular): use distinct shares and token counts, e.g. from pilot_design()")
    return best_theta


def _check_coverage(points: Sequence[ReplayPoint]) -> None:
    """One line naming every kind of pilot that is missing, or nothing."""
    ratios = sorted({p.ratio for p in points})
    tokens = sorted({p.tokens for p in points})
    wants = []
    if len(ratios) < MIN_RATIOS:
        wants.append(f"{MIN_RATIOS - len(ratios)} more domain share(s)")
    if len(tokens) < MIN_TOKEN_COUNTS:
        wants.append(f"{MIN_TOKEN_COUNTS - len(tokens)} more token count(s)")
    if len(points) < MIN_POINTS and not wants:
        wants.append(f"{MIN_POINTS - len(points)} more pilot(s)")
    if wants:
        raise FlopwiseError(
            f"replay fit needs pilots at >= {MIN_RATIOS} domain shares and >= {MIN_TOKEN_COUNTS} token counts "
            f"(>= {MIN_POINTS} in all); got {len(points)} at shares [{', '.join(f'{r:.3g}' for r in ratios)}] and "
            f"tokens [{', '.join(f'{t:.3g}' for t in tokens)}]: add {' and '.join(wants)} (see pilot_design)")


def fit_replay_law(points: Sequence[ReplayPoint], base_general_loss: float, base_domain_loss: float,
                   *, source: str = DEFAULT_SOURCE) -> ReplayLaw:
    """Fit ``ReplayLaw`` to pilots that started from a model with the given general and domain losses.

    The general-loss law has five parameters and needs pilots at >= 3 domain shares and >= 2 token
    counts, >= 6 in all (``pilot_design`` gives 4 x 2).  Points of one run at several token counts are
    fine when its learning rate is constant after warmup, as in the paper (section 3.2): a decaying
    schedule's midway losses are not those of a shorter run.
    """
    points = list(points)
    if not all(isinstance(p, ReplayPoint) for p in points):
        raise FlopwiseError("replay fit: points must be ReplayPoint(ratio, tokens, general_loss, domain_loss)")
    for name, value in (("base_general_loss", base_general_loss), ("base_domain_loss", base_domain_loss)):
        if not (math.isfinite(value) and value > 0):
            raise FlopwiseError(f"replay fit: {name}={value!r} must be the starting model's positive loss")
    _check_coverage(points)
    tokens_ref = max(p.tokens for p in points)
    log_r = np.log([p.ratio for p in points])
    log_t = np.log([p.tokens / tokens_ref for p in points])
    general = _fit_loss(GENERAL, base_general_loss, log_r, log_t, np.array([p.general_loss for p in points]))
    domain = _fit_loss(DOMAIN, base_domain_loss, log_r, log_t, np.array([p.domain_loss for p in points]))
    return ReplayLaw(float(base_general_loss), float(base_domain_loss), float(tokens_ref),
                     *(float(v) for v in general), *(float(v) for v in domain), source=source)


# ---------------------------------------------------------------------------------------------
# The critical mixture ratio and the pilots that find it


def critical_ratio(law: ReplayLaw, tokens: float, base_general_loss: float, tolerance: float | None = None) -> float:
    """The largest domain share r in (0, 1] whose predicted general loss after ``tokens`` stays within
    (1 + tolerance) * base_general_loss, and whose domain loss falls (Gu et al.'s Definition 3 with their
    eqs. 1 and 2); 1.0 when even pure domain data stays within.

    ``tolerance`` is relative; None takes the paper's epsilon = 0.05 nats, i.e. 0.05 / base_general_loss.
    ``base_general_loss`` is normally ``law.base_general_loss``.  The paper's Definition 2 also asks the
    Lagrangian L_dom + lambda * (L_gen - G0 - epsilon) to fall somewhere along the run, but never fixes
    lambda; for small lambda that is the domain loss falling, which eq. 2 checks at the end.

    The general loss is non-decreasing in r (forget >= 0), so the boundary is
    r* = ((limit - G0 - recovery * t^s3) / (forget * t^s2))^(1 / forget_ratio_exponent).
    """
    if not (math.isfinite(tokens) and tokens > 0):
        raise FlopwiseError(f"critical_ratio: tokens={tokens!r} must be a positive finite number")
    if not (math.isfinite(base_general_loss) and base_general_loss > 0):
        raise FlopwiseError(f"critical_ratio: base_general_loss={base_general_loss!r} must be a positive loss")
    if tolerance is None:
        tolerance, limit = PAPER_EPSILON / base_general_loss, base_general_loss + PAPER_EPSILON
    elif not (math.isfinite(tolerance) and tolerance >= 0):
        raise FlopwiseError(f"critical_ratio: tolerance={tolerance!r} must be a non-negative number (0.01 = 1%)")
    else:
        limit = (1 + tolerance) * base_general_loss
    ratio = _largest_within(law, tokens, base_general_loss, tolerance, limit)
    if not law.domain_loss(ratio, tokens) < law.base_domain_loss:
        raise FlopwiseError(f"critical_ratio: at domain share {ratio:.4g} the law predicts domain loss "
                            f"{law.domain_loss(ratio, tokens):.4f} after {tokens:.4g} tokens, not below the "
                            f"starting {law.base_domain_loss:.4f}: continual training there does not pay")
    return ratio


def _largest_within(law: ReplayLaw, tokens: float, base_general_loss: float, tolerance: float,
                    limit: float) -> float:
    """The largest share in (0, 1] whose general loss is at most ``limit``."""
    if law.general_loss(1.0, tokens) <= limit:
        return 1.0
    forget_at_one, recovery, _ = law._terms(1.0, tokens)
    budget = limit - law.base_general_loss - recovery
    if budget <= 0 or law.forget_ratio_exponent == 0:
        floor = law.general_loss(0.0, tokens) if law.forget_ratio_exponent > 0 else law.general_loss(1.0, tokens)
        raise FlopwiseError(f"critical_ratio: no domain share in (0, 1] keeps general loss within {limit:.4f} "
                            f"({tolerance:.2%} above {base_general_loss:.4f}) after {tokens:.4g} tokens: "
                            f"even a share near 0 predicts {floor:.4f}; allow a larger tolerance or fewer tokens")
    return min(1.0, (budget / forget_at_one) ** (1.0 / law.forget_ratio_exponent))


def pilot_design(total_tokens: float, ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                 lengths: Sequence[float] = (1 / 3, 1)) -> list[tuple[float, float]]:
    """The (ratio, tokens) pilots ``fit_replay_law`` needs to suggest a share for ``total_tokens`` of
    continual training, cheapest first: every ratio at every length (a fraction of ``total_tokens``).

    At the default lengths the suggestion interpolates in T; shorter lengths cost less and extrapolate
    (the law is unbounded in T, so stay within a few times the longest pilot).  With a constant learning
    rate after warmup the short pilots are the long runs' midway evaluations, so the default costs four
    runs of ``total_tokens``.  The paper ran shares 1/8, 1/4, 1/3, 1/2 (and 3/4, 1 for Table 2).
    """
    if not (math.isfinite(total_tokens) and total_tokens > 0):
        raise FlopwiseError(f"pilot_design: total_tokens={total_tokens!r} must be a positive finite number")
    for name, values in (("ratios", ratios), ("lengths", lengths)):
        bad = [v for v in values if not (math.isfinite(v) and 0 < v <= 1)]
        if bad:
            raise FlopwiseError(f"pilot_design: {name} {bad} must lie in (0, 1]")
    distinct_ratios, distinct_lengths = sorted(set(ratios)), sorted(set(lengths))
    if len(distinct_ratios) < MIN_RATIOS or len(distinct_lengths) < MIN_TOKEN_COUNTS:
        raise FlopwiseError(f"pilot_design: the fit needs >= {MIN_RATIOS} distinct ratios and >= "
                            f"{MIN_TOKEN_COUNTS} distinct lengths, got ratios {distinct_ratios} and lengths "
                            f"{distinct_lengths}")
    return [(float(r), float(length * total_tokens)) for length in distinct_lengths for r in distinct_ratios]
