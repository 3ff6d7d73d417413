"""The skew-normal mixture family in numbers.

* Log-densities: the restricted form against ``scipy.stats.skewnorm`` (1-D, far tails
  included) and the direct formula ``2 phi_D(y; mu, Sigma) Phi(lambda^T Sigma^{-1/2} (y -
  mu))``; the unrestricted form against ``2^D phi_D(y; xi, Omega) Phi_D(q; 0, Theta)`` with
  ``scipy.stats.multivariate_normal.cdf``; both forms agree in 1-D and integrate to 1 on a 2-D
  grid.
* The latent moments: the scalar truncated normal against exact inverse-CDF sampling down to
  ``a = -1000``; the multivariate ones (exact for D = 2, the lattice rule for D = 3) against
  importance sampling (GHK) with far-tail rows; bivariate orthants against ``scipy.integrate``
  quadrature; the lattice against ``multivariate_normal.cdf``.
* EM: monotone (1e-10 relative), parameter recovery, the zero-skewness start, annealing, the
  conformance suite of :mod:`dmix.testing` for both forms.
* Sampling by the stochastic representation, and the errors.
"""

import math
import pickle
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.special
import scipy.stats
from scipy.special import logsumexp

from dmix.errors import DataError, IllConditionedError, InvalidParameterError
from dmix.families import _truncated
from dmix.families._skew_ecm import ecm_update
from dmix.families.gaussian import Gaussian
from dmix.families.skew_normal import MAX_UNRESTRICTED_FEATURES, SkewNormal
from dmix.testing import FamilyTests, assert_stats_allclose, combine_all

RESTRICTED = SkewNormal()
UNRESTRICTED = SkewNormal(form="unrestricted")


