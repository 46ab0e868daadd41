"""Curve fits for predicting a run from smaller ones, as pure functions of (x, y) points.

Four forms, each chosen from the literature for the quantity it describes:

- ``power_law``: L(C) = a * C^b + c, a loss against compute or data with an irreducible term c
  (the GPT-4 report's predictable scaling; Kaplan et al. 2020 and Hoffmann et al. 2022 fit the
  same shape). For a reward model's held-out loss against annotator labels, c is the entropy of
  the annotators' own noise, which no amount of data removes.
- ``log_linear``: acc(n) = alpha + beta * ln n, a reward model's pairwise accuracy against the
  number of training comparisons. Stiennon et al. (2020, fig. 6) and Gao et al. (2022, fig. 5)
  both report accuracy rising roughly linearly in log data over the range they trained; the
  form has two parameters, so four small runs leave two degrees of freedom for the uncertainty.
  It has no ceiling: accuracy is bounded by 1 (and, against noisy annotators, by their
  self-agreement), so a prediction far past the fitted range overshoots; use it for a few
  doublings, not for orders of magnitude.
- ``rl_overoptimization``: gold = d * (alpha - beta * ln d) and ``bon_overoptimization``:
  gold = d * (alpha - beta * d), Gao et al.'s forms for the gold score gained over the initial
  policy by RL and by best-of-n, with d = sqrt(KL to the initial policy). Both vanish at d = 0,
  so the points are the gains over the initial policy (the d = 0 point is the origin and is
  not fitted).

Every fit returns its parameters, their covariance and a ``predict`` that gives an interval.
Intervals come from the delta method with the residual variance of the fit and a Student-t
quantile with (points - parameters) degrees of freedom: exact for the three forms that are
linear in their parameters, first-order for the power law. ``predict`` gives both the interval
of the fitted curve (the parameters' uncertainty) and that of one new measurement at x (the
curve's plus the residual scatter), which is the one a measured value should fall in.

Degenerate input is refused with one line (``FitError``): fewer points than parameters plus
one (a fit needs a residual degree of freedom for its uncertainty), x <= 0 where the form takes
a log or a power of it, non-finite values, or points that do not determine the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class FitError(ValueError):
    """A fit refused: its message is one line saying what was wrong with the points."""


# ---------------------------------------------------------------------------------------------
# Student-t quantiles (no scipy): the regularized incomplete beta function, then bisection
# ---------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast on the side of the mean; the other side by symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(level: float, dof: float) -> float:
    """The two-sided ``level`` quantile: P(|T| <= q) = level (12.71 for 95% at 1 dof)."""
    if not 0.0 < level < 1.0:
        raise FitError(f"interval level {level}: expected in (0, 1)")
    if dof <= 0:
        raise FitError(f"{dof} degrees of freedom: a t quantile needs at least one")
    target = 0.5 + level / 2.0
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < target:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, dof) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


# ---------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The fit at x: its value, the interval of the curve, and that of one new measurement."""

    x: float
    value: float
    low: float
    high: float
    curve_low: float
    curve_high: float

    def as_dict(self) -> dict:
        return {"x": self.x, "value": self.value, "low": self.low, "high": self.high,
                "curve_low": self.curve_low, "curve_high": self.curve_high}


