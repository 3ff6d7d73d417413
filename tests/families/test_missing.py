"""EM with missing values (NaN): :mod:`dmix.families.missing`, in numbers, for all six types.

* ``log_density_missing`` equals the mixture of ``scipy.stats.multivariate_normal`` densities of
  the observed coordinates of each row (float64, 1e-10); ``predict_proba_missing`` is its
  normalised terms.
* Without NaN, the three functions equal ``Gaussian.estep`` / ``log_density`` /
  ``predict_proba``.
* The statistics equal a direct row-by-row reference written here (conditional mean and
  covariance from ``numpy.linalg.inv``), including all-NaN and complete rows, through each of
  the full/tied computations (patterns factored once, rows padded, and the mix of both).
* The statistics add over any split of the rows and do not depend on their order.
* EM (``estep_missing`` then ``Gaussian.mstep``) never decreases the observed-data
  log-likelihood.
* From data of a known mixture with 20% of the entries removed at random, EM stays near the
  truth (means within a few standard errors), its covariances are far better than EM on
  mean-imputed data, and its held-out observed-data log-likelihood beats both mean imputation
  and dropping the incomplete rows.
* All-NaN rows: log-density 0, posteriors the weights, statistics those of the model itself;
  rows with an infinite entry are counted in ``n_nonfinite`` and contribute nothing.
"""

import numpy as np
import pytest
import scipy.stats
from scipy.special import logsumexp

from dmix.families import missing as missing_module
from dmix.families.base import tree_add
from dmix.families.covariance import COVARIANCE_TYPES
from dmix.families.gaussian import Gaussian
from dmix.families.missing import estep_missing, log_density_missing, predict_proba_missing
from dmix.testing import assert_rel, stats_max_rel_error, structured_covariances