def true_params(family, d, k, seed=0, spread=4.0):
    """Parameters with correlated scales and clearly non-zero skewness."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(k, d)) + 3.0
    mix = rng.normal(scale=0.3, size=(k, d, d)) + np.eye(d)
    cov = mix @ np.swapaxes(mix, 1, 2)
    skew = rng.choice([-1.0, 1.0], size=(k, d)) * rng.uniform(1.0, 3.0, size=(k, d))
    weights = rng.uniform(0.5, 1.0, size=k)
    return family.make_params(weights / weights.sum(), means, cov, skew)


def run_em(family, params, x, n_iter):
    """``n_iter`` EM iterations by hand; returns the parameters and the mean log-likelihoods
    of the parameters entering each iteration."""
    bounds, state = [], {}
    for _ in range(n_iter):
        stats = family.estep(params, x, np)
        bounds.append(family.objective(params, stats))
        params, state = family.mstep(params, stats, state)
    return params, np.array(bounds)


# -- log-densities ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [-30.0, -3.0, 0.0, 0.7, 12.0])
def test_restricted_1d_matches_scipy_skewnorm(shape):
    """lambda = a, mu = loc, Sigma = scale^2; rows 20 scales into both tails; and a mixture."""
    x = np.linspace(-30.0, 30.0, 241)[:, None]
    one = RESTRICTED.make_params([1.0], [[1.5]], [[[2.25]]], [[shape]])
    expected = scipy.stats.skewnorm(shape, loc=1.5, scale=1.5).logpdf(x[:, 0])
    np.testing.assert_allclose(RESTRICTED.log_density(one, x, np), expected, rtol=1e-12)
    two = RESTRICTED.make_params([0.3, 0.7], [[1.5], [-2.0]], [[[2.25]], [[0.5]]],
                                 [[shape], [-1.0]])
    parts = [np.log(0.3) + expected,
             np.log(0.7) + scipy.stats.skewnorm(-1.0, loc=-2.0, scale=math.sqrt(0.5)).logpdf(x[:, 0])]
    np.testing.assert_allclose(RESTRICTED.log_density(two, x, np), logsumexp(parts, axis=0),
                               rtol=1e-12)


def test_restricted_matches_direct_formula():
    """2 phi_D(y; mu, Sigma) Phi(lambda^T Sigma^{-1/2} (y - mu)), Sigma^{-1/2} by sqrtm."""
    params = true_params(RESTRICTED, 3, 2)
    x, _ = RESTRICTED.sample(params, 200, np.random.default_rng(0))
    x = np.vstack([x, params["means"][0] + 6 * np.eye(3), params["means"][0] - 6 * np.eye(3)])
    parts = []
    for k in range(2):
        mu, cov, lam = (params[key][k] for key in ("means", "covariances", "shapes"))
        isqrt = np.linalg.inv(np.real(scipy.linalg.sqrtm(cov)))
        parts.append(np.log(params["weights"][k]) + math.log(2.0)
                     + scipy.stats.multivariate_normal(mu, cov).logpdf(x)
                     + scipy.special.log_ndtr((x - mu) @ isqrt @ lam))
    np.testing.assert_allclose(RESTRICTED.log_density(params, x, np),
                               logsumexp(parts, axis=0), rtol=1e-11)


@pytest.mark.parametrize("d", [2, 3])
def test_unrestricted_matches_direct_formula(d):
    """2^D phi_D(y; xi, Omega) Phi_D(q; 0, Theta): Phi_2 from scipy's multivariate normal CDF
    (exact at D = 2; agreement 1e-12), Phi_3 by nested quadrature over the exact bivariate
    orthant (the lattice rule agrees to 3e-9; scipy's Genz integration at abseps 1e-11 is
    itself off by 7e-7 there)."""
    params = true_params(UNRESTRICTED, d, 1)
    x, _ = UNRESTRICTED.sample(params, 12, np.random.default_rng(0))
    xi, cov, delta = params["means"][0], params["covariances"][0], params["skewness"][0]
    omega = cov + np.diag(delta**2)
    gain = np.diag(delta) @ np.linalg.inv(omega)
    theta = np.eye(d) - gain @ np.diag(delta)
    q = (x - xi) @ gain.T
    if d == 2:
        mvn = scipy.stats.multivariate_normal(np.zeros(d), theta)
        log_cdf, tol = np.log([mvn.cdf(row) for row in q]), 1e-10
    else:
        log_cdf, tol = np.array([nested_phi3(row, theta) for row in q]), 1e-8
    expected = d * math.log(2.0) + scipy.stats.multivariate_normal(xi, omega).logpdf(x) + log_cdf
    np.testing.assert_allclose(UNRESTRICTED.log_density(params, x, np), expected, rtol=0,
                               atol=tol)


def test_forms_agree_in_one_dimension():
    """SDB in 1-D is Azzalini's: Sigma_r = Sigma_u + delta^2, lambda = delta / sqrt(Sigma_u)."""
    x = np.linspace(-25.0, 25.0, 101)[:, None]
    cov_u, delta = np.array([[[0.8]], [[2.0]]]), np.array([[2.5], [-0.4]])
    unr = UNRESTRICTED.make_params([0.4, 0.6], [[0.0], [3.0]], cov_u, delta)
    res = RESTRICTED.make_params([0.4, 0.6], [[0.0], [3.0]], cov_u + delta[:, :, None] ** 2,
                                 delta / np.sqrt(cov_u[:, :, 0]))
    np.testing.assert_allclose(UNRESTRICTED.log_density(unr, x, np),
                               RESTRICTED.log_density(res, x, np), rtol=1e-12)


@pytest.mark.parametrize("family", [RESTRICTED, UNRESTRICTED], ids=["restricted", "unrestricted"])
def test_density_integrates_to_one(family):
    """A two-component 2-D mixture on a 401 x 401 grid over [-20, 20]^2: the rectangle rule is
    spectrally accurate for a smooth density whose tails are inside the grid."""
    params = family.make_params([0.35, 0.65], [[0.0, 0.0], [1.5, -1.0]],
                                [[[1.0, 0.5], [0.5, 1.0]], [[0.5, -0.2], [-0.2, 0.8]]],
                                [[2.0, -1.0], [-1.5, 1.0]])
    grid = np.linspace(-20.0, 20.0, 401)
    step = grid[1] - grid[0]
    xx = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    total = np.sum(np.exp(family.log_density(params, xx, np))) * step * step
    assert abs(total - 1.0) < 1e-9, total


# -- the latent moments ------------------------------------------------------------------------


def truncated_normal_draws(a, n, rng):
    """Exact draws of T ~ N(a, 1) | T > 0 by the inverse CDF in log space."""
    u = rng.uniform(size=n)
    return a - scipy.special.ndtri_exp(np.log(u) + scipy.special.log_ndtr(a))


