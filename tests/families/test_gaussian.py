"""The Gaussian mixture in numbers: scikit-learn, a direct EM reference, scipy, and recovery.

* From the same initial parameters, ``dmix.GaussianMixture`` reproduces scikit-learn's
  ``GaussianMixture`` after 1, 5 and 50 EM iterations (weights, means, covariances and the
  lower bound to 1e-8 relative) for the four covariance types scikit-learn has, on float64
  data, on float32 data, and on data centred 1e4 away from the origin.
* ``tied_diag`` and ``tied_spherical`` (which scikit-learn lacks) reproduce a direct float64
  EM written here (:func:`reference_em`) to 1e-10.
* Log-densities of all six types agree with ``scipy.stats.multivariate_normal``, also for
  components 1e4 away from each other; EM on such far-apart clusters matches the reference
  (the numerics DESIGN.md asks for: moments about a shift near each component).
* Parameters are recovered from 20000 sampled rows, ``sample`` draws the right distribution,
  and ``bic``/``aic`` equal scikit-learn's.

Errors are measured "normwise": the largest absolute difference over an array divided by the
largest magnitude of the expected array (:func:`rel_err`), so entries that are small through
cancellation (off-diagonal covariances, means near 0) are not held to an element-wise relative
tolerance that no float64 algorithm meets.
"""

import math

import dask
import numpy as np
import pytest
import scipy.stats
from scipy.linalg import solve_triangular
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dmix
from dmix.errors import ConvergenceWarning, InvalidParameterError
from dmix.families import gaussian as gaussian_module
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.gaussian import Gaussian
from dmix.testing import assert_rel, rel_err, structured_covariances

SKLEARN_TYPES = ["full", "tied", "diag", "spherical"]
EXTRA_TYPES = ["tied_diag", "tied_spherical"]
SHAPES = [(500, 2, 3), (800, 5, 4), (300, 1, 2)]  # (n_samples, n_features, n_components)
ITERATIONS = [1, 5, 50]
OFFSET = 1e4
CHUNK = 97  # rows per block: 4 to 9 blocks, the last one short


@pytest.fixture(autouse=True)
def sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


# -- data and initial parameters ---------------------------------------------------------------


def make_data(n, d, k, seed=0):
    """Rows from K overlapping clusters (covariances near the identity, centres ~3 apart).

    The clusters overlap enough that EM still moves after 50 iterations, and the within-cluster
    variance is O(1), which matters for the offset data (see test_matches_sklearn).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(k, d))
    mix = rng.normal(scale=0.4, size=(k, d, d)) + np.eye(d)
    labels = rng.integers(0, k, size=n)
    return centers[labels] + np.einsum("nij,nj->ni", mix[labels], rng.normal(size=(n, d)))


def to_dense(covariances, covariance_type, k, d):
    """(K, D, D) matrices from the parameters of ``covariance_type`` (independent of dmix)."""
    c = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        return c.copy()
    if covariance_type == "tied":
        return np.broadcast_to(c, (k, d, d)).copy()
    if covariance_type == "diag":
        return c[:, :, None] * np.eye(d)
    if covariance_type == "spherical":
        return c[:, None, None] * np.eye(d)
    if covariance_type == "tied_diag":
        return np.broadcast_to(np.diag(c), (k, d, d)).copy()
    return np.broadcast_to(float(c) * np.eye(d), (k, d, d)).copy()


def precisions_of(covariances, covariance_type):
    """``precisions_init`` for given covariances."""
    if covariance_type in ("full", "tied", "tied_full"):
        return np.linalg.inv(covariances)
    return 1.0 / covariances


def make_init(x, k, covariance_type, seed=1):
    """Initial weights, means and covariances of ``covariance_type``, away from a fixed
    point."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    weights = rng.uniform(0.5, 1.5, size=k)
    weights /= weights.sum()
    means = x[rng.choice(n, size=k, replace=False)] + rng.normal(scale=0.3, size=(k, d))
    spread = np.atleast_2d(np.cov(x.T))
    dense = np.stack([spread * s for s in rng.uniform(0.3, 0.8, size=k)])
    return weights, means, structured_covariances(dense, covariance_type)


# -- a direct float64 EM, written independently of dmix ----------------------------------------


