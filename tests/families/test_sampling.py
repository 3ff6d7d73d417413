"""Exact sampling: plain draws, confidence regions, Mahalanobis bands, far tails, components.

Radii are recomputed here from the dense covariances with numpy.linalg and tested against the
restricted chi-square law with Kolmogorov-Smirnov tests (fixed seeds, p > 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import gammainc, gammaincc, log_ndtr

from dmix.errors import InvalidParameterError
from dmix.families import sampling
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.gaussian import Gaussian
from dmix.families.sampling import sample_mixture
from dmix.testing import structured_covariances

TYPES = list(COVARIANCE_TYPES)
MEANS = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 8.0, -2.0]]) + 100.0
WEIGHTS = np.array([0.2, 0.3, 0.5])
DENSE = np.array([
    [[1.0, 0.3, 0.1], [0.3, 2.0, -0.4], [0.1, -0.4, 0.5]],
    [[0.6, -0.2, 0.0], [-0.2, 1.5, 0.5], [0.0, 0.5, 2.5]],
    [[3.0, 0.8, 0.4], [0.8, 1.0, 0.1], [0.4, 0.1, 0.8]],
])
KS_MIN_P = 1e-3


def model(covariance_type, means=MEANS, weights=WEIGHTS, dense=DENSE):
    family = Gaussian(covariance_type=covariance_type)
    params = family.make_params(weights, means, structured_covariances(dense, covariance_type))
    k, d = params["means"].shape
    return family, params, family.covariance.dense(params["covariances"], k, d)


def radii_sq(x, labels, means, dense):
    """Squared Mahalanobis distance of each row to its own component (numpy.linalg)."""
    diff = x - means[labels]
    sol = np.stack([np.linalg.solve(dense[j], diff[i]) for i, j in enumerate(labels)])
    return np.sum(diff * sol, axis=1)


def band_cdf(d, a2, b2):
    """CDF of R^2 ~ chi^2_d restricted to [a2, b2], from whichever side keeps digits."""
    s = d / 2
    if gammainc(s, a2 / 2) < 0.5:
        fa, fb = gammainc(s, a2 / 2), gammainc(s, b2 / 2)
        return lambda r: (gammainc(s, r / 2) - fa) / (fb - fa)
    qa, qb = gammaincc(s, a2 / 2), gammaincc(s, b2 / 2)
    return lambda r: (qa - gammaincc(s, r / 2)) / (qa - qb)


# -- plain sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
def test_plain_matches_params(covariance_type):
    """Weights, means and covariances of 30000 draws within 5 standard errors."""
    family, params, dense = model(covariance_type)
    n = 30_000
    x, labels = family.sample(params, n, np.random.default_rng(1))
    assert x.shape == (n, 3) and x.dtype == np.float64 and labels.shape == (n,)
    assert np.all(np.diff(labels) >= 0)
    counts = np.bincount(labels, minlength=3)
    assert np.all(np.abs(counts / n - WEIGHTS) <= 5 * np.sqrt(WEIGHTS * (1 - WEIGHTS) / n))
    for j in range(3):
        xj = x[labels == j]
        var = np.diag(dense[j])
        assert np.all(np.abs(xj.mean(0) - MEANS[j]) <= 5 * np.sqrt(var / len(xj)))
        se = np.sqrt((var[:, None] * var[None, :] + dense[j] ** 2) / len(xj))
        assert np.all(np.abs(np.cov(xj.T, bias=True) - dense[j]) <= 5 * se)
    # Mahalanobis radii of plain draws are chi^2_3.
    assert stats.kstest(radii_sq(x, labels, MEANS, dense), stats.chi2(3).cdf).pvalue > KS_MIN_P


def test_deterministic():
    family, params, _ = model("full")
    for kw in ({}, {"confidence": 0.9}, {"std_range": (1.0, 2.0)}, {"component": [0, 2]}):
        a = family.sample(params, 40, np.random.default_rng(3), **kw)
        b = family.sample(params, 40, np.random.default_rng(3), **kw)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


# -- confidence regions and bands, every covariance type ------------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("confidence", [0.3, 0.95])
def test_confidence_region(covariance_type, confidence):
    family, params, dense = model(covariance_type)
    x, labels = family.sample(params, 4000, np.random.default_rng(2), confidence=confidence)
    r2 = radii_sq(x, labels, MEANS, dense)
    bound = stats.chi2(3).ppf(confidence)
    assert np.all(r2 <= bound * (1 + 1e-12))
    cdf = lambda r: stats.chi2(3).cdf(r) / confidence
    assert stats.kstest(r2, cdf).pvalue > KS_MIN_P
    # Each component keeps its own mean: the region is symmetric about it.
    for j in range(3):
        xj = x[labels == j]
        sd = np.sqrt(np.diag(dense[j]) / len(xj))
        assert np.all(np.abs(xj.mean(0) - MEANS[j]) <= 5 * sd)


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("band", [(0.0, 1.0), (1.0, 2.0), (2.5, np.inf), (4.0, 4.5)])
def test_std_range_band(covariance_type, band):
    family, params, dense = model(covariance_type)
    x, labels = family.sample(params, 3000, np.random.default_rng(4), std_range=band)
    r2 = radii_sq(x, labels, MEANS, dense)
    a2, b2 = band[0] ** 2, band[1] ** 2
    tol = 1e-10 * max(b2 if np.isfinite(b2) else a2, 1.0)
    assert np.all(r2 >= a2 - tol) and np.all(r2 <= b2 + tol)
    assert stats.kstest(r2, band_cdf(3, a2, b2)).pvalue > KS_MIN_P


# -- far tails -------------------------------------------------------------------------------------


def unit_model(d, covariance_type="full"):
    """One component in d dimensions with a random SPD covariance (or its structured form)."""
    rng = np.random.default_rng(d)
    a = rng.standard_normal((d, d))
    dense = (a @ a.T / d + np.eye(d))[None]
    return model(covariance_type, means=rng.standard_normal((1, d)), weights=np.ones(1),
                 dense=dense)


@pytest.mark.parametrize("covariance_type", ["full", "diag", "tied_spherical"])
def test_far_lower_tail_d50(covariance_type):
    """D = 50, R <= 1: a region of mass 1.2e-33, sampled exactly by the inverse CDF."""
    family, params, dense = unit_model(50, covariance_type)
    assert gammainc(25, 0.5) < 1e-32
    x, labels = family.sample(params, 2000, np.random.default_rng(5), std_range=(0.0, 1.0))
    r2 = radii_sq(x, labels, params["means"], dense)
    assert np.all(r2 <= 1 + 1e-10) and np.all(r2 >= 0)
    assert stats.kstest(r2, band_cdf(50, 0.0, 1.0)).pvalue > KS_MIN_P


def exp_band_cdf(a2, b2):
    """D = 2: R^2 / 2 is Exp(1), so the band's CDF is closed-form (no underflow)."""
    return lambda r: np.expm1(-(r - a2) / 2) / np.expm1(-(b2 - a2) / 2)