@pytest.mark.parametrize("a", [3.0, 0.5, -1.0, -3.9, -4.1, -10.0, -40.0, -1000.0])
def test_truncated_normal_moments_vs_exact_sampling(a):
    """E[T], E[T^2] within 5 standard errors of 400000 exact draws, far tails included."""
    t = truncated_normal_draws(a, 400_000, np.random.default_rng(0))
    log_cdf, e1, e2 = _truncated.truncated_normal_moments(np.array([a]), np)
    assert log_cdf[0] == scipy.special.log_ndtr(a)
    for value, draws in ((e1[0], t), (e2[0], t * t)):
        se = draws.std() / math.sqrt(draws.size)
        assert abs(value - draws.mean()) < 5 * se, (value, draws.mean(), se)


def test_truncated_normal_branches_meet():
    """The direct formula and the continued fraction agree where they hand over (a = -4)."""
    a = -_truncated.CF_FROM + np.array([-1e-12, 1e-12])
    _, e1, e2 = _truncated.truncated_normal_moments(a, np)
    assert abs(e1[0] / e1[1] - 1) < 1e-12 and abs(e2[0] / e2[1] - 1) < 1e-12


def ghk(q, theta, n, rng):
    """Importance sampling of tau ~ N(q, Theta) | tau > 0 by sequential conditioning (the GHK
    simulator, independent random draws): draws (n, D) and log-weights (n,)."""
    d = len(q)
    chol = np.linalg.cholesky(theta)
    w, log_weight = np.empty((n, d)), np.zeros(n)
    for i in range(d):
        lower = (-q[i] - w[:, :i] @ chol[i, :i]) / chol[i, i]  # w_i > lower
        log_p = scipy.special.log_ndtr(-lower)
        w[:, i] = -scipy.special.ndtri_exp(np.log(rng.uniform(size=n)) + log_p)
        log_weight += log_p
    return q + w @ chol.T, log_weight


@pytest.mark.parametrize("d", [2, 3])
def test_latent_moments_vs_importance_sampling(d):
    """alpha, E[tau] and E[tau tau^T] of 5 rows, two of them far in the tail (alpha down to
    e^-400), within 5 standard errors of 300000 GHK draws (ratio estimator, delta-method
    errors)."""
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d))
    theta = a @ a.T / d + 0.3 * np.eye(d)
    qs = np.array([rng.normal(size=d), np.linspace(-3.0, 1.0, d), -2.0 * np.ones(d),
                   -8.0 * np.ones(d), np.linspace(-20.0, -5.0, d)])
    log_alpha, t1, t2 = _truncated.tallis_moments(qs, theta)
    for i, q in enumerate(qs):
        tau, log_w = ghk(q, theta, 300_000, rng)
        w = np.exp(log_w - log_w.max())
        w_sum = w.sum()
        mc_log_alpha = log_w.max() + math.log(w.mean())
        mc_se = w.std() / (w.mean() * math.sqrt(w.size))  # 0 where the weights are all equal
        assert abs(log_alpha[i] - mc_log_alpha) < 5 * mc_se + 1e-12 * abs(mc_log_alpha)
        for value, g in ((t1[i], tau), (t2[i].reshape(-1), (tau[:, :, None] * tau[:, None, :])
                                                             .reshape(len(tau), -1))):
            est = w @ g / w_sum
            se = np.sqrt(np.sum((w[:, None] * (g - est)) ** 2, axis=0)) / w_sum
            assert np.all(np.abs(value - est) < 5 * se + 1e-12), (i, value, est, se)


def bvn_reference(h, k, rho):
    """log Phi_2(h, k; rho) by adaptive quadrature of int_{-inf}^{min} phi(x) Phi(...) dx,
    scaled by its largest value so that tails far below 1e-300 integrate too."""
    h, k = min(h, k), max(h, k)
    s = math.sqrt(1.0 - rho * rho)

    def log_f(x):
        return scipy.stats.norm.logpdf(x) + scipy.special.log_ndtr((k - rho * x) / s)

    xs = np.linspace(h - 60.0, h, 200_001)
    top = np.max(log_f(xs))
    mode = float(xs[np.argmax(log_f(xs))])
    near = [h - 10.0**-j for j in range(1, 8)]  # resolves a spike at the end point
    points = sorted({*near, *(p for p in (mode, k / rho if rho else h) if h - 60 < p < h)})
    with warnings.catch_warnings():  # the extreme case reports roundoff; checked relatively
        warnings.simplefilter("ignore", scipy.integrate.IntegrationWarning)
        value, _ = scipy.integrate.quad(lambda x: math.exp(log_f(x) - top), h - 60.0, h,
                                        points=points, epsabs=0.0, epsrel=1e-13, limit=1000)
    return top + math.log(value)