@dataclass(frozen=True)
class Fit:
    """A least-squares fit of ``form`` to points (x, y)."""

    form: str
    names: tuple[str, ...]
    params: np.ndarray
    cov: np.ndarray
    x: np.ndarray
    y: np.ndarray
    residual_std: float
    level: float
    model: Callable[[np.ndarray, np.ndarray], np.ndarray]
    jacobian: Callable[[np.ndarray, np.ndarray], np.ndarray]
    x_positive: bool

    @property
    def dof(self) -> int:
        return len(self.x) - len(self.params)

    @property
    def stderr(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    @property
    def param(self) -> dict[str, float]:
        return dict(zip(self.names, self.params.tolist()))

    def __call__(self, x) -> np.ndarray:
        return self.model(self.params, np.asarray(x, dtype=np.float64))

    def band(self, x, level: float | None = None) -> tuple[np.ndarray, ...]:
        """(value, low, high, curve_low, curve_high) at each of ``x``: delta-method intervals
        at ``level`` (default: the fit's) for one new measurement and for the curve."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        bad = ~np.isfinite(x) | ((x <= 0) if self.x_positive else False)
        if np.any(bad):
            raise FitError(f"{self.form}: cannot predict at x = {float(x[bad][0])}"
                           + (" (x must be > 0)" if self.x_positive else ""))
        value = self.model(self.params, x)
        g = self.jacobian(self.params, x)
        curve_var = np.clip(np.einsum("ij,jk,ik->i", g, self.cov, g), 0.0, None)
        q = t_quantile(self.level if level is None else level, self.dof)
        curve = q * np.sqrt(curve_var)
        new = q * np.sqrt(curve_var + self.residual_std ** 2)
        return value, value - new, value + new, value - curve, value + curve

    def predict(self, x: float, level: float | None = None) -> Prediction:
        """The fit at ``x`` with its intervals (see ``band``)."""
        value, low, high, curve_low, curve_high = (float(v[0]) for v in self.band([x], level))
        return Prediction(float(x), value, low, high, curve_low, curve_high)

    def as_dict(self) -> dict:
        return {"form": self.form, "params": self.param,
                "stderr": dict(zip(self.names, self.stderr.tolist())),
                "cov": self.cov.tolist(), "points": len(self.x), "dof": self.dof,
                "residual_std": self.residual_std, "level": self.level}


def _points(form: str, x, y, n_params: int, x_positive: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise FitError(f"{form}: x and y must be numbers") from None
    if x.shape != y.shape:
        raise FitError(f"{form}: {x.size} x values but {y.size} y values")
    if x.size < n_params + 1:
        raise FitError(f"{form}: {x.size} point(s) for {n_params} parameters; need at least "
                       f"{n_params + 1} (one more than the parameters, for an uncertainty)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise FitError(f"{form}: the points hold a non-finite value (nan or inf)")
    if x_positive and np.any(x <= 0):
        raise FitError(f"{form}: x = {float(x[x <= 0][0])} is not > 0 (the form takes the log "
                       "or a power of x)")
    if np.unique(x).size < n_params:
        raise FitError(f"{form}: {np.unique(x).size} distinct x value(s) cannot determine "
                       f"{n_params} parameters")
    return x, y


def _covariance(form: str, jac: np.ndarray, residuals: np.ndarray) -> tuple[np.ndarray, float]:
    """(s^2 (J^T J)^-1, s) with s^2 the residual variance on n - p degrees of freedom."""
    n, p = jac.shape
    jtj = jac.T @ jac
    if not (np.all(np.isfinite(jtj)) and np.all(np.isfinite(residuals))):
        raise FitError(f"{form}: the fit did not converge to finite parameters")
    # Relative to the scale of each column, so the test does not depend on the units of x.
    scale = np.sqrt(np.diag(jtj))
    if np.any(scale == 0) or np.linalg.cond(jtj / np.outer(scale, scale)) > 1e12:
        raise FitError(f"{form}: the points do not determine the parameters (a singular fit)")
    s2 = float(residuals @ residuals) / (n - p)
    try:
        return s2 * np.linalg.inv(jtj), math.sqrt(s2)
    except np.linalg.LinAlgError:
        raise FitError(f"{form}: the points do not determine the parameters (a singular "
                       "fit)") from None


def _linear_fit(form: str, names: tuple[str, ...], features: Callable[[np.ndarray], np.ndarray],
                x, y, level: float, x_positive: bool) -> Fit:
    """y = features(x) @ params by least squares."""
    x, y = _points(form, x, y, len(names), x_positive)
    design = features(x)
    params, *_ = np.linalg.lstsq(design, y, rcond=None)
    cov, s = _covariance(form, design, y - design @ params)
    t_quantile(level, len(x) - len(names))  # a bad level is refused here, not at predict
    return Fit(form, names, params, cov, x, y, s, level,
               model=lambda p, x: features(x) @ p, jacobian=lambda p, x: features(x),
               x_positive=x_positive)


def log_linear(x, y, level: float = 0.95) -> Fit:
    """y = alpha + beta * ln x (accuracy against data; see the module docstring)."""
    return _linear_fit("alpha + beta*ln(x)", ("alpha", "beta"),
                       lambda x: np.stack([np.ones_like(x), np.log(x)], axis=1),
                       x, y, level, x_positive=True)


def rl_overoptimization(d, gain, level: float = 0.95) -> Fit:
    """gain = d * (alpha - beta * ln d), d = sqrt(KL): Gao et al.'s RL form."""
    return _linear_fit("d*(alpha - beta*ln(d))", ("alpha", "beta"),
                       lambda d: np.stack([d, -d * np.log(d)], axis=1),
                       d, gain, level, x_positive=True)


def bon_overoptimization(d, gain, level: float = 0.95) -> Fit:
    """gain = d * (alpha - beta * d), d = sqrt(KL): Gao et al.'s best-of-n form."""
    return _linear_fit("d*(alpha - beta*d)", ("alpha", "beta"),
                       lambda d: np.stack([d, -d * d], axis=1),
                       d, gain, level, x_positive=True)


def _power(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    return p[0] * np.power(x, p[1]) + p[2]


def _power_jacobian(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    xb = np.power(x, p[1])
    return np.stack([xb, p[0] * xb * np.log(x), np.ones_like(x)], axis=1)


def _power_start(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A starting point: the best of many log-log line fits of |y - c| for c beyond the data
    (below it for a falling curve, a > 0; above it for a rising one, a < 0)."""
    span = float(np.ptp(y)) or max(abs(float(y[0])), 1.0)
    best, best_sse = None, math.inf
    for sign in (1.0, -1.0):
        edge = float(y.min()) if sign > 0 else float(y.max())
        for gap in np.geomspace(1e-3, 1e3, 61) * span:
            c = edge - sign * gap
            slope, intercept = np.polyfit(np.log(x), np.log(sign * (y - c)), 1)
            p = np.array([sign * math.exp(intercept), slope, c])
            sse = float(np.sum((_power(p, x) - y) ** 2))
            if sse < best_sse:
                best, best_sse = p, sse
    return best


def power_law(x, y, level: float = 0.95, max_iter: int = 500) -> Fit:
    """y = a * x^b + c by Levenberg-Marquardt (loss against compute or data).

    x is scaled by its geometric mean while fitting, so the damping sees parameters of
    comparable size whatever the units of x; the result is in the units given.
    """
    form = "a*x^b + c"
    x, y = _points(form, x, y, 3, x_positive=True)
    x0 = float(np.exp(np.mean(np.log(x))))
    u = x / x0
    p = _power_start(u, y)
    sse = float(np.sum((_power(p, u) - y) ** 2))
    damping = 1e-3
    converged = False
    for _ in range(max_iter):
        jac = _power_jacobian(p, u)
        r = y - _power(p, u)
        jtj = jac.T @ jac
        step_taken = False
        for _ in range(60):
            lhs = jtj + damping * np.diag(np.diag(jtj) + 1e-12)
            try:
                step = np.linalg.solve(lhs, jac.T @ r)
            except np.linalg.LinAlgError:
                damping *= 10.0
                continue
            trial = p + step
            trial_sse = float(np.sum((_power(trial, u) - y) ** 2))
            if np.isfinite(trial_sse) and trial_sse <= sse:
                converged = sse - trial_sse <= 1e-14 * max(sse, 1e-300)
                p, sse, damping = trial, trial_sse, max(damping / 3.0, 1e-12)
                step_taken = True
                break
            damping *= 4.0
        if not step_taken or converged:
            break
    # In the caller's units: a * (x / x0)^b = (a * x0^-b) * x^b.
    params = np.array([p[0] * x0 ** (-p[1]), p[1], p[2]])
    jac = _power_jacobian(params, x)
    cov, s = _covariance(form, jac, y - _power(params, x))
    t_quantile(level, len(x) - 3)
    return Fit(form, ("a", "b", "c"), params, cov, x, y, s, level, model=_power,
               jacobian=_power_jacobian, x_positive=True)


# ---------------------------------------------------------------------------------------------
# Questions asked of a fit
# ---------------------------------------------------------------------------------------------


def x_for_target(fit: Fit, target: float, x_max: float, x_min: float = 1.0,
                 points: int = 4000) -> dict:
    """The smallest x at which the fitted curve reaches ``target`` (rising curves), with the
    interval from the curve's band: ``low`` where its upper edge gets there, ``high`` where its
    lower edge does. None for what is not reached by ``x_max`` (searched on a log grid from
    ``x_min``)."""
    if not x_max > x_min > 0:
        raise FitError(f"x_for_target: expected 0 < x_min < x_max, got {x_min}, {x_max}")
    grid = np.geomspace(x_min, x_max, points)
    value, _, _, curve_low, curve_high = fit.band(grid)

    def first(values):
        hit = np.nonzero(values >= target)[0]
        return float(grid[hit[0]]) if hit.size else None

    return {"target": target, "x": first(value), "low": first(curve_high),
            "high": first(curve_low), "x_max": x_max}


def rl_peak(fit: Fit) -> dict:
    """Where d * (alpha - beta ln d) peaks: d* = exp(alpha / beta - 1), KL* = d*^2, with a
    delta-method interval on ln KL*. No peak when beta <= 0 (the gain keeps rising)."""
    alpha, beta = fit.params
    if beta <= 0:
        return {"kl": None, "reason": "beta <= 0: the fitted gold gain does not turn down"}
    log_kl = 2.0 * (alpha / beta - 1.0)
    grad = np.array([2.0 / beta, -2.0 * alpha / beta ** 2])
    return _peak(fit, log_kl, grad)


def bon_peak(fit: Fit) -> dict:
    """Where d * (alpha - beta d) peaks: d* = alpha / (2 beta), KL* = d*^2."""
    alpha, beta = fit.params
    if beta <= 0 or alpha <= 0:
        return {"kl": None, "reason": ("beta <= 0: the fitted gold gain does not turn down"
                                       if beta <= 0 else "alpha <= 0: no gain to peak")}
    log_kl = 2.0 * math.log(alpha / (2.0 * beta))
    grad = np.array([2.0 / alpha, -2.0 / beta])
    return _peak(fit, log_kl, grad)


def _peak(fit: Fit, log_kl: float, grad: np.ndarray) -> dict:
    if log_kl > 700:
        return {"kl": None, "reason": f"the fitted peak is beyond any KL (ln KL = {log_kl:.3g})"}
    se = math.sqrt(max(float(grad @ fit.cov @ grad), 0.0))
    q = t_quantile(fit.level, fit.dof)
    kl = math.exp(log_kl)
    d = math.sqrt(kl)
    return {"kl": kl, "low": math.exp(max(log_kl - q * se, -700)),
            "high": math.exp(min(log_kl + q * se, 700)), "gain": float(fit(np.array([d]))[0]),
            "beyond_points": bool(d > float(fit.x.max()))}


def ratio_interval(numerators, denominators, resamples: int, seed: int,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling the groups (prompts):
    the pairs of one prompt share its responses, so they are not independent."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.size == 0 or den.sum() <= 0:
        return float("nan"), float("nan")
    if resamples <= 0:
        value = float(num.sum() / den.sum())
        return value, value
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num.size, size=(resamples, num.size))
    totals = den[picks].sum(axis=1)
    ratios = num[picks].sum(axis=1) / np.where(totals > 0, totals, np.nan)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.nanpercentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)
