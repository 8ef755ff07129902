"""Parametric scaling laws L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Approach 3").

N is the parameter count, D the training tokens, L the loss in nats per token.  A law turns a FLOP
budget into a model size and a token count (``compute_optimal``); ``fit_law`` estimates one from
small runs as Hoffmann et al. did (Huber loss on log L over log-parameters, L-BFGS from a grid of
starts), with the Huber terms summed rather than averaged and tolerances to match their scale:
Besiroglu et al. 2024 traced Hoffmann's under-converged estimates to a loss scale so small that
L-BFGS stopped early.  ``bootstrap_laws`` refits resampled runs so a prediction comes with an interval.

Two priors stand in until runs exist.  ``CHINCHILLA`` is the paper's printed constants; its
allocation disagrees with Hoffmann's own Table 3 (0.70B parameters and 29B tokens at 1.21e20 FLOPs
against 1B and 20.2B, and worse at larger budgets).  ``CHINCHILLA_REFIT`` is Besiroglu et al.'s refit
of the same data, which agrees with Table 3 within 15% up to 1e12 parameters.

No torch import: the planner uses it before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from flopwise.errors import FlopwiseError

FIELDS = ("E", "A", "B", "alpha", "beta")
# The optimizer works on theta = (log E, log A, log B, alpha, beta), in FIELDS order.
LOG_FIELDS = ("E", "A", "B")
# Hoffmann et al.'s and Besiroglu et al.'s grid of starts, in theta's coordinates (5,400 points).
GRID = {"E": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5), "A": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "B": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
# L-BFGS-B runs from the grid points of least objective only: each run costs ~150 evaluations,
# the whole grid one vectorized evaluation.  A bootstrap refit starts from the full-data optimum,
# which is near the resample's (~40 evaluations), and from the best grid point as a check on it.
FIT_STARTS = 20
BOOTSTRAP_STARTS = 1
MAX_EXPONENT = 2.0  # the top of the start grid; Chinchilla-like fits land near 0.3
HUBER_DELTA = 1e-3  # Hoffmann et al.'s: residuals in log L beyond 0.1% count linearly, so outliers pull less
# The objective is a sum of Huber terms of size ~ delta * |residual|, about 1e-5 in all.  scipy's
# default ftol is relative to max(|f|, 1), so here an absolute 2e-9, and its gtol 1e-5: both would
# stop L-BFGS-B well short of the optimum, the failure Besiroglu et al. found in Hoffmann's fit.
LBFGS_OPTIONS = {"ftol": 1e-12, "gtol": 1e-9}
DEFAULT_SOURCE = "fit: Hoffmann et al. 2022 Approach 3 (Huber loss on log L)"


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, with ``source`` saying where the numbers come from."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise FlopwiseError(f"scaling law {name}={value!r} must be a non-negative finite number")

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        """Predicted loss at n parameters and d tokens (floats or numpy arrays)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, flops: float, flops_per_token_per_param: float = 6.0) -> tuple[float, float]:
        """(N, D) of least loss with flops = k * N * D: dL/dN = 0 along the constraint gives
        N = G * (C/k)^(beta/(alpha+beta)) with G = (alpha*A / (beta*B))^(1/(alpha+beta))."""
        for name, value in (("flops", flops), ("flops_per_token_per_param", flops_per_token_per_param)):
            if not (math.isfinite(value) and value > 0):
                raise FlopwiseError(f"compute_optimal: {name}={value!r} must be a positive finite number")
        if min(self.A, self.B, self.alpha, self.beta) == 0:
            raise FlopwiseError(f"scaling law {self.describe()} has no compute-optimal allocation: A, B, alpha and "
                                f"beta must all be positive (refit with runs at several sizes and token counts)")
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / total)
        params_times_tokens = flops / flops_per_token_per_param
        n = g * params_times_tokens ** (self.beta / total)
        return n, params_times_tokens / n

    def compute_for_tokens(self, tokens: float, flops_per_token_per_param: float = 6.0) -> float:
        """The FLOPs whose compute-optimal allocation trains on ``tokens``: the inverse of compute_optimal's D,
        D = (C/k)^(alpha/(alpha+beta)) / G, so a token budget (a fixed dataset) gets the size it is optimal for."""
        if not (math.isfinite(tokens) and tokens > 0):
            raise FlopwiseError(f"compute_for_tokens: tokens={tokens!r} must be a positive finite number")
        n, d = self.compute_optimal(1e20, flops_per_token_per_param)  # validates the law; G from any budget
        g = n / (1e20 / flops_per_token_per_param) ** (self.beta / (self.alpha + self.beta))
        return flops_per_token_per_param * (tokens * g) ** ((self.alpha + self.beta) / self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ScalingLaw:
        for key in (*FIELDS, "source"):
            if key not in data:
                raise FlopwiseError(f"scaling law is missing key '{key}': give all of {', '.join(FIELDS)} and source")
        try:
            values = [float(data[name]) for name in FIELDS]
        except (TypeError, ValueError):
            raise FlopwiseError(f"scaling law values must be numbers, got {({n: data[n] for n in FIELDS})}") from None
        return cls(*values, source=str(data["source"]))

    def describe(self) -> str:
        return (f"L = {self.E:.4g} + {self.A:.4g}/N^{self.alpha:.3f} + {self.B:.4g}/D^{self.beta:.3f} "
                f"({self.source})")


# Hoffmann et al. 2022, eq. 10, as printed: rounded (the TeX source has E=1.6934, alpha=0.3392,
# beta=0.2849) and, per Besiroglu et al. 2024, from an optimizer stopped before convergence.
CHINCHILLA = ScalingLaw(1.69, 406.4, 410.7, 0.34, 0.28,
                        source="prior: Hoffmann et al. 2022 (Chinchilla), published constants")
# Besiroglu, Erdil, Barnett and You 2024, "Chinchilla Scaling: A replication attempt" (arXiv 2404.10102),
# refitted to the runs read off Hoffmann et al.'s Figure 4.
CHINCHILLA_REFIT = ScalingLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                              source="prior: Besiroglu et al. 2024 refit of Hoffmann et al.'s data")