BVN_CASES = [(0.3, -0.2, 0.5), (0.0, 1.0, 0.5), (1.0, 0.0, -0.3), (0.0, 0.0, 0.4),
             (1.58, 1.4, -0.9989), (2.0, 1.0, -0.99), (5.0, 5.0, 0.3), (-1.0, -1.0, -0.99),
             (-10.0, 5.0, -0.9), (-30.0, -30.0, 0.9), (-30.0, -25.0, -0.5),
             (-5.0, -3.0, 0.999), (-19.0, -13.6, -0.999)]


@pytest.mark.parametrize("h, k, rho", BVN_CASES)
def test_bivariate_orthant_vs_quadrature(h, k, rho):
    """Owen's T above 1e-3, the exp-sinh rule below: the error of log P is below 1e-10 (times
    |log P| when that is large; measured 3e-11 at worst)."""
    got = _truncated.log_mvn_cdf(np.array([[[h, k]]]), np.array([[[1.0, rho], [rho, 1.0]]]))
    expected = bvn_reference(h, k, rho)
    assert abs(got[0, 0] - expected) < 1e-10 * max(1.0, abs(expected))


def nested_phi3(b, cov):
    """log Phi_3(b; cov) = log int phi(x) Phi_2(b' - c x; cond) dx by adaptive quadrature over
    the exact bivariate orthant (itself checked above)."""
    s0 = math.sqrt(cov[0, 0])
    c = cov[1:, 0] / s0
    cond = cov[1:, 1:] - np.outer(c, c)

    def g(x):
        lim = (b[1:] - c * x)[None, None]
        return math.exp(-0.5 * x * x + _truncated.log_mvn_cdf(lim, cond[None])[0, 0])

    value, _ = scipy.integrate.quad(g, -40.0, b[0] / s0, epsabs=0.0, epsrel=1e-12, limit=200)
    return math.log(value / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("m", [3, 4])
def test_lattice_orthant_accuracy(m):
    """log Phi_m of the lattice rule: against nested quadrature for m = 3 (measured 5e-9), and
    against scipy's Genz integration at 1e-7 for m = 4 (measured 2e-5 at worst)."""
    rng = np.random.default_rng(m)
    a = rng.normal(size=(m, m))
    cov = a @ a.T / m + 0.3 * np.eye(m)
    qs = rng.normal(size=(6 if m == 3 else 3, m)) + 0.5
    got, _, _ = _truncated.lattice_moments(qs, cov)
    if m == 3:
        expected, tol = [nested_phi3(q, cov) for q in qs], 2e-8
    else:
        mvn = scipy.stats.multivariate_normal(np.zeros(m), cov, abseps=1e-7, releps=1e-7,
                                              maxpts=10_000_000)
        expected, tol = np.log([mvn.cdf(q) for q in qs]), 5e-5
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


def test_korobov_table_is_the_search_result():
    """The generators in the table minimise the P_2 criterion (the search repeated)."""
    for dim in (2, 3, 4):
        best = min(range(2, _truncated.LATTICE_POINTS // 2),
                   key=lambda a: _truncated.korobov_criterion(a, dim))
        assert _truncated.KOROBOV[dim] == best


# -- EM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, d, tol", [(RESTRICTED, 3, 1e-10), (UNRESTRICTED, 2, 1e-10),
                                            (UNRESTRICTED, 3, 1e-8)],
                         ids=["restricted", "unrestricted-2d", "unrestricted-3d"])
def test_em_never_decreases_the_likelihood(family, d, tol):
    """ECM with reg_covar = 0 from skewed, misplaced parameters: no decrease beyond ``tol``
    relative. The exact E-steps (restricted, unrestricted D = 2) meet 1e-10; the lattice rule
    (D = 3) is a fixed approximation, whose ascent was measured to 1e-8."""
    family = SkewNormal(form=family.form, reg_covar=0.0)
    truth = true_params(family, d, 2, spread=2.0)
    x, _ = family.sample(truth, 300 if d == 3 else 600, np.random.default_rng(3))
    start = family.make_params([0.5, 0.5], truth["means"][::-1] + 0.5,
                               truth["covariances"] * 2.0, -0.5 * truth[family.skew_key])
    _, bounds = run_em(family, start, x, 12 if d == 3 else 40)
    drops = bounds[:-1] - bounds[1:]
    assert np.all(drops <= tol * np.abs(bounds[:-1])), drops.max()
    assert bounds[-1] > bounds[0] + 0.05


