"""The MAP M-step against a brute-force maximisation of the log-posterior written here.

With fixed responsibilities, the complete-data log-posterior
``sum_ik r_ik [log w_k + log N(x_i | mu_k, Sigma_k)] + log p(theta)`` (densities and priors from
scipy.stats) is maximised numerically over an unconstrained parametrisation; the closed form
of ``dmix.families.priors.map_estimate`` must be that maximum.
"""

import numpy as np
import pytest
from scipy import optimize, stats

from dmix.errors import InvalidParameterError
from dmix.families.covariance import COVARIANCE_TYPES
from dmix.families.gaussian import Gaussian
from dmix.families.priors import log_prior, resolve_prior

K, D = 2, 2
PRIORS = {
    "weights": dict(weight_concentration_prior=[3.0, 1.5]),
    "mean": dict(mean_prior=[0.5, -0.5], mean_precision_prior=2.0),
    "covariance": dict(covariance_prior=None, degrees_of_freedom_prior=5.0),
    "both": dict(weight_concentration_prior=2.0, mean_prior=[0.5, -0.5],
                 mean_precision_prior=2.0, degrees_of_freedom_prior=5.0),
}
DATA_COV = np.array([[1.0, 0.3], [0.3, 0.8]])


def _problem():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal([0, 0], 0.7, (12, 2)), rng.normal([2, 1], 1.0, (10, 2))])
    resp = np.zeros((22, 2))
    resp[:12, 0], resp[12:, 1] = 0.85, 0.9
    resp[:12, 1], resp[12:, 0] = 0.15, 0.1
    return x, resp


def _log_prior_scipy(cov_type, prior, w, mu, dense, variances):
    """log p(theta) from scipy.stats: Dirichlet, Normal, inverse-Wishart or inverse-gamma."""
    total = 0.0
    if prior.weight_concentration is not None:
        total += stats.dirichlet(prior.weight_concentration).logpdf(w)
    tied = cov_type.startswith("tied")
    if prior.mean is not None:
        for k in range(K):
            total += stats.multivariate_normal(prior.mean, dense[k] / prior.mean_precision
                                               ).logpdf(mu[k])
    if prior.covariance is not None:
        nu = prior.degrees_of_freedom
        if cov_type in ("full", "tied"):
            for k in range(1 if tied else K):
                total += stats.invwishart(nu, prior.covariance).logpdf(dense[k])
        else:
            scale = np.broadcast_to(prior.covariance, variances.shape)
            total += np.sum(stats.invgamma(nu / 2, scale=scale / 2).logpdf(variances))
    return total


def _unpack(theta, cov_type):
    """Unconstrained vector -> weights, means, dense covariances (K, D, D), variances."""
    w = np.exp(np.append(theta[:1], 0.0))
    w /= w.sum()
    mu = theta[1 : 1 + K * D].reshape(K, D)
    rest = theta[1 + K * D :]
    if cov_type in ("full", "tied"):
        n = K if cov_type == "full" else 1
        mats = []
        for j in range(n):
            a, b, c = rest[3 * j : 3 * j + 3]
            L = np.array([[np.exp(a), 0.0], [b, np.exp(c)]])
            mats.append(L @ L.T)
        dense = np.array(mats * (K if n == 1 else 1))
        return w, mu, dense, None
    var = np.exp(rest)
    shape = {"diag": (K, D), "spherical": (K,), "tied_diag": (D,), "tied_spherical": ()}[cov_type]
    var = var.reshape(shape)
    full = np.broadcast_to(var.reshape(K, 1) if cov_type == "spherical" else var, (K, D))
    return w, mu, np.array([np.diag(v) for v in full]), var


def _n_cov(cov_type):
    return {"full": 3 * K, "tied": 3, "diag": K * D, "spherical": K, "tied_diag": D,
            "tied_spherical": 1}[cov_type]