@dataclass(frozen=True)
class LawFit:
    """A fitted law and how well it fits: ``residuals`` are log L - log L_hat per run, in input order."""

    law: ScalingLaw
    objective: float
    n_runs: int
    residuals: list[float]
    rmse_log: float


# ---------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class _Runs:
    """Logs of the runs' sizes, tokens and losses, as the objective uses them."""

    log_n: np.ndarray
    log_d: np.ndarray
    log_loss: np.ndarray

    def take(self, index: np.ndarray) -> _Runs:
        return _Runs(self.log_n[index], self.log_d[index], self.log_loss[index])


def _runs(n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> _Runs:
    columns = {"n": np.asarray(n, dtype=float), "d": np.asarray(d, dtype=float), "loss": np.asarray(loss, dtype=float)}
    for name, values in columns.items():
        if values.ndim != 1:
            raise FlopwiseError(f"scaling fit: {name} must be a flat list of numbers, got shape {values.shape}")
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if bad.size:
            raise FlopwiseError(f"scaling fit: {name}[{bad[0]}]={float(values[bad[0]])!r} must be a positive "
                                f"finite number (drop that run)")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise FlopwiseError(f"scaling fit: n, d and loss need one entry per run, got lengths {lengths}")
    return _Runs(*(np.log(values) for values in columns.values()))


def _fixed_theta(fixed: Mapping[str, float] | None) -> dict[int, float]:
    """Fixed parameters as {index in theta: value in theta's coordinates}."""
    theta: dict[int, float] = {}
    for name, value in (fixed or {}).items():
        if name not in FIELDS:
            raise FlopwiseError(f"scaling fit: fixed parameter '{name}' is unknown: choose from {', '.join(FIELDS)}")
        positive = name in LOG_FIELDS
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise FlopwiseError(f"scaling fit: fixed {name}={value!r} must be a "
                                f"{'positive' if positive else 'non-negative'} finite number")
        theta[FIELDS.index(name)] = math.log(value) if positive else float(value)
    if len(theta) == len(FIELDS):
        raise FlopwiseError("scaling fit: fixed holds all five parameters, so nothing is left to fit: "
                            "build a ScalingLaw directly")
    return theta


def _needed_runs(fixed: dict[int, float]) -> int:
    """One run more than free parameters, so that the fit is not an exact interpolation."""
    return len(FIELDS) - len(fixed) + 1


def _log_terms(theta: np.ndarray, runs: _Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log E, log(A/N^alpha) and log(B/D^beta) per run: shape (runs,) for one theta, (k, runs) for k of them."""
    return (theta[..., 0, None] + np.zeros_like(runs.log_n), theta[..., 1, None] - theta[..., 3, None] * runs.log_n,
            theta[..., 2, None] - theta[..., 4, None] * runs.log_d)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    size = np.abs(r)
    return np.where(size <= delta, 0.5 * r * r, delta * (size - 0.5 * delta))


def _objective(theta: np.ndarray, runs: _Runs, delta: float) -> tuple[float, np.ndarray]:
    """Sum over runs of Huber(log L_hat - log L), and its gradient in theta.

    log L_hat is the log-sum-exp of the three log terms, shifted by their largest so nothing
    overflows; its derivative in each term is that term's share of L_hat (``weights / total``).
    """
    terms = _log_terms(theta, runs)
    top = np.maximum(np.maximum(terms[0], terms[1]), terms[2])
    weights = [np.exp(term - top) for term in terms]
    total = weights[0] + weights[1] + weights[2]
    r = top + np.log(total) - runs.log_loss
    slope = np.clip(r, -delta, delta) / total  # Huber's derivative, over the sum the shares need
    grad = np.array([slope @ weights[0], slope @ weights[1], slope @ weights[2],
                     -(slope * weights[1]) @ runs.log_n, -(slope * weights[2]) @ runs.log_d])
    return float(_huber(r, delta).sum()), grad


def _grid(fixed: dict[int, float]) -> np.ndarray:
    """Every start of GRID, fixed parameters at their value: shape (k, 5)."""
    axes = [np.array([fixed[i]]) if i in fixed else np.array(GRID[name]) for i, name in enumerate(FIELDS)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(FIELDS))


def _log_predicted(theta: np.ndarray, runs: _Runs) -> np.ndarray:
    """log L_hat per run, for one theta or many, as a log-sum-exp that cannot overflow."""
    log_e, log_n_term, log_d_term = _log_terms(theta, runs)
    return np.logaddexp(np.logaddexp(log_e, log_n_term), log_d_term)


def _grid_huber(grid: np.ndarray, runs: _Runs, delta: float) -> np.ndarray:
    """The Huber term of every run at every grid point, shape (k, runs), all at once: a resample's
    objective over the grid is this times how often it draws each run."""
    return _huber(_log_predicted(grid, runs) - runs.log_loss, delta)


def _lowest(grid: np.ndarray, objective: np.ndarray, count: int) -> np.ndarray:
    return grid[np.argsort(objective, kind="stable")[:count]]


def _centred(runs: _Runs, fixed: dict[int, float]) -> tuple[_Runs, np.ndarray]:
    """The runs with log N and log D measured from their means, and theta's shift to match.

    With a' = a - alpha * mean(log N) the model is unchanged but a' and alpha are nearly
    uncorrelated (log N spans ~12..20, so a and alpha are not), which saves L-BFGS-B about a third
    of its steps.  Not for an axis whose constant is fixed while its exponent is free: a' would move.
    """
    centre_n = runs.log_n.mean() if 1 not in fixed or 3 in fixed else 0.0
    centre_d = runs.log_d.mean() if 2 not in fixed or 4 in fixed else 0.0
    shift = np.zeros((len(FIELDS), len(FIELDS)))  # theta' = theta + theta @ shift
    shift[3, 1], shift[4, 2] = -centre_n, -centre_d
    return _Runs(runs.log_n - centre_n, runs.log_d - centre_d, runs.log_loss), shift


def _minimize(starts: np.ndarray, runs: _Runs, delta: float, fixed: dict[int, float]) -> tuple[np.ndarray, float]:
    """L-BFGS-B over the free parameters from each start: the best theta and its objective.

    The exponents are kept in [0, MAX_EXPONENT]: a loss that rises with N or D is noise, not a law,
    and with few sizes an exponent can otherwise run off to trade against E."""
    from scipy.optimize import minimize  # here: scipy takes 0.3-0.5 s to import, and a run only reads a law

    free = [i for i in range(len(FIELDS)) if i not in fixed]
    bounds = [(None, None) if FIELDS[i] in LOG_FIELDS else (0.0, MAX_EXPONENT) for i in free]
    centred, shift = _centred(runs, fixed)
    starts = starts + starts @ shift
    theta = starts[0].copy()

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta[free] = x
        value, grad = _objective(theta, centred, delta)
        return value, grad[free]

    best_x, best_value = starts[0][free], math.inf
    for start in starts:
        result = minimize(objective, start[free], jac=True, method="L-BFGS-B", bounds=bounds, options=LBFGS_OPTIONS)
        if result.fun < best_value:
            best_x, best_value = result.x, float(result.fun)
    theta[free] = best_x
    return theta - theta @ shift, best_value


def _law(theta: np.ndarray, source: str) -> ScalingLaw:
    return ScalingLaw(*(math.exp(v) if name in LOG_FIELDS else float(v) for name, v in zip(FIELDS, theta)),
                      source=source)


def _checked(n: Sequence[float], d: Sequence[float], loss: Sequence[float], delta: float,
             fixed: Mapping[str, float] | None) -> tuple[_Runs, dict[int, float]]:
    """The runs and the fixed parameters, validated, with enough runs for the parameters left free."""
    runs = _runs(n, d, loss)
    if not (math.isfinite(delta) and delta > 0):
        raise FlopwiseError(f"scaling fit: delta={delta!r} must be a positive finite number (Hoffmann et al. use 1e-3)")
    fixed_theta = _fixed_theta(fixed)
    needed = _needed_runs(fixed_theta)
    if len(runs.log_n) < needed:
        raise FlopwiseError(f"scaling fit: {len(runs.log_n)} runs cannot pin {len(FIELDS) - len(fixed_theta)} free "
                            f"parameters: give at least {needed} runs, or fix some parameters with fixed=...")
    return runs, fixed_theta


def _fit_theta(runs: _Runs, delta: float, fixed: dict[int, float]) -> tuple[np.ndarray, float]:
    grid = _grid(fixed)
    return _minimize(_lowest(grid, _grid_huber(grid, runs, delta).sum(axis=1), FIT_STARTS), runs, delta, fixed)


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *, delta: float = HUBER_DELTA,
            fixed: dict[str, float] | None = None, source: str = DEFAULT_SOURCE) -> LawFit:
    """Fit E, A, B, alpha and beta (less those in ``fixed``) to runs of n parameters trained on d tokens.

    Hoffmann et al.'s Approach 3: Huber(log L_hat - log L) summed over runs, minimized by L-BFGS-B
    with the analytic gradient from the best FIT_STARTS points of their grid, the best optimum kept.
    The log scale weighs every run alike whatever its loss; Huber keeps one bad run from pulling the law.
    """
    runs, fixed_theta = _checked(n, d, loss, delta, fixed)
    theta, objective = _fit_theta(runs, delta, fixed_theta)
    residuals = runs.log_loss - _log_predicted(theta, runs)
    return LawFit(_law(theta, source), objective, len(residuals), residuals.tolist(),
                  float(np.sqrt(np.mean(residuals ** 2))))


def bootstrap_laws(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *, samples: int = 200,
                   seed: int = 0, fixed: dict[str, float] | None = None) -> list[ScalingLaw]:
    """Laws refitted to ``samples`` residual-bootstrap replicates, for parameter and prediction intervals.

    Each replicate keeps every run's (N, D) and adds to the fitted log-losses the fit's own residuals
    drawn with replacement.  A scan has about nine runs on a small grid of sizes and lengths;
    resampling whole runs would often drop a size or a length and leave the law unidentified, while
    resampling residuals keeps the design and asks only how much the noise it shows moves the law.
    The intervals therefore cover noise, not a law of the wrong form."""
    if samples < 1:
        raise FlopwiseError(f"bootstrap: samples={samples!r} must be a positive integer")
    runs, fixed_theta = _checked(n, d, loss, HUBER_DELTA, fixed)
    warm, _ = _fit_theta(runs, HUBER_DELTA, fixed_theta)
    fitted = _log_predicted(warm, runs)
    residuals = runs.log_loss - fitted
    grid = _grid(fixed_theta)
    generator = np.random.default_rng(seed)
    laws = []
    for sample in range(samples):
        replicate = _Runs(runs.log_n, runs.log_d, fitted + generator.choice(residuals, size=len(residuals)))
        starts = np.vstack([warm, _lowest(grid, _grid_huber(grid, replicate, HUBER_DELTA).sum(axis=1),
                                          BOOTSTRAP_STARTS)])
        theta, _ = _minimize(starts, replicate, HUBER_DELTA, fixed_theta)
        laws.append(_law(theta, f"bootstrap {sample} of {len(residuals)} runs (seed {seed})"))
    return laws


# ---------------------------------------------------------------------------------------------
# Intervals


def _check_intervals(laws: Sequence[ScalingLaw], quantiles: tuple[float, float]) -> None:
    if not laws:
        raise FlopwiseError("no scaling laws to take quantiles over: bootstrap_laws needs more distinct runs")
    low, high = quantiles
    if not 0 <= low <= high <= 1:
        raise FlopwiseError(f"quantiles={quantiles!r} must be two numbers 0 <= low <= high <= 1, e.g. (0.1, 0.9)")


def interval(laws: Sequence[ScalingLaw], n: float, d: float,
             quantiles: tuple[float, float] = (0.1, 0.9)) -> tuple[float, float]:
    """Quantiles over the laws of the loss they predict at n parameters and d tokens."""
    _check_intervals(laws, quantiles)
    low, high = np.quantile([law.loss(n, d) for law in laws], quantiles)
    return float(low), float(high)


def parameter_intervals(laws: Sequence[ScalingLaw],
                        quantiles: tuple[float, float] = (0.1, 0.9)) -> dict[str, tuple[float, float]]:
    """Quantiles over the laws of each of E, A, B, alpha and beta."""
    _check_intervals(laws, quantiles)
    table = np.array([[getattr(law, name) for name in FIELDS] for law in laws])
    low, high = np.quantile(table, quantiles, axis=0)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(FIELDS, low, high)}