@pytest.mark.parametrize("family, n_iter", [(RESTRICTED, 200), (UNRESTRICTED, 60)],
                         ids=["restricted", "unrestricted"])
def test_parameter_recovery(family, n_iter):
    """Two well-separated 2-D components, EM by hand from the Gaussian fit of the true labels
    (zero skewness): the fit explains the sample at least as well as the truth, and each
    component's weight, mean and covariance (sampling errors about 0.03 here) are those of the
    truth within about 3 standard errors (means: sd / sqrt(n_k) = 0.05; variances: 4% of
    themselves). Location and skewness separately are weakly identified (the unrestricted fit
    trades 0.27 of location for 0.36 of delta on this sample), so they get looser bounds."""
    truth = family.make_params([0.4, 0.6], [[0.0, 0.0], [8.0, 4.0]],
                               [[[1.0, 0.3], [0.3, 0.6]], [[0.8, -0.2], [-0.2, 1.2]]],
                               [[3.0, -2.0], [-2.5, 1.5]])
    x, labels = family.sample(truth, 4000 if family.form == "restricted" else 2000,
                              np.random.default_rng(11))
    gauss = [(np.mean(labels == j), x[labels == j].mean(0), np.cov(x[labels == j].T))
             for j in range(2)]
    start = family.params_from_gaussian(*(np.array(v) for v in zip(*gauss)))
    fit, bounds = run_em(family, start, x, n_iter)
    assert bounds[-1] >= family.objective(truth, family.estep(truth, x, np))
    assert bounds[-1] - bounds[-2] < 1e-5  # (nearly) converged

    def moments(p):
        b = math.sqrt(2 / math.pi)
        s = p[family.skew_key]
        if family.form == "restricted":
            vals, vecs = np.linalg.eigh(p["covariances"])
            delta = s / np.sqrt(1 + np.sum(s * s, axis=1, keepdims=True))
            loading = np.einsum("kij,kj->ki", (vecs * np.sqrt(vals)[:, None]) @ np.swapaxes(
                vecs, 1, 2), delta)
            outer = loading[:, :, None] * loading[:, None, :]
            return p["means"] + b * loading, p["covariances"] - b * b * outer
        return (p["means"] + b * s,
                p["covariances"] + (1 - b * b) * s[:, :, None] * np.eye(2) * s[:, None, :])

    np.testing.assert_allclose(fit["weights"], truth["weights"], atol=0.02)
    (mean, covariance), (true_mean, true_covariance) = moments(fit), moments(truth)
    np.testing.assert_allclose(mean, true_mean, atol=0.15)
    np.testing.assert_allclose(covariance, true_covariance, rtol=0.12, atol=0.05)
    np.testing.assert_allclose(fit["means"], truth["means"], atol=0.3)
    np.testing.assert_allclose(fit["covariances"], truth["covariances"], atol=0.3)


def test_zero_skewness_start_escapes():
    """Zero skewness is a fixed point of ECM (A = 0 for every row); the M-step starts such
    components from the third moments, with the sign of the data's skewness."""
    truth = RESTRICTED.make_params([1.0], [[0.0, 0.0]], [np.eye(2)], [[5.0, -5.0]])
    x, _ = RESTRICTED.sample(truth, 3000, np.random.default_rng(0))
    start = RESTRICTED.params_from_gaussian([1.0], [x.mean(0)], [np.cov(x.T)])
    new, _ = RESTRICTED.mstep(start, RESTRICTED.estep(start, x, np), {})
    assert np.all(np.sign(new["shapes"]) == [[1.0, -1.0]]), new["shapes"]
    # without the escape, the ECM update keeps zero skewness exactly: A is 0 for every row
    stats = RESTRICTED.estep(start, x, np)
    _, _, skew, _ = ecm_update(True, start, stats, 1e-6)
    np.testing.assert_allclose(skew, 0.0, atol=1e-12)


