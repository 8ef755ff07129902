"""Early forecast of a run's final held-out loss from the first part of its training-loss curve.

While the learning rate is constant (the stable phase of warmup-stable-decay), the training loss
follows a saturating power law in tokens, L_const(D) = E + A * D^-gamma.  The cooldown then lowers
the loss below that curve, and the held-out loss sits a little apart from the training loss; both
effects are folded into one factor kappa, final_val_loss = kappa * L_const(D_total), measured on
finished pilot runs of the same setup.  A forecast is kappa * L_const(D_total) from a fit on the
stable points seen so far, with an interval that combines kappa's spread across pilots and the
fit's own standard error at D_total.  Trainers can log it and stop a run whose interval lies
entirely above the loss it has to beat.

Early in a run the curve says little: at 30% of a 5-minute run it is often still bending from its
fast early fall (or sits before a sudden drop, as when a small model learns to copy), and forecasts
from it missed by up to 18% (interval +-23%).  Where a scan has fitted a law for this setup and the
run's size is within the law's range, the law's loss at the projected tokens is a second forecast,
with its own spread (bootstrap and the law's holdout error).  The two are averaged with inverse-
variance weights, so the law carries the early forecasts and the curve takes over as it firms up;
on a size the law is unsure of (wide bootstrap), the curve dominates throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.optim.schedules import Schedule

SKIP = 0.1  # fit only stable points with tokens >= SKIP * the last stable point's tokens
MIN_POINTS = 8  # fewer stable points than this after the skip: no forecast
MIN_SPAN = 1.5  # the used points must span at least this ratio in tokens
KAPPA_SIGMAS = 2.0  # kappa's half-width in standard deviations across pilot runs
FIT_SIGMAS = 2.0  # the fit's half-width in standard errors of its extrapolation
KAPPA_FLOOR = 0.01  # smallest relative half-width for kappa (one pilot run, or identical ones)
MAX_GAMMA = 3.0  # steeper than any loss curve; the bound keeps a fit on a short span from running off
_STARTS = ((0.5, 0.3), (0.9, 1.0))  # (E / min loss, gamma) starting points of the fit
BOOTSTRAP_Z = 1.2816  # the bootstrap's 10-90% interval spans this many standard deviations either side


class CurvePoint(NamedTuple):
    """One logged training step: cumulative tokens, its (noisy) training loss, and the progress the LR was read at."""

    tokens: float
    loss: float
    p_lr: float


@dataclass(frozen=True)
class CurveFit:
    """L_const(D) = E + A * D^-gamma fitted on n_points; rmse is in log-loss, i.e. a relative error."""

    E: float
    A: float
    gamma: float
    n_points: int
    rmse: float

    def __call__(self, tokens: Any) -> Any:
        return self.E + self.A * np.power(np.asarray(tokens, dtype=float), -self.gamma)


@dataclass(frozen=True)
class Calibration:
    """kappa = final_val_loss / L_const(total_tokens) across n_runs finished pilot runs."""

    kappa_mean: float
    kappa_std: float
    n_runs: int

    def __post_init__(self) -> None:
        if not (self.kappa_mean > 0 and self.kappa_std >= 0):
            raise FlopwiseError(f"calibration kappa_mean={self.kappa_mean}, kappa_std={self.kappa_std}: "
                                "the mean must be positive and the std non-negative")

    @property
    def half_width(self) -> float:
        """Relative half-width of kappa's interval, never below KAPPA_FLOOR so one pilot run is not trusted blindly."""
        return max(KAPPA_SIGMAS * self.kappa_std / self.kappa_mean, KAPPA_FLOOR)


class LossPrior(Protocol):
    """A law's forecast of the final loss for the run's size (flopwise/scaling/law_file.py's LawPrior)."""

    def predict(self, tokens: float) -> tuple[float, float]:
        """(loss, relative standard deviation) at ``tokens``."""
        ...


