"""Tests of dmix.engine.init: determinism, chunking invariance, k-means quality, and parity
with scikit-learn."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dmix
from dmix.engine.init import initial_params, kmeans_centers, plusplus_seeds, summarize
from dmix.families.gaussian import Gaussian
from dmix.io.source import as_source

METHODS = ["kmeans", "k-means++", "random", "random_from_data"]
PARAM_KEYS = ["weights", "means", "covariances", "precisions_cholesky"]
TRUE_MEANS = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def blobs(n_per=50, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n_per, 3)) + m for m in TRUE_MEANS]) + offset
    return x[rng.permutation(len(x))]


def chunkings(n):
    rng = np.random.default_rng(3)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, 20), n - sum(sizes))))
    return {"one": (n,), "uneven": tuple(sizes), "rows1": (1,) * n, "even": None}


def as_dask(x, chunks):
    if chunks is None:
        return as_source(x, chunk_size=25).array
    return da.from_array(x, chunks=(chunks, (x.shape[1],)))


def assert_params_close(a, b, rtol=1e-10):
    for k in PARAM_KEYS:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * np.abs(b[k]).max(),
                                   err_msg=k)


def match(found, true):
    """Rows of ``found`` reordered to best match ``true`` (Hungarian on distances)."""
    cost = ((found[:, None, :] - true[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(true), dtype=int)
    order[cols] = rows
    return found[order]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_init_deterministic_and_chunking_invariant(method, covariance_type):
    x = blobs(n_per=40)  # 160 rows
    family = Gaussian(covariance_type, 1e-6)
    results = {}
    for name, chunks in chunkings(len(x)).items():
        results[name] = initial_params(family, as_dask(x, chunks), 4, method, seed=1234)
    ref = results["one"]
    for name, params in results.items():
        if method in ("k-means++", "random_from_data"):
            # the seed rows' covariances are reg_covar * I plus a rounding residue of order
            # eps * |x - mean|**2 (see test_seed_init_covariances_are_reg_covar_identity), so
            # they are compared absolutely, at the data's scale
            for k in ("weights", "means"):
                np.testing.assert_allclose(params[k], ref[k], rtol=1e-10, atol=0, err_msg=name)
            np.testing.assert_allclose(params["covariances"], ref["covariances"], rtol=0,
                                       atol=1e-12 * np.abs(x).max() ** 2, err_msg=name)
        else:
            assert_params_close(params, ref)
    # deterministic: the same call twice gives bit-identical parameters
    uneven = as_dask(x, chunkings(len(x))["uneven"])
    again = initial_params(family, uneven, 4, method, seed=1234)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(again[k], results["uneven"][k])
    # shapes
    assert ref["weights"].shape == (4,)
    assert ref["means"].shape == (4, 3)
    assert ref["covariances"].shape == family.covariance.shape(4, 3)


@pytest.mark.parametrize("method", METHODS)
def test_final_fit_chunking_invariant_for_every_init(method):
    x = blobs(n_per=40, seed=11)
    kw = dict(init_params=method, random_state=21, tol=1e-8, max_iter=300)
    a = dmix.GaussianMixture(4, **kw).fit(x)
    b = dmix.GaussianMixture(4, chunk_size=1, **kw).fit(x)
    c = dmix.GaussianMixture(4, **kw).fit(as_dask(x, chunkings(len(x))["uneven"]))
    for other in (b, c):
        assert other.n_iter_ == a.n_iter_
        # The bound of the seed methods' start (covariances ~ reg_covar, bound ~ -1e6) carries
        # the rounding residue of their initial covariances (see the test below): 1e-8 there.
        first_rtol = 1e-8 if method in ("k-means++", "random_from_data") else 1e-10
        assert other.lower_bounds_[0] == pytest.approx(a.lower_bounds_[0], rel=first_rtol)
        np.testing.assert_allclose(other.lower_bounds_[1:], a.lower_bounds_[1:], rtol=1e-10)
        for name in ("weights_", "means_", "covariances_"):
            ref = getattr(a, name)
            np.testing.assert_allclose(getattr(other, name), ref, rtol=1e-10,
                                       atol=1e-10 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("method", ["k-means++", "random_from_data"])
def test_seed_init_covariances_are_reg_covar_identity(method):
    """As in scikit-learn, a seed row alone (responsibility 1) has covariance reg_covar * I,
    whatever the scale of the data; scikit-learn's are reg_covar * I to ~1e-21 here."""
    x = np.random.default_rng(0).normal(size=(200, 3)) * 1e4
    params = initial_params(Gaussian("full", 1e-6), as_source(x, chunk_size=64).array, 4,
                            method, seed=0)
    np.testing.assert_allclose(params["covariances"], np.stack([1e-6 * np.eye(3)] * 4),
                               rtol=0, atol=1e-3 * 1e-6)
    sk = SkGaussianMixture(4, init_params=method, max_iter=0, random_state=0).fit(x)
    np.testing.assert_allclose(sk.covariances_, np.stack([1e-6 * np.eye(3)] * 4), rtol=0,
                               atol=1e-3 * 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_init_different_seeds_and_restarts_differ(method):
    x = blobs(n_per=40, seed=5)
    family = Gaussian("full", 1e-6)
    data = as_source(x, chunk_size=30).array
    base = initial_params(family, data, 4, method, seed=1)
    for other in (initial_params(family, data, 4, method, seed=2),
                  initial_params(family, data, 4, method, seed=1, restart=1)):
        if method == "kmeans":
            # on clean blobs k-means finds the same partition from any start; the seeds
            # still differ in the order of the components found
            same_set = np.allclose(np.sort(base["means"], axis=0),
                                   np.sort(other["means"], axis=0), rtol=1e-8)
            assert same_set
        else:
            assert not np.allclose(base["means"], other["means"], rtol=1e-6, atol=1e-6)


def test_kmeans_seeds_differ_on_ambiguous_data():
    """On data without cluster structure, different seeds give different k-means solutions."""
    x = np.random.default_rng(0).uniform(size=(300, 2))
    family = Gaussian("full", 1e-6)
    data = as_source(x, chunk_size=64).array
    found = [np.sort(initial_params(family, data, 7, "kmeans", seed=s)["means"], axis=0)
             for s in range(4)]
    assert any(not np.allclose(found[0], f, atol=1e-6) for f in found[1:])


def test_kmeans_finds_true_centers_on_separated_blobs():
    x = blobs(n_per=100, seed=2, offset=1000.0)  # far from the origin: no cancellation
    data = as_source(x, chunk_size=37).array
    family = Gaussian("full", 1e-6)
    params = initial_params(family, data, 4, "kmeans", seed=0)
    means = match(params["means"], TRUE_MEANS + 1000.0)
    # each blob mean estimated from 100 points of unit variance: error ~ 0.1 per coordinate
    np.testing.assert_allclose(means, TRUE_MEANS + 1000.0, atol=0.4)
    np.testing.assert_allclose(np.sort(params["weights"]), 0.25, rtol=1e-10)
    # the hard partition is exactly the true one, so means are the blob means
    labels = ((x[:, None, :] - params["means"][None]) ** 2).sum(-1).argmin(1)
    for j in range(4):
        np.testing.assert_allclose(params["means"][j], x[labels == j].mean(0), rtol=1e-12)
        np.testing.assert_allclose(params["covariances"][j],
                                   np.cov(x[labels == j].T, bias=True) + 1e-6 * np.eye(3),
                                   rtol=1e-9, atol=1e-12)
    # kmeans_centers directly
    summary = summarize(data, seed=0, restart=0, m=4, source="x", split_every=None, client=None)
    assert summary[0] == 400
    np.testing.assert_allclose(summary[1], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(summary[2], x.var(0), rtol=1e-10)
    centers = kmeans_centers(data, 4, seed=0, restart=0, summary=summary, source="x",
                             split_every=None, client=None)
    np.testing.assert_allclose(match(centers, TRUE_MEANS + 1000), TRUE_MEANS + 1000, atol=0.4)


def test_kmeans_init_matches_sklearn_kmeans_partition():
    x = blobs(n_per=60, seed=3)
    params = initial_params(Gaussian("full", 1e-6), as_source(x, chunk_size=50).array, 4,
                            "kmeans", seed=0)
    km = KMeans(4, n_init=1, random_state=0).fit(x)
    np.testing.assert_allclose(match(params["means"], km.cluster_centers_), km.cluster_centers_,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_kmeans_fit_matches_sklearn_on_easy_data(covariance_type):
    x = blobs(n_per=60, seed=4)
    kw = dict(covariance_type=covariance_type, tol=1e-10, max_iter=500, random_state=0)
    ours = dmix.GaussianMixture(4, init_params="kmeans", chunk_size=45, **kw).fit(x)
    sk = SkGaussianMixture(4, init_params="kmeans", **kw).fit(x)
    assert ours.converged_ and sk.converged_
    assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-6)
    np.testing.assert_allclose(match(ours.means_, sk.means_), sk.means_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sort(ours.weights_), np.sort(sk.weights_), rtol=1e-5)


def test_seed_methods_pick_distinct_data_rows():
    """k-means++ and random_from_data: means are rows of X; weights, covariances as sklearn."""
    x = blobs(n_per=30, seed=6)
    family = Gaussian("full", 1e-3)
    data = as_source(x, chunk_size=11).array
    for method in ("k-means++", "random_from_data"):
        params = initial_params(family, data, 4, method, seed=8)
        # the means are the seed rows divided by N_k = 1 + 10 eps, as in scikit-learn
        dist = np.abs(params["means"][:, None, :] - x[None]).max(-1)
        nearest = dist.argmin(1)
        assert np.all(dist.min(1) <= 1e-13 * np.abs(x).max()), method
        assert len(set(nearest.tolist())) == 4
        # each seed alone has responsibility 1 (scikit-learn's _initialize): N_k = 1 + 10 eps
        np.testing.assert_allclose(params["weights"], 1.0 / len(x), rtol=1e-12)
        # reg_covar * I up to a rounding residue (the bug test above checks it strictly)
        np.testing.assert_allclose(params["covariances"], np.stack([1e-3 * np.eye(3)] * 4),
                                   rtol=0, atol=1e-11)


def test_kmeans_plusplus_spreads_over_blobs():
    """D^2 sampling on four far-apart blobs picks one seed per blob (for almost any seed)."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(size=(50, 3)) + 10 * m for m in TRUE_MEANS])
    x = x[rng.permutation(len(x))]  # unit-variance blobs 100 apart
    data = as_source(x, chunk_size=33).array
    hits = 0
    for seed in range(10):
        summary = summarize(data, seed=seed, restart=0, m=4, source="x", split_every=None,
                            client=None)
        seeds = plusplus_seeds(data, 4, seed=seed, restart=0, summary=summary,
                               split_every=None, client=None)
        blob = ((seeds[:, None, :] - 10 * TRUE_MEANS[None]) ** 2).sum(-1).argmin(1)
        hits += len(set(blob.tolist())) == 4
    assert hits == 10


def test_random_init_is_uniform_responsibilities():
    """'random': weights near 1/K and means near the data mean (uniform responsibilities)."""
    x = blobs(n_per=250, seed=8)
    params = initial_params(Gaussian("diag", 1e-6), as_source(x, chunk_size=100).array, 4,
                            "random", seed=3)
    np.testing.assert_allclose(params["weights"].sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(params["weights"], 0.25, atol=0.03)
    np.testing.assert_allclose(params["means"], np.broadcast_to(x.mean(0), (4, 3)), atol=0.5)


def test_unknown_method():
    x = blobs(n_per=5)
    with pytest.raises(ValueError, match=r"^Unknown init method 'bogus'; valid options are "
                                         r"'kmeans', 'k-means\+\+', 'random', "
                                         r"'random_from_data'\.$"):
        initial_params(Gaussian(), as_source(x).array, 2, "bogus", seed=0)


def test_kmeans_too_few_distinct_rows():
    x = np.ones((10, 2))
    with pytest.raises(dmix.DataError, match=r"^Found only 1 distinct candidate centres for "
                                             r"n_components = 3 in the input array; the data "
                                             r"have too few distinct rows\.$"):
        dmix.GaussianMixture(3, random_state=0).fit(x)


def test_kmeans_parallel_with_fewer_rows_than_oversampling():
    """k-means|| keeps the top m rows per round and re-runs the round with 2m if all m passed.

    The expected number of rows passing a round is at most l = 2K, and m = l + 8 sqrt(l) + 16,
    so the re-run needs a deviation of more than 8 sqrt(l) + 16 from the mean. With few rows
    (m >= n) the loop must stop at once: check that branch on data smaller than m, where every
    row is a candidate and the result is still chunk-invariant and finds the true centres.
    """
    x = blobs(n_per=6, seed=9)  # 24 rows, K = 4: m = 8 + 8 sqrt(8) + 16 = 46 > 24
    family = Gaussian("full", 1e-6)
    a = initial_params(family, as_source(x, chunk_size=1).array, 4, "kmeans", seed=2)
    b = initial_params(family, as_source(x).array, 4, "kmeans", seed=2)
    assert_params_close(a, b)
    np.testing.assert_allclose(match(a["means"], TRUE_MEANS), TRUE_MEANS, atol=1.5)