def test_annealing_like_gaussian():
    """Tempered responsibilities softmax(nu l) with the untempered loglik; while tempered the
    scales are annealing_start * C + reg for every component and the skewness is kept; the
    schedule is the Gaussian family's."""
    params = true_params(RESTRICTED, 2, 3, spread=2.0)
    x, _ = RESTRICTED.sample(params, 500, np.random.default_rng(0))
    hot = SkewNormal(inverse_temperature=0.3, annealing_start=0.2, annealing_iter=10)
    cold = SkewNormal()
    stats_hot, stats_cold = hot.estep(params, x, np), cold.estep(params, x, np)
    assert stats_hot["loglik"] == stats_cold["loglik"]
    wlp = np.log(RESTRICTED.predict_proba(params, x, np)) + RESTRICTED.log_density(
        params, x, np)[:, None]  # l_ik up to a per-row constant
    resp = np.exp(0.3 * wlp - logsumexp(0.3 * wlp, axis=1, keepdims=True))
    np.testing.assert_allclose(stats_hot["nk"], resp.sum(0), rtol=1e-10)
    new, _ = hot.mstep(params, stats_hot, {})
    c = np.cov(x.T, bias=True)
    for cov in new["covariances"]:
        np.testing.assert_allclose(cov, 0.2 * c + 1e-6 * np.eye(2), rtol=1e-10)
    np.testing.assert_array_equal(new["shapes"], params["shapes"])
    gauss = Gaussian(annealing_start=0.2, annealing_iter=10)
    for t in (0, 3, 10, 12):
        assert hot.for_iteration(t).inverse_temperature == gauss.for_iteration(t).inverse_temperature
    assert hot.tempered and not hot.for_iteration(10).tempered


def test_annealing_reaches_a_better_fit():
    """Three skewed clusters, one random start (docs/bench/skew_annealing.md has 20): plain EM
    ends 0.02 below the annealed fit, which beats the true parameters' log-likelihood."""
    truth = RESTRICTED.make_params([0.3, 0.3, 0.4], [[0, 0], [3.5, 0.5], [1.0, 3.5]],
                                   [np.eye(2), [[1, 0.5], [0.5, 1]], [[1.0, -0.3], [-0.3, 0.7]]],
                                   [[4, 1], [-3, 3], [2, -4]])
    x, _ = RESTRICTED.sample(truth, 1500, np.random.default_rng(0))
    rows = x[np.random.default_rng(101).choice(len(x), 3, replace=False)]
    start = RESTRICTED.params_from_gaussian(np.full(3, 1 / 3), rows, [np.cov(x.T)] * 3)

    def fit(family):
        params, state = start, {}
        for t in range(150):
            step = family.for_iteration(t)
            params, state = step.mstep(params, step.estep(params, x, np), state)
        return RESTRICTED.objective(params, RESTRICTED.estep(params, x, np))

    annealed = fit(SkewNormal(annealing_start=0.5, annealing_iter=40))
    assert annealed > fit(RESTRICTED) + 0.01
    assert annealed > RESTRICTED.objective(truth, RESTRICTED.estep(truth, x, np))


# -- sampling and counting ------------------------------------------------------------------------


@pytest.mark.parametrize("family", [RESTRICTED, UNRESTRICTED], ids=["restricted", "unrestricted"])
def test_sample_moments(family):
    """Mean and covariance of 200000 draws of one component against the representation's:
    restricted ``mu + b Delta``, ``Sigma - b^2 Delta Delta^T``; unrestricted ``xi + b delta``,
    ``Sigma + (1 - b^2) diag(delta^2)``, ``b = sqrt(2/pi)``; and a 1-D KS test against scipy."""
    params = true_params(family, 3, 1)
    x, labels = family.sample(params, 200_000, np.random.default_rng(0))
    assert np.all(labels == 0)
    b = math.sqrt(2 / math.pi)
    cov, s = params["covariances"][0], params[family.skew_key][0]
    if family.form == "restricted":
        vals, vecs = np.linalg.eigh(cov)
        loading = (vecs * np.sqrt(vals)) @ vecs.T @ (s / math.sqrt(1 + s @ s))
        mean, covariance = params["means"][0] + b * loading, cov - b * b * np.outer(loading, loading)
    else:
        mean, covariance = params["means"][0] + b * s, cov + (1 - b * b) * np.diag(s * s)
    se = np.sqrt(np.diag(covariance) / len(x))
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se)
    np.testing.assert_allclose(np.cov(x.T), covariance, atol=0.03)
    one = RESTRICTED.make_params([1.0], [[1.0]], [[[4.0]]], [[-3.0]])
    y, _ = RESTRICTED.sample(one, 20_000, np.random.default_rng(1))
    assert scipy.stats.kstest(y[:, 0], scipy.stats.skewnorm(-3.0, loc=1.0, scale=2.0).cdf).pvalue > 0.01