@dataclass(frozen=True)
class Forecast:
    """Predicted final held-out loss with its interval, the fit behind it, and how much of the run was seen;
    ``curve_loss`` is the curve's own forecast and ``law_loss`` the law's, when a law took part."""

    loss: float
    low: float
    high: float
    fit: CurveFit
    fraction_observed: float
    curve_loss: float
    law_loss: float | None = None
    law_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The forecast as one JSON-ready record for metrics.jsonl."""
        return {"predicted_loss": self.loss, "low": self.low, "high": self.high, "p_observed": self.fraction_observed,
                "curve_loss": self.curve_loss, "law_loss": self.law_loss, "law_weight": self.law_weight,
                "fit": {"E": self.fit.E, "A": self.fit.A, "gamma": self.fit.gamma}}


def points_from_events(events: Iterable[dict[str, Any]]) -> list[CurvePoint]:
    """The training curve from metrics.jsonl events; eval and other events are skipped."""
    points = []
    for event in events:
        if event.get("event") != "train":
            continue
        missing = [key for key in ("tokens", "loss", "p_lr") if key not in event]
        if missing:
            raise FlopwiseError(f"train event at step {event.get('step')} lacks {', '.join(missing)}: "
                                "read a metrics.jsonl written by flopwise train")
        points.append(CurvePoint(float(event["tokens"]), float(event["loss"]), float(event["p_lr"])))
    return points


def projected_total_tokens(tokens_now: float, p_now: float) -> float:
    """Tokens at the end of a run limited by time or FLOPs, assuming throughput stays what it has been."""
    if not 0.0 < p_now <= 1.0:
        raise FlopwiseError(f"p_now={p_now} must lie in (0, 1]: pass the budget progress of the last step")
    if not tokens_now > 0:
        raise FlopwiseError(f"tokens_now={tokens_now} must be positive: pass the tokens seen so far")
    return tokens_now / p_now


def stable_points(points: Sequence[CurvePoint], schedule: Schedule, skip: float = SKIP) -> list[CurvePoint]:
    """Points at full learning rate, without the earliest ones where the loss still falls faster than a power law.

    Skipping below a fixed fraction of the last stable point's tokens keeps the fitted window the
    same shape in log-tokens (a factor 1/skip) however long the run or however far it has got, so
    that kappa measured on one run length carries over to another."""
    if not 0.0 <= skip < 1.0:
        raise FlopwiseError(f"skip={skip} must lie in [0, 1): it is the fraction of the last stable tokens to skip")
    full = [pt for pt in points
            if schedule(pt.p_lr) >= 1.0 - 1e-9 and pt.tokens > 0 and math.isfinite(pt.loss) and pt.loss > 0]
    if not full:
        return []
    last = max(pt.tokens for pt in full)
    return sorted((pt for pt in full if pt.tokens >= skip * last), key=lambda pt: pt.tokens)


def fit_curve(points: Sequence[CurvePoint]) -> CurveFit:
    """Robust fit of E + A * D^-gamma to the given points, in log-loss space.

    Log space makes every residual a relative error, so the noisy high-loss early points do not
    outweigh the later ones that matter for the extrapolation, and soft_l1 with a scale taken from
    the step-to-step noise shrugs off loss spikes.  Tokens are scaled by the last point's so that
    the amplitude B = A * D_last^-gamma stays near the loss's own size while fitting."""
    from scipy.optimize import least_squares  # here: scipy takes 0.3-0.5 s to import, short runs never fit

    if len(points) < 4:
        raise FlopwiseError(f"{len(points)} stable-phase points cannot fit a 3-parameter loss curve: log more steps")
    scale, log_x, log_loss = _scaled(points)
    min_loss = float(np.exp(log_loss.min()))
    f_scale = 1.5 * _noise_scale(log_loss)
    best = None
    for e_frac, gamma in _STARTS:
        e0 = e_frac * min_loss
        b0 = max(float(np.exp(np.median(log_loss[-max(len(log_x) // 10, 1):]))) - e0, 1e-3 * min_loss)
        result = least_squares(lambda theta: _log_model(theta, log_x) - log_loss, [e0, b0, gamma],
                               jac=lambda theta: _log_jacobian(theta, log_x), loss="soft_l1", f_scale=f_scale,
                               bounds=([0.0, 1e-12, 1e-3], [min_loss, np.inf, MAX_GAMMA]))
        if best is None or result.cost < best.cost:
            best = result
    e, b, gamma = (float(v) for v in best.x)
    rmse = float(np.sqrt(np.mean(best.fun ** 2)))
    return CurveFit(E=e, A=b * scale ** gamma, gamma=gamma, n_points=len(points), rmse=rmse)


def _scaled(points: Sequence[CurvePoint]) -> tuple[float, np.ndarray, np.ndarray]:
    """The last point's tokens, and log(tokens / those) and log(loss) of every point."""
    tokens = np.array([pt.tokens for pt in points])
    scale = float(tokens.max())
    return scale, np.log(tokens / scale), np.log([pt.loss for pt in points])


def _log_model(theta: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """log(E + B * x^-gamma) for theta = (E, B, gamma)."""
    return np.log(theta[0] + theta[1] * np.exp(-theta[2] * log_x))


def _log_jacobian(theta: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """Derivatives of _log_model by (E, B, gamma), one row per point: relative sensitivities of the loss."""
    power = np.exp(-theta[2] * log_x)
    model = theta[0] + theta[1] * power
    return np.stack([1.0 / model, power / model, -theta[1] * power * log_x / model], axis=1)


def _noise_scale(log_loss: np.ndarray) -> float:
    """Per-step noise of the log-loss from the median absolute step-to-step change (robust to spikes and the trend)."""
    return max(float(np.median(np.abs(np.diff(log_loss)))) / (0.6745 * math.sqrt(2.0)), 1e-4)


def _extrapolation_sd(fit: CurveFit, points: Sequence[CurvePoint], tokens: float) -> float:
    """Relative standard error of fit(tokens) from the curve's noise, by the delta method.

    The parameter covariance is sigma^2 (J^T J)^-1 with sigma from the residuals' median absolute
    deviation (so spikes do not inflate it), scaled by (1 + rho) / (1 - rho) for the residuals'
    lag-1 autocorrelation rho: a loss that wanders slowly carries fewer independent points than it
    has steps.  It costs no refit, unlike refits on subsets or a bootstrap."""
    scale, log_x, log_loss = _scaled(points)
    theta = np.array([fit.E, fit.A * scale ** -fit.gamma, fit.gamma])
    residuals = log_loss - _log_model(theta, log_x)
    sigma = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
    centred = residuals - residuals.mean()
    rho = min(max(float(centred[1:] @ centred[:-1] / (centred @ centred)), 0.0), 0.9) if centred.any() else 0.0
    jac = _log_jacobian(theta, log_x)
    grad = _log_jacobian(theta, np.array([math.log(tokens / scale)]))[0]
    variance = sigma ** 2 * (1 + rho) / (1 - rho) * float(grad @ np.linalg.pinv(jac.T @ jac) @ grad)
    return math.sqrt(max(variance, 0.0))


def calibrate_kappa(curve_points: Sequence[CurvePoint], final_val_loss: float, schedule: Schedule,
                    total_tokens: float, skip: float = SKIP) -> float:
    """kappa of one finished run: its final held-out loss over the constant-LR curve fitted on its stable phase.

    Pass the same skip as the forecasts will use, so that kappa absorbs the same fitting window."""
    if not final_val_loss > 0:
        raise FlopwiseError(f"final_val_loss={final_val_loss} must be positive: pass the last eval's val_loss")
    if not total_tokens > 0:
        raise FlopwiseError(f"total_tokens={total_tokens} must be positive: pass the tokens the run ended at")
    used = stable_points(curve_points, schedule, skip)
    if not _enough(used, MIN_POINTS):
        raise FlopwiseError(f"{len(used)} usable stable-phase points cannot calibrate kappa: "
                            f"log at least {MIN_POINTS} train steps at full learning rate")
    return final_val_loss / float(fit_curve(used)(total_tokens))


def summarize_kappas(kappas: Sequence[float]) -> Calibration:
    """Mean and sample standard deviation of kappa over pilot runs (std 0 for a single run)."""
    if not kappas:
        raise FlopwiseError("no kappa values to summarize: calibrate at least one finished pilot run")
    values = np.asarray(kappas, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return Calibration(kappa_mean=float(values.mean()), kappa_std=std, n_runs=len(values))


def forecast_final_loss(points: Sequence[CurvePoint], schedule: Schedule, total_tokens: float,
                        calibration: Calibration, min_points: int = MIN_POINTS, skip: float = SKIP,
                        prior: LossPrior | None = None) -> Forecast | None:
    """Final held-out loss predicted from the curve so far, or None while the stable phase is too short to fit.

    The interval's relative half-width combines, as independent errors, kappa's spread across pilot
    runs and twice the fit's standard error at total_tokens.  The fit's part covers the noise of the
    curve, not a curve that bends away from a power law after the observed part: a bend that every
    run of the setup shares is absorbed into kappa, one that varies widens kappa's spread.  With a
    ``prior``, the curve's forecast (half-width read as two standard deviations) and the law's are
    averaged with inverse-variance weights, and the interval is two standard deviations of the average."""
    if not total_tokens > 0:
        raise FlopwiseError(f"total_tokens={total_tokens} must be positive: pass the run's planned or projected tokens")
    if min_points < 4:
        raise FlopwiseError(f"min_points={min_points} cannot fit a 3-parameter loss curve: pass 4 or more")
    used = stable_points(points, schedule, skip)
    if not _enough(used, min_points):
        return None
    fit = fit_curve(used)
    const = float(fit(total_tokens))
    width = math.hypot(calibration.half_width, FIT_SIGMAS * _extrapolation_sd(fit, used, total_tokens))
    curve_loss = calibration.kappa_mean * const
    seen = min(max(pt.tokens for pt in points) / total_tokens, 1.0)
    if prior is None:
        return Forecast(loss=curve_loss, low=curve_loss * max(1.0 - width, 0.0), high=curve_loss * (1.0 + width),
                        fit=fit, fraction_observed=seen, curve_loss=curve_loss)
    law_loss, law_sd = prior.predict(total_tokens)
    curve_weight, law_weight = (width / 2) ** -2, max(law_sd, 1e-6) ** -2
    share = law_weight / (curve_weight + law_weight)
    loss = (1 - share) * curve_loss + share * law_loss
    width = 2 / math.sqrt(curve_weight + law_weight)
    return Forecast(loss=loss, low=loss * max(1.0 - width, 0.0), high=loss * (1.0 + width), fit=fit,
                    fraction_observed=seen, curve_loss=curve_loss, law_loss=law_loss, law_weight=share)


def _enough(used: Sequence[CurvePoint], min_points: int) -> bool:
    """Enough points over a wide enough token range for the three parameters to be told apart."""
    return len(used) >= min_points and used[-1].tokens >= MIN_SPAN * used[0].tokens