TYPES = list(COVARIANCE_TYPES)
#: Values of SMALL_PATTERN_ROWS: the library's (rare patterns padded, the others grouped), every
#: pattern factored once (grouped), every row padded. The diagonal types have one path.
PATHS = {"default": missing_module.SMALL_PATTERN_ROWS, "grouped": 0, "padded": 10**9}
# (n_samples, n_features, n_components, offset of the data from the origin)
SHAPES = [(150, 4, 3, 0.0), (60, 1, 2, 0.0), (100, 3, 2, 1e4)]


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Run the test through each of the full/tied computations."""
    monkeypatch.setattr(missing_module, "SMALL_PATTERN_ROWS", PATHS[request.param])
    return request.param


def random_dense(k, d, rng):
    """(K, D, D) SPD matrices with correlations and unequal scales."""
    a = rng.normal(size=(k, d, d))
    scale = rng.uniform(0.5, 2.0, size=(k, d))
    return scale[:, :, None] * (a @ a.transpose(0, 2, 1) / d + np.eye(d)) * scale[:, None, :]


def make_model(covariance_type, k, d, offset, rng, reg_covar=1e-6):
    family = Gaussian(covariance_type, reg_covar=reg_covar)
    weights = rng.dirichlet(np.full(k, 5.0))
    means = offset + 2.0 * rng.normal(size=(k, d))
    cov = structured_covariances(random_dense(k, d, rng), covariance_type)
    return family, family.make_params(weights, means, cov)


def with_missing(x, frac, rng, n_all_nan=0):
    """A copy of ``x`` with a fraction of entries NaN, the first rows complete and the last
    ``n_all_nan`` rows entirely NaN."""
    x = np.array(x, dtype=np.float64)
    mask = rng.random(x.shape) < frac
    mask[:3] = False
    if n_all_nan:
        mask[-n_all_nan:] = True
    x[mask] = np.nan
    return x


def case(covariance_type, shape, seed=0):
    n, d, k, offset = shape
    rng = np.random.default_rng(seed)
    family, params = make_model(covariance_type, k, d, offset, rng)
    x, _ = family.sample(params, n, rng)
    x = x[rng.permutation(n)]
    return family, params, x, with_missing(x, 0.3, rng, n_all_nan=4)


def dense_of(family, params):
    k, d = params["means"].shape
    return family.covariance.dense(params["covariances"], k, d)


def pack(covariance_type, s):
    """``P(S)`` of a symmetric (D, D) matrix, as ``quadratic_features`` packs ``x x^T``."""
    if covariance_type in ("full", "tied"):
        return s[np.triu_indices(s.shape[0])]
    if covariance_type in ("diag", "tied_diag"):
        return np.diag(s).copy()
    return np.array([np.trace(s)])


def reference_stats(family, params, x):
    """The incomplete-data E-step row by row, with explicit inverses (float64)."""
    weights, means = params["weights"], params["means"]
    k, d = means.shape
    sigma = dense_of(family, params)
    c = np.sum(weights[:, None] * means, axis=0)
    m_q = family.covariance.n_quadratic(d)
    nk, s1, s2 = np.zeros(k), np.zeros((k, d)), np.zeros((k, m_q))
    loglik = 0.0
    for row in x:
        o = np.flatnonzero(~np.isnan(row))
        m = np.flatnonzero(np.isnan(row))
        logp = np.zeros(k)
        xhat = np.empty((k, d))
        cond = np.zeros((k, d, d))
        for j in range(k):
            s_oo = sigma[j][np.ix_(o, o)]
            s_mo = sigma[j][np.ix_(m, o)]
            inv = np.linalg.inv(s_oo) if len(o) else np.zeros((0, 0))
            r_o = row[o] - means[j, o]
            if len(o):
                logp[j] = (-0.5 * len(o) * np.log(2 * np.pi)
                           - 0.5 * np.linalg.slogdet(s_oo)[1] - 0.5 * r_o @ inv @ r_o)
            xhat[j, o] = row[o]
            xhat[j, m] = means[j, m] + s_mo @ inv @ r_o
            cond[j][np.ix_(m, m)] = sigma[j][np.ix_(m, m)] - s_mo @ inv @ s_mo.T
        wlp = np.log(weights) + logp
        lse = logsumexp(wlp)
        loglik += lse
        r = np.exp(wlp - lse)
        for j in range(k):
            y = xhat[j] - c
            nk[j] += r[j]
            s1[j] += r[j] * y
            s2[j] += r[j] * pack(family.covariance_type, np.outer(y, y) + cond[j])
    return {"n": float(len(x)), "loglik": loglik, "n_nonfinite": 0.0,
            "nk": nk, "s1": s1, "s2": s2}


def assert_stats(actual, expected, tol):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert np.shape(actual[key]) == np.shape(value), key
    err = stats_max_rel_error(actual, expected)
    assert err <= tol, f"statistics differ by {err:.3g}"


# -- (1) log-density against scipy ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", TYPES)
def test_log_density_matches_scipy(covariance_type, shape, path):
    family, params, _, xm = case(covariance_type, shape)
    sigma = dense_of(family, params)
    k = len(params["weights"])
    expected = np.empty(len(xm))
    terms = np.empty((len(xm), k))
    for i, row in enumerate(xm):
        o = np.flatnonzero(~np.isnan(row))
        for j in range(k):
            lp = 0.0 if len(o) == 0 else scipy.stats.multivariate_normal(
                params["means"][j, o], sigma[j][np.ix_(o, o)]).logpdf(row[o])
            terms[i, j] = np.log(params["weights"][j]) + lp
        expected[i] = logsumexp(terms[i])
    got = log_density_missing(family, params, xm)
    assert got.shape == (len(xm),)
    # Rows with nothing observed have log-density log(sum w) = 0 up to rounding (an
    # absolute error of a few ulps of 1, whose last bits depend on the NumPy build).
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)
    proba = predict_proba_missing(family, params, xm)
    assert proba.shape == (len(xm), k)
    np.testing.assert_allclose(proba, np.exp(terms - expected[:, None]), rtol=1e-10, atol=1e-300)


# -- (2) complete data: the family's own E-step -----------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", TYPES)
def test_complete_rows_equal_family_estep(covariance_type, shape):
    family, params, x, _ = case(covariance_type, shape)
    assert_stats(estep_missing(family, params, x), family.estep(params, x, np), 1e-10)
    np.testing.assert_allclose(log_density_missing(family, params, x),
                               family.log_density(params, x, np), rtol=1e-10)
    assert_rel(predict_proba_missing(family, params, x), family.predict_proba(params, x, np),
               1e-10, "posteriors")


# -- (3) statistics against the row-by-row reference ---------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", TYPES)
def test_stats_match_reference(covariance_type, shape, path):
    family, params, _, xm = case(covariance_type, shape)
    assert_stats(estep_missing(family, params, xm), reference_stats(family, params, xm), 1e-10)


# -- (4) additivity -----------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
def test_stats_add_over_pieces_and_ignore_order(covariance_type, path):
    family, params, _, xm = case(covariance_type, SHAPES[0], seed=1)
    whole = estep_missing(family, params, xm)
    for cuts in ([1, 2, 3], [40, 41, 97], [17, 60, 61, 62, 149], list(range(10, 150, 10))):
        parts = [estep_missing(family, params, piece) for piece in np.split(xm, cuts)]
        total = parts[0]
        for part in parts[1:]:
            total = tree_add(total, part)
        assert_stats(total, whole, 1e-12)
    perm = np.random.default_rng(2).permutation(len(xm))
    assert_stats(estep_missing(family, params, xm[perm]), whole, 1e-12)
    empty = estep_missing(family, params, xm[:0])
    assert empty["n"] == 0 and empty["loglik"] == 0
    assert_stats(tree_add(empty, whole), whole, 0.0)


# -- (5) EM never decreases the observed-data log-likelihood -----------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
def test_em_monotone(covariance_type):
    rng = np.random.default_rng(3)
    family, truth = make_model(covariance_type, 3, 4, 0.0, rng, reg_covar=0.0)
    x, _ = family.sample(truth, 400, rng)
    xm = with_missing(x, 0.25, rng, n_all_nan=5)
    # Start away from the fixed point: the truth with shuffled, shrunk means.
    params = family.make_params(np.full(3, 1 / 3), 0.5 * truth["means"][[2, 0, 1]],
                                truth["covariances"])
    values = []
    for _ in range(20):
        stats = estep_missing(family, params, xm)
        assert stats["n_nonfinite"] == 0
        values.append(stats["loglik"] / stats["n"])
        params, _ = family.mstep(params, stats, {})
    values = np.array(values)
    steps = np.diff(values)
    assert np.all(steps >= -1e-10 * np.abs(values[:-1])), steps.min()
    assert values[-1] > values[0] + 0.05  # it did move


# -- (6) recovery from data with 20% of the entries missing ----------------------------------------


def run_em(family, params, x, estep, iterations):
    for _ in range(iterations):
        params, _ = family.mstep(params, estep(family, params, x), {})
    return params


@pytest.mark.parametrize("covariance_type", TYPES)
def test_recovery_beats_imputation_and_dropping(covariance_type):
    rng = np.random.default_rng(4)
    family = Gaussian(covariance_type, reg_covar=0.0)
    a = np.array([[1.0, 0.6, 0.3], [0.6, 1.5, -0.5], [0.3, -0.5, 1.2]])
    dense = np.stack([a, 0.6 * a[::-1, ::-1]])
    truth = family.make_params([0.4, 0.6], [[0.0, 0.0, 0.0], [4.0, -3.0, 2.0]],
                               structured_covariances(dense, covariance_type))
    x, _ = family.sample(truth, 6000, rng)
    x = x[rng.permutation(len(x))]
    test, train = x[:2000], x[2000:]
    train_m = with_missing(train, 0.2, rng)
    test_m = with_missing(test, 0.2, rng)

    fitted = run_em(family, truth, train_m, estep_missing, 30)

    # Means within 5 standard errors (each mean from ~0.8 n w_k observed values per feature).
    sigma = dense_of(family, truth)
    n_eff = 0.8 * len(train) * truth["weights"]
    se = np.sqrt(np.diagonal(sigma, axis1=1, axis2=2) / n_eff[:, None])
    assert np.all(np.abs(fitted["means"] - truth["means"]) < 5 * se)
    np.testing.assert_allclose(fitted["weights"], truth["weights"], atol=0.03)

    # EM on mean-imputed data shrinks the variances and covariances.
    imputed = np.where(np.isnan(train_m), np.nanmean(train_m, axis=0), train_m)
    naive = run_em(family, truth, imputed, lambda f, p, z: f.estep(p, z, np), 30)
    # Held-out observed-data log-likelihood (rows with missing entries, marginalised).
    held_em = np.mean(log_density_missing(family, fitted, test_m))
    held_naive = np.mean(log_density_missing(family, naive, test_m))
    held_truth = np.mean(log_density_missing(family, truth, test_m))
    err_em = np.max(np.abs(dense_of(family, fitted) - sigma))
    err_naive = np.max(np.abs(dense_of(family, naive) - sigma))
    assert err_em < 0.1, err_em
    assert err_em < 0.5 * err_naive, (err_em, err_naive)  # measured 0.005-0.05 vs 0.2-0.7
    assert held_em > held_naive + 0.05, (held_em, held_naive)  # measured 0.1-0.23 nats/row
    assert abs(held_em - held_truth) < 0.02, (held_em, held_truth)

    # Dropping the incomplete rows (half of them here: 1 - 0.8^3) is unbiased when entries are
    # missing completely at random, only noisier: on the same held-out rows it is no better.
    complete = train_m[~np.isnan(train_m).any(axis=1)]
    dropped = run_em(family, truth, complete, lambda f, p, z: f.estep(p, z, np), 30)
    held_cc = np.mean(log_density_missing(family, dropped, test_m))
    assert held_em > held_cc, (held_em, held_cc)  # measured by 0.0014-0.0025 nats/row


# -- (7) all-NaN rows and infinite entries --------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
def test_all_nan_rows(covariance_type, path):
    family, params, _, xm = case(covariance_type, SHAPES[0])
    k, d = params["means"].shape
    empty = np.full((5, d), np.nan)
    # log(sum w) = 0 up to rounding: a few ulps of 1.
    np.testing.assert_allclose(log_density_missing(family, params, empty), np.zeros(5),
                               rtol=0, atol=1e-15)
    w = params["weights"] / np.sum(params["weights"])
    np.testing.assert_allclose(predict_proba_missing(family, params, empty),
                               np.broadcast_to(w, (5, k)), rtol=1e-14)
    # Each row: r = w, xhat_k = mu_k, C_k = Sigma_k.
    stats = estep_missing(family, params, empty)
    c = np.sum(params["weights"][:, None] * params["means"], axis=0)
    b = params["means"] - c
    sigma = dense_of(family, params)
    expected = {
        "n": 5.0, "loglik": 0.0, "n_nonfinite": 0.0, "nk": 5 * w, "s1": 5 * w[:, None] * b,
        "s2": np.stack([5 * w[j] * pack(covariance_type, np.outer(b[j], b[j]) + sigma[j])
                        for j in range(k)]),
    }
    assert_stats(stats, expected, 1e-13)
    # They add the model's own statistics: the M-step from them alone returns the model.
    again = Gaussian(covariance_type, reg_covar=0.0)._estimate(stats, c)[0]
    assert_rel(again["means"], params["means"], 1e-12, "means")
    assert_rel(dense_of(family, again), sigma, 1e-10, "covariances")


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag"])
def test_infinite_entries_are_counted_and_dropped(covariance_type, path):
    family, params, _, xm = case(covariance_type, SHAPES[0])
    bad = xm.copy()
    bad[5, 1] = np.inf
    bad[9, :] = -np.inf
    stats = estep_missing(family, params, bad)
    keep = np.setdiff1d(np.arange(len(xm)), [5, 9])
    clean = estep_missing(family, params, xm[keep])
    assert stats["n"] == len(xm) and stats["n_nonfinite"] == 2
    clean.update(n=stats["n"], n_nonfinite=2.0)
    assert_stats(stats, clean, 1e-12)
    dens = log_density_missing(family, params, bad)
    assert np.isnan(dens[[5, 9]]).all() and np.isfinite(dens[keep]).all()
    assert np.isnan(predict_proba_missing(family, params, bad)[[5, 9]]).all()


def test_float32_input_is_computed_in_float64():
    family, params, _, xm = case("full", SHAPES[0])
    xm32 = xm.astype(np.float32)
    assert_stats(estep_missing(family, params, xm32),
                 reference_stats(family, params, xm32.astype(np.float64)), 1e-10)