def reference_log_prob(x, means, dense):
    """``log N(x | mu_k, Sigma_k)`` (n, K) with an explicit Cholesky solve per component."""
    n, d = x.shape
    out = np.empty((n, len(means)))
    for j, (mu, cov) in enumerate(zip(means, dense)):
        chol = np.linalg.cholesky(cov)
        z = solve_triangular(chol, (x - mu).T, lower=True)
        out[:, j] = -0.5 * (d * math.log(2 * math.pi) + np.sum(z * z, axis=0))
        out[:, j] -= np.sum(np.log(np.diag(chol)))
    return out


def reference_em(x, weights, means, covariances, covariance_type, n_iter, reg_covar=1e-6):
    """EM in float64 with a two-pass M-step (means first, then deviations from them).

    Returns the parameters after ``n_iter`` iterations and the lower bounds (mean
    log-likelihood of the parameters entering each iteration, scikit-learn's convention).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    k = len(weights)
    eps10 = 10 * np.finfo(np.float64).eps
    bounds = []
    for _ in range(n_iter):
        dense = to_dense(covariances, covariance_type, k, d)
        wlp = reference_log_prob(x, means, dense) + np.log(weights)
        log_norm = logsumexp(wlp, axis=1)
        bounds.append(float(np.mean(log_norm)))
        resp = np.exp(wlp - log_norm[:, None])
        nk = resp.sum(axis=0) + eps10
        means = resp.T @ x / nk[:, None]
        diff = x[:, None, :] - means[None, :, :]  # (n, K, D), second pass
        scatter = np.einsum("nk,nkd,nke->kde", resp, diff, diff)  # (K, D, D)
        var = np.einsum("nk,nkd->kd", resp, diff * diff)  # (K, D)
        covariances = {
            "full": scatter / nk[:, None, None] + reg_covar * np.eye(d),
            "tied": scatter.sum(axis=0) / nk.sum() + reg_covar * np.eye(d),
            "diag": var / nk[:, None] + reg_covar,
            "spherical": (var / nk[:, None]).mean(axis=1) + reg_covar,
            "tied_diag": var.sum(axis=0) / nk.sum() + reg_covar,
            "tied_spherical": np.asarray(var.sum() / (nk.sum() * d) + reg_covar),
        }[covariance_type]
        weights = nk / nk.sum()
    return {"weights": weights, "means": means, "covariances": covariances}, bounds


def fit_dmix(x, k, covariance_type, weights, means, covariances, max_iter, **kwargs):
    """dmix fitted from given initial parameters for exactly ``max_iter`` iterations (tol=0)."""
    gm = dmix.GaussianMixture(
        k, covariance_type=covariance_type, max_iter=max_iter, tol=0.0,
        weights_init=weights, means_init=means,
        precisions_init=precisions_of(covariances, covariance_type), chunk_size=CHUNK, **kwargs)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        gm.fit(x)
    assert gm.n_iter_ == max_iter
    return gm


def fit_sklearn(x, k, covariance_type, weights, means, covariances, max_iter):
    sk = SkGaussianMixture(
        k, covariance_type=covariance_type, max_iter=max_iter, tol=0.0,
        weights_init=weights, means_init=means,
        precisions_init=precisions_of(covariances, covariance_type))
    with pytest.warns(SkConvergenceWarning):
        sk.fit(x)
    return sk


def errors(gm, ref, shift=0.0):
    """Normwise relative errors of the fitted parameters against ``ref`` (an estimator or a
    dict), with the means compared after subtracting ``shift`` from both."""
    get = ref.get if isinstance(ref, dict) else lambda key: getattr(ref, key + "_")
    return {
        "weights": rel_err(gm.weights_, get("weights")),
        "means": rel_err(gm.means_ - shift, np.asarray(get("means")) - shift),
        "covariances": rel_err(gm.covariances_, get("covariances")),
    }


def assert_errors_below(errs, tol):
    assert all(e <= tol for e in errs.values()), errs


# -- 1. scikit-learn, from the same initial parameters ---------------------------------------


@pytest.mark.parametrize("max_iter", ITERATIONS)
@pytest.mark.parametrize("covariance_type", SKLEARN_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-d{}-k{}".format(*s))
def test_matches_sklearn_float64(shape, covariance_type, max_iter):
    n, d, k = shape
    x = make_data(n, d, k)
    init = make_init(x, k, covariance_type)
    gm = fit_dmix(x, k, covariance_type, *init, max_iter)
    sk = fit_sklearn(x, k, covariance_type, *init, max_iter)
    assert_errors_below(errors(gm, sk), 1e-8)
    assert_rel(gm.lower_bound_, sk.lower_bound_, 1e-8)
    assert_rel(gm.lower_bounds_, sk.lower_bounds_, 1e-8)


@pytest.mark.parametrize("max_iter", ITERATIONS)
@pytest.mark.parametrize("covariance_type", SKLEARN_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-d{}-k{}".format(*s))
def test_matches_sklearn_float32(shape, covariance_type, max_iter):
    """float32 data: dmix vs scikit-learn fitted on the float64 upcast of the same values.

    scikit-learn keeps float32 input in float32 and computes in float32 (about 7 digits),
    while dmix always accumulates in float64 whatever the data dtype. So the fair reference is
    scikit-learn on ``x32.astype(float64)``: the same numbers, computed in float64. (Measured:
    scikit-learn on the float32 array itself returns float32 covariances ~5e-8 away from
    dmix's after 5 iterations on the (500, 2, K=3) data.)
    """
    n, d, k = shape
    x32 = make_data(n, d, k).astype(np.float32)
    init = make_init(x32.astype(np.float64), k, covariance_type)
    gm = fit_dmix(x32, k, covariance_type, *init, max_iter)
    sk = fit_sklearn(x32.astype(np.float64), k, covariance_type, *init, max_iter)
    for attr in ("weights_", "means_", "covariances_"):
        assert getattr(gm, attr).dtype == np.float64, attr
    assert_errors_below(errors(gm, sk), 1e-8)
    assert_rel(gm.lower_bound_, sk.lower_bound_, 1e-8)


@pytest.mark.parametrize("max_iter", ITERATIONS)
@pytest.mark.parametrize("covariance_type", SKLEARN_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-d{}-k{}".format(*s))
def test_matches_sklearn_offset(shape, covariance_type, max_iter):
    """Data centred 1e4 from the origin, within-cluster variance O(1).

    scikit-learn's tied, diag and spherical M-steps use raw moments (tied:
    ``X.T @ X - nk * means.T @ means``; diag and spherical: ``avg_X2 - means**2``), and its
    diag/spherical E-step expands ``x**2 - 2 x mu + mu**2`` about the origin. At 1e4 these
    cancel ~8 of the 16 digits: measured on these data (all shapes, 1/5/50 iterations),
    scikit-learn's own tied/diag/spherical covariances differ from the two-pass reference
    by up to 2.2e-7 relative (tied 8.1e-8, diag 1.6e-7, spherical 2.2e-7), while its full
    type (direct ``X - mean`` form) agrees with dmix to 1.7e-11 and dmix agrees with the
    reference to 9e-11 (all parameters, means centred). dmix centres the data by a shift near
    the data mean before any product, so the global offset does not hurt it.

    Hence: ``full`` is compared with scikit-learn on the offset data directly (1e-8);
    ``tied``/``diag``/``spherical`` with scikit-learn fitted on the translated data
    ``x - 1e4`` (means then shifted back), which is exactly the same problem, at 1e-8. All four
    are also compared with the direct two-pass float64 EM :func:`reference_em` on the offset
    data. Means are compared after subtracting the offset from both (stricter than comparing
    the raw 1e4-sized means).
    """
    n, d, k = shape
    base = make_data(n, d, k)
    x = base + OFFSET
    init = make_init(base, k, covariance_type)
    init_off = (init[0], init[1] + OFFSET, init[2])
    gm = fit_dmix(x, k, covariance_type, *init_off, max_iter)
    if covariance_type == "full":
        sk = fit_sklearn(x, k, covariance_type, *init_off, max_iter)
        assert_errors_below(errors(gm, sk, shift=OFFSET), 1e-8)
    else:
        # x - OFFSET is exact (Sterbenz): scikit-learn sees the same data, translated.
        sk = fit_sklearn(x - OFFSET, k, covariance_type, *init, max_iter)
        sk_means = sk.means_ + OFFSET
        assert_rel(gm.weights_, sk.weights_, 1e-8)
        assert_rel(gm.means_ - OFFSET, sk_means - OFFSET, 1e-8)
        assert_rel(gm.covariances_, sk.covariances_, 1e-8)
    assert_rel(gm.lower_bound_, sk.lower_bound_, 1e-8)
    ref, bounds = reference_em(x, *init_off, covariance_type, max_iter)
    assert_errors_below(errors(gm, ref, shift=OFFSET), 1e-8)
    assert_rel(gm.lower_bounds_, bounds, 1e-8)


# -- 2. the two structures scikit-learn lacks, against the direct EM --------------------------


@pytest.mark.parametrize("max_iter", ITERATIONS)
@pytest.mark.parametrize("covariance_type", EXTRA_TYPES)
@pytest.mark.parametrize("offset", [0.0, OFFSET], ids=["origin", "offset"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-d{}-k{}".format(*s))
def test_extra_types_match_reference_em(shape, offset, covariance_type, max_iter):
    n, d, k = shape
    base = make_data(n, d, k)
    weights, means, covariances = make_init(base, k, covariance_type)
    x, means = base + offset, means + offset
    gm = fit_dmix(x, k, covariance_type, weights, means, covariances, max_iter)
    ref, bounds = reference_em(x, weights, means, covariances, covariance_type, max_iter)
    assert np.shape(gm.covariances_) == get_covariance(covariance_type).shape(k, d)
    assert_errors_below(errors(gm, ref, shift=offset), 1e-10)
    assert_rel(gm.lower_bounds_, bounds, 1e-10)


@pytest.mark.parametrize("covariance_type", list(COVARIANCE_TYPES))
def test_far_apart_clusters_match_reference_em(covariance_type):
    """Two unit-variance clusters centred at -1e4 and +1e4 (the data mean near the origin).

    This is the offset problem of test_matches_sklearn_offset seen from each component: every
    component is 1e4 from the data mean. dmix takes second moments about one shift per pass
    (``c = sum_k w_k mu_k``), so ``s2 / N_k - b_k b_k^T`` loses about
    ``eps * |mu_k - c|^2 / sigma^2`` relative (~2e-8 here: 1e8 against a variance of 1;
    measured 1.4e-8 to 3.3e-8). That is the documented accuracy of this release; per-component
    whitened moments (DESIGN.md) would remove it. The two-pass reference and scikit-learn's full
    type (direct form) agree to 2e-16 on these data. Distances (and so the lower bounds) are
    computed without that cancellation.
    """
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(300, 2)) - 1e4, rng.normal(size=(200, 2)) + 1e4])
    weights = np.array([0.5, 0.5])
    means = np.array([[-1e4 + 0.5, -1e4], [1e4, 1e4 - 0.5]])
    covariances = structured_covariances(np.stack([np.eye(2) * 1.5, np.eye(2) * 0.7]), covariance_type)
    gm = fit_dmix(x, 2, covariance_type, weights, means, covariances, 3)
    ref, bounds = reference_em(x, weights, means, covariances, covariance_type, 3)
    assert_errors_below(errors(gm, ref), 1e-7)
    assert_rel(gm.lower_bounds_, bounds, 1e-10)
    if covariance_type == "full":
        sk = fit_sklearn(x, 2, covariance_type, weights, means, covariances, 3)
        assert_errors_below(errors(gm, sk), 1e-7)


# -- 3. log-densities against scipy ---------------------------------------------------------


def random_params(covariance_type, k, d, rng, centre):
    """Random weights, means ``centre + N(0, 2^2)`` (centre (K, D) or scalar), covariances."""
    weights = rng.dirichlet(np.full(k, 2.0))
    means = rng.normal(scale=2.0, size=(k, d)) + centre
    a = rng.normal(size=(k, d, d))
    dense = a @ np.swapaxes(a, 1, 2) / d + np.eye(d) * rng.uniform(0.3, 1.5, size=(k, 1, 1))
    return weights, means, structured_covariances(dense, covariance_type)


#: Where the components sit: near the origin, all 1e4 away from it, or 1e4 away from each
#: other (so that the data mean is 1e4 from every component).
LAYOUTS = {
    "origin": 0.0,
    "offset": OFFSET,
    "far_apart": np.array([[-OFFSET] * 4, [OFFSET] * 4, [-OFFSET, OFFSET, -OFFSET, OFFSET]]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("covariance_type", list(COVARIANCE_TYPES))
def test_log_density_matches_scipy(covariance_type, layout):
    """Component and mixture log-densities vs scipy.stats.multivariate_normal (dense Sigma).

    The family centres the data by ``c = sum_k w_k mu_k``; with the ``far_apart`` layout every
    component is 1e4 from ``c``, so the distance must not be expanded as
    ``x^2 - 2 x mu + mu^2`` about ``c`` (that cancels ~8 digits: ~5e-8 absolute here).
    """
    rng = np.random.default_rng(11)
    k, d = 3, 4
    weights, means, covariances = random_params(covariance_type, k, d, rng, LAYOUTS[layout])
    family = Gaussian(covariance_type=covariance_type)
    params = family.make_params(weights, means, covariances)
    x = means[rng.integers(0, k, size=400)] + rng.normal(scale=1.5, size=(400, d))
    dense = to_dense(covariances, covariance_type, k, d)
    comp = np.stack([scipy.stats.multivariate_normal(means[j], dense[j]).logpdf(x)
                     for j in range(k)], axis=1)
    shift = weights @ means
    got_comp = family.covariance.log_prob(x - shift, means - shift,
                                          params["precisions_cholesky"], np)
    assert_rel(got_comp, comp, 1e-10)
    mixture = logsumexp(comp + np.log(weights), axis=1)
    assert_rel(family.log_density(params, x, np), mixture, 1e-10)
    resp = np.exp(comp + np.log(weights) - mixture[:, None])
    assert_rel(family.predict_proba(params, x, np), resp, 1e-10)
    # the same through a fitted estimator (score_samples, predict_proba, score)
    gm = fit_dmix(x, k, covariance_type, weights, means, covariances, 1)
    fitted = to_dense(gm.covariances_, covariance_type, k, d)
    comp = np.stack([scipy.stats.multivariate_normal(gm.means_[j], fitted[j]).logpdf(x)
                     for j in range(k)], axis=1)
    mixture = logsumexp(comp + np.log(gm.weights_), axis=1)
    assert_rel(gm.score_samples(x), mixture, 1e-10)
    assert_rel(gm.score(x), mixture.mean(), 1e-10)
    resp = np.exp(comp + np.log(gm.weights_) - mixture[:, None])
    assert_rel(gm.predict_proba(x), resp, 1e-10)


# -- 3b. the expanded E-step against the direct form ------------------------------------------


@pytest.mark.parametrize("covariance_type", list(COVARIANCE_TYPES))
def test_expanded_estep_matches_direct_form(covariance_type, monkeypatch):
    """The E-step's two-product form gives the statistics of the direct form ``|U^T(x-mu)|^2``.

    Well-separated components 3 sd from the origin: the expansion's rounding bound is ~1e-13,
    so the fast form is taken; forcing the direct form changes nothing beyond 1e-12.
    """
    rng = np.random.default_rng(5)
    k, d, n = 4, 6, 3000
    weights, means, covariances = random_params(covariance_type, k, d, rng, 3.0)
    family = Gaussian(covariance_type=covariance_type)
    params = family.make_params(weights, means, covariances)
    x = means[rng.integers(0, k, size=n)] + rng.normal(size=(n, d))
    assert family._coefficients(params, np)[2], "expected the expanded form"
    fast = family.estep(params, x, np)
    monkeypatch.setattr(gaussian_module, "EXPANSION_TOL", -1.0)
    assert not family._coefficients(params, np)[2]
    direct = family.estep(params, x, np)
    for key in ("loglik", "nk", "s1", "s2"):
        assert_rel(fast[key], direct[key], 1e-12, key)


def test_direct_form_where_expansion_would_round(monkeypatch):
    """A precision with entries ~5e6 (correlation 1 - 1e-7): expanding ``x^T P x`` cancels them.

    The reference is the closed-form 2 x 2 inverse in extended precision. The E-step must take
    the direct form and match it to 1e-9 relative; forcing the expansion is what would fail
    (it errs by ~1e-8 here), so this test fails if the guard stops guarding.
    """
    rho = 1.0 - 1e-7
    cov = np.array([[[1.0, rho], [rho, 1.0]], [[2.0, 0.0], [0.0, 0.5]]])
    means = np.array([[3.0, 3.0], [-1.0, 2.0]])
    weights = np.array([0.6, 0.4])
    rng = np.random.default_rng(8)
    t = rng.normal(size=(500, 1))
    x = means[0] + np.hstack([t, t + 3e-4 * rng.normal(size=(500, 1))])
    family = Gaussian(covariance_type="full")
    params = family.make_params(weights, means, cov)
    assert not family._coefficients(params, np)[2], "expected the direct form"

    def log_n(j):  # log N(x | mu_j, Sigma_j) with the 2 x 2 inverse in long double
        c = cov[j].astype(np.longdouble)
        det = c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0]
        z = x.astype(np.longdouble) - means[j]
        maha = (c[1, 1] * z[:, 0] ** 2 - 2 * c[0, 1] * z[:, 0] * z[:, 1]
                + c[0, 0] * z[:, 1] ** 2) / det
        return (-0.5 * (maha + np.log(det) + 2 * np.log(2 * np.pi))).astype(np.float64)

    want = logsumexp(np.stack([log_n(0), log_n(1)], axis=1) + np.log(weights), axis=1)
    assert_rel(family.log_density(params, x, np), want, 1e-10)
    monkeypatch.setattr(gaussian_module, "EXPANSION_TOL", np.inf)
    assert rel_err(family.log_density(params, x, np), want) > 1e-9


# -- 4. parameter recovery ------------------------------------------------------------------


TRUE_MEANS = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 8.0, -2.0]])
TRUE_WEIGHTS = np.array([0.2, 0.3, 0.5])
TRUE_DENSE = np.array([
    [[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]],
    [[0.6, -0.2, 0.1], [-0.2, 1.2, 0.0], [0.1, 0.0, 0.9]],
    [[1.5, 0.4, 0.2], [0.4, 1.0, -0.3], [0.2, -0.3, 0.7]],
])


@pytest.mark.parametrize("covariance_type", list(COVARIANCE_TYPES))
def test_parameter_recovery(covariance_type):
    """20000 rows from well-separated components; default k-means init; 5 standard errors.

    Standard errors at N = 20000, N_k = w_k N (>= 4000): weights sqrt(w(1 - w) / N) <= 0.0036;
    means sqrt(Sigma_dd / N_k); covariance entries sqrt((S_ii S_jj + S_ij^2) / N_eff) with
    N_eff = N_k (N for tied types), the Wishart variance (conservative for the averaged
    spherical types). The components are > 10 standard deviations apart, so misassignment
    is negligible next to these errors.
    """
    rng = np.random.default_rng(2024)
    n, k, d = 20000, 3, 3
    covariances = structured_covariances(TRUE_DENSE, covariance_type)
    dense = to_dense(covariances, covariance_type, k, d)
    labels = rng.choice(k, size=n, p=TRUE_WEIGHTS)
    chol = np.linalg.cholesky(dense)
    x = TRUE_MEANS[labels] + np.einsum("nij,nj->ni", chol[labels], rng.normal(size=(n, d)))

    gm = dmix.GaussianMixture(k, covariance_type=covariance_type, random_state=0,
                              chunk_size=4096).fit(x)
    assert gm.converged_
    cost = ((gm.means_[:, None, :] - TRUE_MEANS[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    order = rows[np.argsort(cols)]  # fitted component matched to true component j
    weights, means = gm.weights_[order], gm.means_[order]
    fitted = to_dense(gm.covariances_, covariance_type, k, d)[order]

    nk = TRUE_WEIGHTS * n
    se_w = np.sqrt(TRUE_WEIGHTS * (1 - TRUE_WEIGHTS) / n)
    assert np.all(np.abs(weights - TRUE_WEIGHTS) <= 5 * se_w), (weights, TRUE_WEIGHTS)
    se_mu = np.sqrt(np.diagonal(dense, axis1=1, axis2=2) / nk[:, None])
    assert np.all(np.abs(means - TRUE_MEANS) <= 5 * se_mu), (means - TRUE_MEANS) / se_mu
    n_eff = np.full(k, float(n)) if get_covariance(covariance_type).tied else nk
    var = np.diagonal(dense, axis1=1, axis2=2)
    se_cov = np.sqrt((var[:, :, None] * var[:, None, :] + dense**2) / n_eff[:, None, None])
    assert np.all(np.abs(fitted - dense) <= 5 * se_cov), (fitted - dense) / se_cov
    # Likelihood: the maximum beats the truth by 2 N (l_hat - l_true) ~ chi2(p) (Wilks); EM
    # stops within about tol = 1e-3 of the maximum.
    true_ll = logsumexp(reference_log_prob(x, TRUE_MEANS, dense) + np.log(TRUE_WEIGHTS),
                        axis=1).mean()
    excess = gm.score(x) - true_ll
    p = gm._n_parameters()
    assert -1e-3 <= excess <= scipy.stats.chi2.ppf(1 - 1e-6, p) / (2 * n), (excess, p)


# -- 5. sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", list(COVARIANCE_TYPES))
def test_sample_matches_params(covariance_type):
    """Counts, per-component means and covariances of 60000 draws within 5 standard errors."""
    k, d, n = 3, 3, 60000
    covariances = structured_covariances(TRUE_DENSE, covariance_type)
    dense = to_dense(covariances, covariance_type, k, d)
    family = Gaussian(covariance_type=covariance_type)
    params = family.make_params(TRUE_WEIGHTS, TRUE_MEANS + 100.0, covariances)
    x, labels = family.sample(params, n, np.random.default_rng(5))
    assert x.shape == (n, d) and labels.shape == (n,)
    assert np.all(np.diff(labels) >= 0), "rows are grouped by component, as scikit-learn does"
    counts = np.bincount(labels, minlength=k)
    assert counts.sum() == n and len(counts) == k
    se_w = np.sqrt(TRUE_WEIGHTS * (1 - TRUE_WEIGHTS) / n)
    assert np.all(np.abs(counts / n - TRUE_WEIGHTS) <= 5 * se_w)
    for j in range(k):
        xj = x[labels == j]
        nj = len(xj)
        var = np.diag(dense[j])
        assert np.all(np.abs(xj.mean(axis=0) - TRUE_MEANS[j] - 100.0) <= 5 * np.sqrt(var / nj))
        se = np.sqrt((var[:, None] * var[None, :] + dense[j] ** 2) / nj)
        emp = np.cov(xj.T, bias=True)
        assert np.all(np.abs(emp - dense[j]) <= 5 * se), (emp - dense[j]) / se


def test_estimator_sample_shapes_and_labels():
    x = make_data(300, 2, 2)
    gm = dmix.GaussianMixture(2, random_state=3).fit(x)
    xs, labels = gm.sample(7)
    assert xs.shape == (7, 2) and labels.shape == (7,)
    assert set(np.unique(labels)) <= {0, 1}
    assert np.all(np.diff(labels) >= 0)
    xs2, labels2 = gm.sample(7)  # random_state fixes the draw
    np.testing.assert_array_equal(xs2, xs)
    np.testing.assert_array_equal(labels2, labels)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidParameterError, match="n_samples"):
            gm.sample(bad)


# -- 6. information criteria --------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", SKLEARN_TYPES)
def test_bic_aic_equal_sklearn(covariance_type):
    n, d, k = 500, 2, 3
    x = make_data(n, d, k)
    init = make_init(x, k, covariance_type)
    gm = fit_dmix(x, k, covariance_type, *init, 3)
    sk = fit_sklearn(x, k, covariance_type, *init, 3)
    assert gm._n_parameters() == sk._n_parameters()
    assert_rel(gm.bic(x), sk.bic(x), 1e-10)
    assert_rel(gm.aic(x), sk.aic(x), 1e-10)


@pytest.mark.parametrize(("covariance_type", "n_cov"),
                         [("tied_diag", 2), ("tied_spherical", 1)])
def test_bic_aic_extra_types(covariance_type, n_cov):
    """p = (K - 1) + K D + (D for tied_diag, 1 for tied_spherical); criteria from scipy."""
    n, d, k = 500, 2, 3
    x = make_data(n, d, k)
    gm = fit_dmix(x, k, covariance_type, *make_init(x, k, covariance_type), 3)
    p = (k - 1) + k * d + n_cov
    assert gm._n_parameters() == p
    assert Gaussian(covariance_type).n_parameters({"means": np.zeros((k, d))}) == p
    dense = to_dense(gm.covariances_, covariance_type, k, d)
    loglik = logsumexp(reference_log_prob(x, gm.means_, dense) + np.log(gm.weights_), axis=1)
    assert_rel(gm.bic(x), -2 * loglik.sum() + p * math.log(n), 1e-10)
    assert_rel(gm.aic(x), -2 * loglik.sum() + 2 * p, 1e-10)


def test_tied_full_alias_fits_like_tied():
    x = make_data(300, 2, 2)
    init = make_init(x, 2, "tied")
    a = fit_dmix(x, 2, "tied_full", *init, 5)
    b = fit_dmix(x, 2, "tied", *init, 5)
    assert_errors_below(errors(a, {"weights": b.weights_, "means": b.means_,
                                   "covariances": b.covariances_}), 0.0)