def test_n_parameters_and_labels():
    """mixsmsn's count K (2D + D(D+1)/2) + K - 1; labels grouped by component."""
    params = true_params(RESTRICTED, 3, 4)
    assert RESTRICTED.n_parameters(params) == 4 * (6 + 6) + 3
    _, labels = RESTRICTED.sample(params, 100, np.random.default_rng(0))
    assert np.all(np.diff(labels) >= 0) and labels.max() < 4


# -- errors -------------------------------------------------------------------------------------


def test_bad_hyperparameters():
    with pytest.raises(InvalidParameterError, match="'form'.*'sdb'"):
        SkewNormal(form="sdb")
    with pytest.raises(InvalidParameterError, match="'reg_covar'.*-1"):
        SkewNormal(reg_covar=-1.0)
    with pytest.raises(InvalidParameterError, match="'annealing_start'.*1.5"):
        SkewNormal(annealing_start=1.5)
    with pytest.raises(InvalidParameterError, match="'on_collapse'.*'drop'"):
        SkewNormal(on_collapse="drop")


def test_bad_parameters_and_data():
    good = dict(weights=[0.5, 0.5], means=np.zeros((2, 2)), covariances=np.stack([np.eye(2)] * 2))
    with pytest.raises(InvalidParameterError, match=r"shapes must have shape \(2, 2\)"):
        RESTRICTED.make_params(**good, skew=np.zeros(2))
    with pytest.raises(InvalidParameterError, match=r"covariances\[1\] is not symmetric positive"):
        RESTRICTED.make_params(good["weights"], good["means"], [np.eye(2), -np.eye(2)])
    with pytest.raises(InvalidParameterError, match=r"covariances\[0\] is not symmetric positive"):
        RESTRICTED.make_params(good["weights"], good["means"], [[[1, 0.5], [0, 1]], np.eye(2)])
    with pytest.raises(InvalidParameterError, match="weights must be positive and sum to 1"):
        RESTRICTED.make_params([0.5, 0.6], good["means"], good["covariances"])
    with pytest.raises(InvalidParameterError, match="skewness must be finite"):
        UNRESTRICTED.make_params(**good, skew=[[np.nan, 0.0], [0.0, 0.0]])
    d = MAX_UNRESTRICTED_FEATURES + 1
    with pytest.raises(InvalidParameterError, match=f"at most {MAX_UNRESTRICTED_FEATURES} features.*D = {d}"):
        UNRESTRICTED.make_params([1.0], np.zeros((1, d)), [np.eye(d)])
    params = RESTRICTED.make_params(**good)
    with pytest.raises(DataError, match=r"shape \(n_samples, 2\).*\(4, 3\)"):
        RESTRICTED.estep(params, np.zeros((4, 3)), np)
    with pytest.raises(InvalidParameterError, match="'n_samples': 0"):
        RESTRICTED.sample(params, 0, np.random.default_rng(0))


@pytest.mark.parametrize("family, d", [(RESTRICTED, 3), (UNRESTRICTED, 2), (UNRESTRICTED, 3)],
                         ids=["restricted", "unrestricted-2d", "unrestricted-3d"])
