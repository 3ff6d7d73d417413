"""dmix reaches scikit-learn's best likelihood on two real data sets.

On iris (150 x 4, raw) and wine (178 x 13, standardized), with ``n_components=3``: the best final
``lower_bound_`` (mean log-likelihood) of ``dmix.GaussianMixture`` over 20 restarts
(``random_state`` 0..19, ``init_params="kmeans"``, ``n_init=1``, NumPy input: local fits) is at
least the best of 20 restarts of ``sklearn.mixture.GaussianMixture`` with the same seeds,
``tol``, ``reg_covar`` and ``max_iter``, less 1e-6. The initialisations differ (dmix seeds
k-means with k-means|| then runs Lloyd; scikit-learn runs ``KMeans(n_init=1)``), so the runs are
not paired; the test compares what 20 restarts find. scikit-learn has no tied_diag (mclust EEI)
or tied_spherical (EII) structure: those are compared with :func:`reference_em`, a direct
float64 EM written here, started from scikit-learn's k-means labels as scikit-learn starts.

Best of 20 (measured 2026-12-04; dmix - reference is within +-1.2e-14 except on iris tied_diag):

=========  ==============  =================  ===================
data       covariance      dmix best          reference best
=========  ==============  =================  ===================
iris       full             -1.201454751      -1.201454751 (sk)
iris       tied             -1.712200840      -1.712200840 (sk)
iris       diag             -2.047869922      -2.047869922 (sk)
iris       spherical        -2.562099387      -2.562099387 (sk)
iris       tied_diag        -2.410051739      -2.413348509 (ref)
iris       tied_spherical   -2.678682230      -2.678682230 (ref)
wine       full            -11.739469559     -11.739469559 (sk)
wine       tied            -13.727430180     -13.727430180 (sk)
wine       diag            -14.406822358     -14.406822358 (sk)
wine       spherical       -15.395454050     -15.395454050 (sk)
wine       tied_diag       -15.128978293     -15.128978293 (ref)
wine       tied_spherical  -15.660372972     -15.660372972 (ref)
=========  ==============  =================  ===================

On iris tied_diag dmix is 3.3e-3 *better*: EM crawls there, and with tol=1e-3 most runs of
both stop after about 4 iterations on a plateau (-2.41335 or -2.41343); dmix's seeds 0 and 18
went on for 21 iterations to -2.41005. With tol=1e-10 every one of the 40 runs reaches
-2.409503. (The tol rule stops short on slowly converging runs; see ``dmix.engine.stopping``.)

Runtime: about 9 s for the whole file on 2 shared cores (not marked slow).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.datasets import load_iris, load_wine
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.preprocessing import StandardScaler

import dmix

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

SEEDS = range(20)
K = 3
TOL, REG_COVAR, MAX_ITER = 1e-3, 1e-6, 100
SLACK = 1e-6  # in mean log-likelihood per row


def load(name: str) -> np.ndarray:
    if name == "iris":
        return load_iris().data
    return StandardScaler().fit_transform(load_wine().data)


def reference_em(x, labels, covariance_type, tol=TOL, reg_covar=REG_COVAR, max_iter=MAX_ITER):
    """EM for one shared diagonal (tied_diag, EEI) or one shared variance (tied_spherical, EII),
    in float64, from hard ``labels``; returns the final lower bound in scikit-learn's sense
    (the mean log-likelihood of the last E-step, of the parameters entering the last
    iteration), stopping when it changes by less than ``tol``."""
    d = x.shape[1]
    resp = np.eye(K)[labels]
    lower_bound = -math.inf
    for _ in range(max_iter):
        # M-step (scikit-learn's guard against empty components: nk + 10 eps)
        nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
        means = resp.T @ x / nk[:, None]
        weights = nk / nk.sum()
        sq = np.einsum("nk,nkd->d", resp, (x[:, None, :] - means[None]) ** 2) / nk.sum()
        var = sq if covariance_type == "tied_diag" else np.full(d, sq.mean())
        var = var + reg_covar
        # E-step: log w_k + log N(x | mu_k, diag(var))
        log_p = (np.log(weights) - 0.5 * (d * math.log(2 * math.pi) + np.log(var).sum())
                 - 0.5 * (((x[:, None, :] - means[None]) ** 2) / var).sum(axis=2))
        log_norm = logsumexp(log_p, axis=1)
        resp = np.exp(log_p - log_norm[:, None])
        previous, lower_bound = lower_bound, float(log_norm.mean())
        if abs(lower_bound - previous) < tol:
            break
    return lower_bound


def dmix_best(x, covariance_type) -> float:
    return max(
        dmix.GaussianMixture(K, covariance_type=covariance_type, tol=TOL, reg_covar=REG_COVAR,
                             max_iter=MAX_ITER, n_init=1, init_params="kmeans",
                             random_state=seed).fit(x).lower_bound_
        for seed in SEEDS
    )


def reference_best(x, covariance_type) -> float:
    if covariance_type in ("tied_diag", "tied_spherical"):
        return max(
            reference_em(x, KMeans(K, n_init=1, random_state=seed).fit(x).labels_,
                         covariance_type)
            for seed in SEEDS
        )
    return max(
        SkGaussianMixture(K, covariance_type=covariance_type, tol=TOL, reg_covar=REG_COVAR,
                          max_iter=MAX_ITER, n_init=1, init_params="kmeans",
                          random_state=seed).fit(x).lower_bound_
        for seed in SEEDS
    )


@pytest.mark.parametrize("covariance_type", ["tied_diag", "tied_spherical"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_em_is_sklearn_tied_in_one_dimension(covariance_type, seed):
    """With one feature, tied_diag and tied_spherical are scikit-learn's 'tied': from the same
    k-means labels, :func:`reference_em` must give scikit-learn's lower bound."""
    x = load("iris")[:, 2:3]
    sk = SkGaussianMixture(K, covariance_type="tied", tol=TOL, reg_covar=REG_COVAR,
                           max_iter=MAX_ITER, random_state=seed).fit(x)
    labels = KMeans(K, n_init=1, random_state=seed).fit(x).labels_
    assert reference_em(x, labels, covariance_type) == pytest.approx(sk.lower_bound_,
                                                                     rel=0, abs=1e-12)


@pytest.mark.parametrize("covariance_type",
                         ["full", "tied", "diag", "spherical", "tied_diag", "tied_spherical"])
@pytest.mark.parametrize("dataset", ["iris", "wine"])
def test_best_of_20_restarts_reaches_the_reference(dataset, covariance_type):
    x = load(dataset)
    ours, reference = dmix_best(x, covariance_type), reference_best(x, covariance_type)
    assert ours >= reference - SLACK, (
        f"{dataset} {covariance_type}: dmix best {ours:.9f} < reference best {reference:.9f}")