@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_far_upper_tail_d2(covariance_type):
    """D = 2, 40 <= R <= 41: Q(1, 800) = e^-800 underflows; all radii in the band, right law."""
    family, params, dense = unit_model(2, covariance_type)
    assert gammaincc(1.0, 800.0) == 0.0  # why the log-space inversion is needed
    x, labels = family.sample(params, 3000, np.random.default_rng(6), std_range=(40.0, 41.0))
    r = np.sqrt(radii_sq(x, labels, params["means"], dense))
    assert np.all(r >= 40 * (1 - 1e-12)) and np.all(r <= 41 * (1 + 1e-12))
    assert stats.kstest(r**2, exp_band_cdf(1600.0, 1681.0)).pvalue > KS_MIN_P


def test_far_upper_tail_radius_exact():
    """The radius law alone, where rounding would show: D = 2 and D = 1 (closed forms)."""
    u = np.random.default_rng(7).random(20_000)
    r2 = sampling._radius_sq(2, u, 1600.0, 1681.0)
    assert np.all((r2 >= 1600) & (r2 <= 1681))
    assert stats.kstest(r2, exp_band_cdf(1600.0, 1681.0)).pvalue > KS_MIN_P
    # Q(1/2, x) = erfc(sqrt(x)) = 2 Phi(-sqrt(2x)): log Q from log_ndtr, no underflow.
    log_q = lambda r2: np.log(2) + log_ndtr(-np.sqrt(r2))
    r2 = sampling._radius_sq(1, u, 1600.0, np.inf)
    assert np.all(r2 >= 1600) and np.all(np.isfinite(r2))
    assert stats.kstest(r2, lambda r: -np.expm1(log_q(r) - log_q(1600.0))).pvalue > KS_MIN_P
    # Inverse CDF of the same uniforms: quantiles agree with the closed form to ~1e-12.
    expected = 1600.0 - 2 * np.log1p(-u * -np.expm1(-40.5))
    np.testing.assert_allclose(sampling._radius_sq(2, u, 1600.0, 1681.0), expected, rtol=1e-12)


def test_log_space_inversion_matches_scipy(monkeypatch):
    """Forcing the log-space Newton paths where SciPy is still exact gives the same radii."""
    u = np.random.default_rng(8).random(2000)
    cases = [(50, 0.0, 1.0), (50, 0.25, 1.0), (3, 25.0, 36.0), (7, 64.0, np.inf)]
    direct = [sampling._radius_sq(d, u, lo, hi) for d, lo, hi in cases]
    monkeypatch.setattr(sampling, "_LOG_SPACE_BELOW", 1.0)
    for (d, lo, hi), ref in zip(cases, direct, strict=True):
        np.testing.assert_allclose(sampling._radius_sq(d, u, lo, hi), ref, rtol=1e-11)