def test_nonfinite_rows_are_counted_and_zeroed(family, d):
    """Rows with NaN or inf: counted in n_nonfinite, and the other statistics are those of the
    finite rows (n still counts every row)."""
    params = true_params(family, d, 2)
    x, _ = family.sample(params, 30, np.random.default_rng(0))
    bad = x.copy()
    bad[3, 0], bad[17, -1] = np.nan, np.inf
    keep = np.ones(len(x), dtype=bool)
    keep[[3, 17]] = False
    got, expected = family.estep(params, bad, np), family.estep(params, x[keep], np)
    assert got["n_nonfinite"] == 2 and got["n"] == 30
    for key in expected:
        if key not in ("n", "n_nonfinite"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("form", ["restricted", "unrestricted"])
def test_weighted_rows_equal_repeated_rows(form):
    """weighted=True: a weight column of integers gives the statistics of the rows repeated."""
    family = SkewNormal(form=form, weighted=True)
    params = true_params(family, 2, 2)
    x, _ = family.sample(params, 25, np.random.default_rng(0))
    counts = np.random.default_rng(1).integers(0, 4, size=len(x))
    got = family.estep(params, np.column_stack([x, counts]), np)
    expected = SkewNormal(form=form).estep(params, np.repeat(x, counts, axis=0), np)
    assert got["n"] == counts.sum()
    assert_stats_allclose(got, expected, 1e-12)


def test_lattice_e_step_does_not_depend_on_chunking():
    """The D = 3 unrestricted E-step (the lattice rule, per-row orderings and factors) gives the
    same statistics for the whole block, single rows and uneven pieces."""
    params = true_params(UNRESTRICTED, 3, 2)
    x, _ = UNRESTRICTED.sample(params, 40, np.random.default_rng(0))
    whole = UNRESTRICTED.estep(params, x, np)
    for cuts in ([1, 2, 9, 23], list(range(1, 40))):
        parts = [UNRESTRICTED.estep(params, piece, np) for piece in np.split(x, cuts)]
        assert_stats_allclose(combine_all(UNRESTRICTED, parts), whole, 1e-12)


def test_unrestricted_refuses_other_namespaces():
    """No silent copy to the host: the unrestricted E-step names what it needs."""

    class FakeCupy:
        __name__ = "cupy"

    params = UNRESTRICTED.make_params([1.0], np.zeros((1, 2)), [np.eye(2)])
    with pytest.raises(NotImplementedError, match="NumPy and SciPy only.*cupy"):
        UNRESTRICTED.log_density(params, np.zeros((3, 2)), FakeCupy())


def test_collapse_raises_or_keeps_previous():
    """An empty component: IllConditionedError under 'raise'; its previous parameters and a
    'collapsed' entry in the state under 'reseed'."""
    params = RESTRICTED.make_params([0.5, 0.5], [[0.0, 0.0], [1e3, 1e3]],
                                    np.stack([np.eye(2)] * 2), [[1.0, 0.0], [0.0, 1.0]])
    x, _ = RESTRICTED.sample(RESTRICTED.make_params([1.0], [[0.0, 0.0]], [np.eye(2)]), 200,
                             np.random.default_rng(0))
    stats = RESTRICTED.estep(params, x, np)
    with pytest.raises(IllConditionedError, match="component 1 collapsed"):
        SkewNormal(on_collapse="raise").mstep(params, stats, {})
    new, state = RESTRICTED.mstep(params, stats, {})
    np.testing.assert_array_equal(state["collapsed"], [1])
    np.testing.assert_array_equal(new["means"][1], params["means"][1])
    reseeded = RESTRICTED.reseed(new, state["collapsed"], x[:1])
    np.testing.assert_array_equal(reseeded["means"][1], x[0])
    assert np.all(np.isfinite(reseeded["precisions_cholesky"]))


def test_family_pickles_with_params():
    family = SkewNormal(form="unrestricted", reg_covar=1e-4, annealing_iter=5)
    assert pickle.loads(pickle.dumps(family)) == family


# -- the conformance suite --------------------------------------------------------------------


class TestSkewNormalConformance(FamilyTests):
    """Restricted form, K = 3 in D = 3, 240 rows sampled from known parameters, evaluated at
    misplaced ones."""

    n_features = 3

    @pytest.fixture
    def family(self):
        return SkewNormal(reg_covar=1e-6)

    @pytest.fixture
    def data(self, family):
        x, _ = family.sample(true_params(family, self.n_features, 3), 240,
                             np.random.default_rng(1))
        return x

    @pytest.fixture
    def params(self, family, data):
        true = true_params(family, self.n_features, 3)
        rng = np.random.default_rng(7)
        means = true["means"] + rng.normal(scale=0.5, size=true["means"].shape)
        return family.make_params([0.2, 0.3, 0.5], means, true["covariances"] * 1.5,
                                  0.5 * true[family.skew_key])


class TestSkewNormalUnrestrictedConformance(TestSkewNormalConformance):
    """Unrestricted form, K = 3 in D = 2 (the exact bivariate E-step)."""

    n_features = 2

    @pytest.fixture
    def family(self):
        return SkewNormal(form="unrestricted", reg_covar=1e-6)
