"""The scaling fits: known parameters recovered from noisy synthetic points, intervals that
cover as often as they claim, degenerate input refused with one line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages import fits


def test_t_quantile_matches_the_tables():
    # Two-sided 95% and 99% quantiles of Student's t (any statistics table).
    for dof, q95 in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228),
                     (30, 2.042)):
        assert fits.t_quantile(0.95, dof) == pytest.approx(q95, abs=1e-3)
    assert fits.t_quantile(0.99, 5) == pytest.approx(4.032, abs=1e-3)
    assert fits.t_quantile(0.95, 1e6) == pytest.approx(1.960, abs=1e-3)
    assert fits.regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # 1 - sum of binomials
    with pytest.raises(fits.FitError, match="level"):
        fits.t_quantile(1.5, 3)


def test_power_law_recovers_a_falling_curve_and_predicts_beyond_it():
    rng = np.random.default_rng(0)
    a, b, c = 3.0, -0.4, 0.8
    x = np.geomspace(10, 1000, 8)
    y = a * x ** b + c + rng.normal(0, 0.002, x.size)
    fit = fits.power_law(x, y)
    est = fit.param
    assert est["a"] == pytest.approx(a, rel=0.1)
    assert est["b"] == pytest.approx(b, abs=0.03)
    assert est["c"] == pytest.approx(c, abs=0.02)
    assert fit.dof == 5 and fit.residual_std == pytest.approx(0.002, rel=0.6)
    # Each true parameter within 4 standard errors of its estimate.
    truth = np.array([a, b, c])
    assert np.all(np.abs(fit.params - truth) < 4 * fit.stderr)
    pred = fit.predict(4000)
    assert pred.low < a * 4000 ** b + c < pred.high
    assert pred.low <= pred.curve_low <= pred.value <= pred.curve_high <= pred.high


def test_power_law_recovers_a_rising_saturating_curve():
    rng = np.random.default_rng(1)
    x = np.array([100, 200, 400, 800, 1600, 3200.0])
    y = -2.0 * x ** -0.5 + 0.9 + rng.normal(0, 0.001, x.size)
    est = fits.power_law(x, y).param
    assert est["a"] == pytest.approx(-2.0, rel=0.15)
    assert est["b"] == pytest.approx(-0.5, abs=0.05)
    assert est["c"] == pytest.approx(0.9, abs=0.01)


def test_log_linear_recovers_its_parameters():
    rng = np.random.default_rng(2)
    n = np.array([500, 1000, 2000, 4000, 8000.0])
    y = 0.4 + 0.03 * np.log(n) + rng.normal(0, 0.003, n.size)
    fit = fits.log_linear(n, y)
    assert fit.param["alpha"] == pytest.approx(0.4, abs=0.03)
    assert fit.param["beta"] == pytest.approx(0.03, abs=0.003)
    assert fit(np.array([16000.0]))[0] == pytest.approx(0.4 + 0.03 * math.log(16000), abs=0.01)


@pytest.mark.parametrize("form", ["log", "power"])
def test_intervals_cover_a_new_measurement_about_as_often_as_claimed(form):
    """The 90% interval for one new measurement at the extrapolated x holds a fresh noisy
    point in roughly 90% of repeated experiments (exact for the linear form, first-order for
    the power law)."""
    rng = np.random.default_rng(3)
    x = np.geomspace(20, 640, 6)
    truth = ((lambda v: 0.5 + 0.04 * np.log(v)) if form == "log"
             else (lambda v: 2.0 * v ** -0.5 + 1.0))
    fitter = fits.log_linear if form == "log" else fits.power_law
    hits, trials = 0, 300
    for _ in range(trials):
        y = truth(x) + rng.normal(0, 0.01, x.size)
        pred = fitter(x, y, level=0.9).predict(1280)
        hits += pred.low <= truth(1280.0) + rng.normal(0, 0.01) <= pred.high
    assert 0.84 <= hits / trials <= 0.96


def test_gao_forms_recover_their_parameters_and_peaks():
    rng = np.random.default_rng(4)
    d = np.linspace(0.3, 3.0, 8)
    rl = d * (0.12 - 0.05 * np.log(d)) + rng.normal(0, 0.001, d.size)
    fit = fits.rl_overoptimization(d, rl)
    assert fit.param["alpha"] == pytest.approx(0.12, abs=0.01)
    assert fit.param["beta"] == pytest.approx(0.05, abs=0.005)
    peak = fits.rl_peak(fit)
    true_d = math.exp(0.12 / 0.05 - 1)  # where d (alpha - beta ln d) stops rising
    assert math.sqrt(peak["kl"]) == pytest.approx(true_d, rel=0.15)
    assert peak["low"] < true_d ** 2 < peak["high"] and peak["beyond_points"] is True

    bon = d * (0.1 - 0.03 * d) + rng.normal(0, 0.001, d.size)
    fit = fits.bon_overoptimization(d, bon)
    assert fit.param["alpha"] == pytest.approx(0.1, abs=0.005)
    assert fit.param["beta"] == pytest.approx(0.03, abs=0.003)
    peak = fits.bon_peak(fit)
    assert math.sqrt(peak["kl"]) == pytest.approx(0.1 / 0.06, rel=0.1)
    assert peak["beyond_points"] is False
    # A gain that only rises has no peak.
    rising = fits.bon_overoptimization(d, 0.1 * d + 0.01 * d * d)
    assert fits.bon_peak(rising)["kl"] is None and "beta <= 0" in fits.bon_peak(rising)["reason"]


def test_comparisons_for_a_target_accuracy():
    n = np.array([500, 1000, 2000, 4000.0])
    rng = np.random.default_rng(5)
    fit = fits.log_linear(n, 0.3 + 0.04 * np.log(n) + rng.normal(0, 0.002, n.size))
    answer = fits.x_for_target(fit, 0.7, x_max=1e9)
    exact = math.exp((0.7 - fit.param["alpha"]) / fit.param["beta"])
    assert answer["x"] == pytest.approx(exact, rel=0.01)
    assert answer["low"] <= answer["x"] <= answer["high"]
    # Accuracy that falls with data never gets there; neither does a target past the search.
    falling = fits.log_linear(n, 0.7 - 0.01 * np.log(n) + rng.normal(0, 0.001, n.size))
    assert fits.x_for_target(falling, 0.8, x_max=1e9)["x"] is None
    far = fits.x_for_target(fit, 0.99, x_max=1e5)
    assert far["x"] is None and far["high"] is None


@pytest.mark.parametrize("fitter,n_params", [(fits.power_law, 3), (fits.log_linear, 2),
                                             (fits.rl_overoptimization, 2),
                                             (fits.bon_overoptimization, 2)])
def test_degenerate_input_is_refused_with_one_line(fitter, n_params):
    good_x = [1.0, 2.0, 4.0, 8.0, 16.0]
    good_y = [5.0, 3.0, 2.2, 1.9, 1.7]
    cases = [
        (good_x[:n_params], good_y[:n_params], "need at least"),
        ([0.0, *good_x[1:]], good_y, "is not > 0"),
        ([-1.0, *good_x[1:]], good_y, "is not > 0"),
        (good_x, [math.nan, *good_y[1:]], "non-finite"),
        (good_x, [math.inf, *good_y[1:]], "non-finite"),
        ([2.0] * 5, good_y, "distinct x"),
        (good_x, good_y[:4], "x values but"),
    ]
    for x, y, message in cases:
        with pytest.raises(fits.FitError, match=message) as info:
            fitter(x, y)
        assert "\n" not in str(info.value)
    fit = fitter(good_x, good_y)
    with pytest.raises(fits.FitError, match="cannot predict at x = 0"):
        fit.predict(0.0)


def test_ratio_interval_resamples_whole_groups():
    lo, hi = fits.ratio_interval([3, 1, 2, 0], [4, 4, 4, 4], resamples=2000, seed=0)
    assert 0 <= lo < 6 / 16 < hi <= 1
    assert fits.ratio_interval([1, 2], [2, 2], resamples=0, seed=0) == (0.75, 0.75)
    assert all(math.isnan(v) for v in fits.ratio_interval([], [], 100, 0))