@pytest.mark.parametrize("which", list(PRIORS))
@pytest.mark.parametrize("cov_type", COVARIANCE_TYPES)
def test_map_estimate_is_the_posterior_mode(cov_type, which):
    x, resp = _problem()
    options = dict(PRIORS[which])
    prior = resolve_prior(cov_type, K, D, **options, data_mean=x.mean(0),
                          data_covariance=DATA_COV)
    family = Gaussian(covariance_type=cov_type, reg_covar=0.0, prior=prior)
    shift = np.array([0.7, 0.2])
    params = family._estimate(family.stats_from_resp(resp, x, shift, np), shift)[0]

    def neg_log_posterior(theta):
        w, mu, dense, var = _unpack(theta, cov_type)
        ll = sum(resp[:, k] @ (np.log(w[k]) + stats.multivariate_normal(mu[k], dense[k])
                                .logpdf(x)) for k in range(K))
        return -(ll + _log_prior_scipy(cov_type, prior, w, mu, dense, var))

    start = np.concatenate([[0.0], np.zeros(K * D), np.zeros(_n_cov(cov_type))])
    best = optimize.minimize(neg_log_posterior, start, method="BFGS",
                             options={"gtol": 1e-9, "maxiter": 5000})
    w, mu, dense, _ = _unpack(best.x, cov_type)
    got = family.covariance.dense(params["covariances"], K, D)
    np.testing.assert_allclose(params["weights"], w, rtol=2e-5)
    np.testing.assert_allclose(params["means"], mu, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, dense, rtol=2e-5, atol=2e-5)
    # and the closed form is at least as good as the optimiser's point
    theta_map = _pack(params, cov_type, family)
    assert neg_log_posterior(theta_map) <= best.fun + 1e-9 * abs(best.fun)


def _pack(params, cov_type, family):
    w, mu, cov = params["weights"], params["means"], params["covariances"]
    theta = [np.log(w[0] / w[1])]
    theta += list(mu.ravel())
    if cov_type in ("full", "tied"):
        for m in (cov if cov_type == "full" else cov[None]):
            L = np.linalg.cholesky(m)
            theta += [np.log(L[0, 0]), L[1, 0], np.log(L[1, 1])]
    else:
        theta += list(np.log(np.ravel(cov)))
    return np.array(theta)


@pytest.mark.parametrize("cov_type", COVARIANCE_TYPES)
def test_log_prior_against_scipy(cov_type):
    x, resp = _problem()
    prior = resolve_prior(cov_type, K, D, **PRIORS["both"], data_mean=x.mean(0),
                          data_covariance=DATA_COV)
    family = Gaussian(covariance_type=cov_type, prior=prior)
    params = family._estimate(family.stats_from_resp(resp, x, np.zeros(2), np), np.zeros(2))[0]
    dense = family.covariance.dense(params["covariances"], K, D)
    expected = _log_prior_scipy(cov_type, prior, params["weights"], params["means"], dense,
                                np.asarray(params["covariances"]))
    np.testing.assert_allclose(log_prior(family.covariance, params, prior), expected,
                               rtol=1e-10)


def test_defaults_from_the_data():
    prior = resolve_prior("full", 3, 2, mean_precision_prior=0.5, degrees_of_freedom_prior=None,
                          covariance_prior=None, data_mean=[1.0, 2.0], data_covariance=DATA_COV)
    assert prior.covariance is None and prior.weight_concentration is None
    np.testing.assert_array_equal(prior.mean, [1.0, 2.0])
    prior = resolve_prior("diag", 3, 2, degrees_of_freedom_prior=7.0, data_covariance=DATA_COV)
    np.testing.assert_allclose(prior.covariance, np.diag(DATA_COV) / 3.0)  # / K^(2/D)
    assert prior.mean is None and prior.degrees_of_freedom == 7.0
    prior = resolve_prior("spherical", 4, 2, covariance_prior=None,
                          degrees_of_freedom_prior=None, weight_concentration_prior=2.0)
    assert prior.covariance is None and prior.weight_concentration.tolist() == [2.0] * 4
    prior = resolve_prior("tied_spherical", 2, 2, degrees_of_freedom_prior=5.0,
                          data_covariance=DATA_COV)
    np.testing.assert_allclose(prior.covariance, np.trace(DATA_COV) / 2 / 2.0)
    assert resolve_prior("full", 2, 2) is None


@pytest.mark.parametrize("options, match", [
    (dict(weight_concentration_prior=[1.0, 0.0]), "weight_concentration_prior must be > 0"),
    (dict(weight_concentration_prior=[1.0, 2.0, 3.0]), r"must have shape \(2,\)"),
    (dict(mean_prior=[0.0, 0.0], mean_precision_prior=-1.0), "mean_precision_prior must be"),
    (dict(mean_prior=[0.0, np.nan]), "mean_prior must be finite"),
    (dict(covariance_prior=[[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
    (dict(covariance_prior=np.eye(2), degrees_of_freedom_prior=0.5),
     "degrees_of_freedom_prior must be a finite number > 1"),
])
def test_invalid_priors_are_named(options, match):
    with pytest.raises(InvalidParameterError, match=match):
        resolve_prior("full", 2, 2, **options)


def test_default_needs_the_data():
    with pytest.raises(ValueError, match="data covariance"):
        resolve_prior("full", 2, 2, degrees_of_freedom_prior=4.0)