def test_far_lower_tail_underflow():
    """D = 1000, R <= 1: P(500, 0.5) underflows (about 1e-1284); radii stay in the band and
    follow P(r^2/2) / P(1/2) ~ (r^2)^500 e^{-(r^2-1)/2}: r^1000 is nearly uniform."""
    u = np.random.default_rng(9).random(5000)
    r2 = sampling._radius_sq(1000, u, 0.0, 1.0)
    assert gammainc(500, 0.5) == 0.0
    assert np.all((r2 > 0) & (r2 <= 1))
    # log CDF = 500 log r2 - (r2 - 1)/2 + log(S(r2/2)/S(1/2)), S = 1 + x/501 + ...: to 1e-6.
    cdf = lambda r: np.exp(500 * np.log(r) - (r - 1) / 2
                           + np.log1p(r / 2 / 501) - np.log1p(0.5 / 501))
    assert stats.kstest(r2, cdf).pvalue > KS_MIN_P


# -- directions and components ---------------------------------------------------------------------


def test_directions_uniform():
    """v = g/|g| has unit norm, mean ~ 0 and second moment I/D."""
    d, n = 5, 40_000
    v = sampling._directions(np.random.default_rng(10), n, d)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=0, atol=4e-16)
    assert np.all(np.abs(v.mean(0)) <= 5 * np.sqrt(1 / d / n))
    second = v.T @ v / n
    assert np.all(np.abs(second - np.eye(d) / d) <= 5 * np.sqrt(2 / d**2 / n))
    # Radial draws whitened back: directions of x - mu under L^{-1} are uniform too.
    family, params, dense = model("full")
    x, _ = family.sample(params, 6000, np.random.default_rng(11), confidence=0.5,
                              component=2)
    w = np.linalg.solve(np.linalg.cholesky(dense[2]), (x - MEANS[2]).T).T
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    assert np.all(np.abs(w.mean(0)) <= 5 * np.sqrt(1 / 3 / 6000))


@pytest.mark.parametrize("covariance_type", TYPES)
def test_component_int(covariance_type):
    family, params, dense = model(covariance_type)
    x, labels = family.sample(params, 5000, np.random.default_rng(12), component=1)
    assert np.all(labels == 1)
    assert np.all(np.abs(x.mean(0) - MEANS[1]) <= 5 * np.sqrt(np.diag(dense[1]) / 5000))
    x, labels = family.sample(params, 3000, np.random.default_rng(13), component=np.int64(0),
                              std_range=(1.0, 1.5))
    assert np.all(labels == 0)
    r = np.sqrt(radii_sq(x, labels, MEANS, dense))
    assert np.all((r >= 1 - 1e-12) & (r <= 1.5 + 1e-12))


def test_component_list():
    """Draw among components 0 and 2 in proportion 0.2 : 0.5, grouped in the given order."""
    family, params, _ = model("diag")
    n = 20_000
    x, labels = family.sample(params, n, np.random.default_rng(14), component=[2, 0])
    assert set(np.unique(labels)) == {0, 2}
    assert np.all(labels[: np.sum(labels == 2)] == 2)
    frac = np.mean(labels == 0)
    assert abs(frac - 2 / 7) <= 5 * np.sqrt(2 / 7 * 5 / 7 / n)
    assert np.allclose(x[labels == 0].mean(0), MEANS[0], atol=0.05)


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"n_samples": 0}, r"'n_samples': 0\. The sampling requires at least one sample"),
    ({"n_samples": 2.5}, r"'n_samples': 2\.5"),
    ({"component": 3}, r"'component': 3\. It must be None, an int in \[0, 3\)"),
    ({"component": -1}, r"'component': -1"),
    ({"component": [0, 0]}, r"'component': \[0, 0\].*distinct"),
    ({"component": []}, r"'component': \[\]"),
    ({"component": True}, r"'component': True"),
    ({"confidence": 1.0},
     r"'confidence': 1\.0\. It must be None or a float in the open interval \(0, 1\)"),
    ({"confidence": 0.0}, r"'confidence': 0\.0"),
    ({"confidence": float("nan")}, r"'confidence': nan"),
    ({"std_range": (2.0, 1.0)}, r"'std_range': \(2\.0, 1\.0\)\. .*0 <= a < b"),
    ({"std_range": (1.0, 1.0)}, r"'std_range': \(1\.0, 1\.0\)"),
    ({"std_range": (-1.0, 1.0)}, r"'std_range': \(-1\.0, 1\.0\)"),
    ({"std_range": (float("nan"), 1.0)}, r"'std_range': \(nan, 1\.0\)"),
    ({"std_range": (0.0, float("nan"))}, r"'std_range': \(0\.0, nan\)"),
    ({"std_range": 1.0}, r"'std_range': 1\.0"),
    ({"confidence": 0.5, "std_range": (0.0, 1.0)},
     r"'confidence' \(0\.5\) and 'std_range'.*at most one"),
])
def test_invalid(kwargs, match):
    _, params, _ = model("full")
    kwargs = {"n_samples": 10, **kwargs}
    n = kwargs.pop("n_samples")
    with pytest.raises(InvalidParameterError, match=match):
        sample_mixture(get_covariance("full"), params, n, np.random.default_rng(0), **kwargs)
