"""The options of issue 6 on a real cluster, reading Zarr from disk: the same results as in
process (missing values, sample weights beside the data, MAP, CEM, the shared grid)."""

import distributed
import numpy as np
import pytest
import zarr

import dmix
from dmix.families.missing import log_density_missing


def _data():
    rng = np.random.default_rng(11)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -1.0], [-2.0, 4.0, 2.0]])
    x = np.concatenate([rng.normal(c, 0.8, (400, 3)) for c in centers]) + 3.0
    rng.shuffle(x)
    holes = x.copy()
    holes[rng.random(x.shape) < 0.15] = np.nan
    holes[5] = np.nan  # a row with nothing observed
    return x, holes, rng.integers(0, 4, len(x)).astype(np.float64)


X, HOLES, WEIGHTS = _data()
CHUNK = 300


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    paths = {}
    for name, value, chunks in (("x", X, (CHUNK, 3)), ("holes", HOLES, (CHUNK, 3)),
                                ("w", WEIGHTS, (CHUNK,))):
        arr = zarr.create_array(root / f"{name}.zarr", shape=value.shape, chunks=chunks,
                                dtype="f8")
        arr[:] = value
        paths[name] = str(root / f"{name}.zarr")
    return paths


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        yield c


def _same(a, b, rtol=1e-10):
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol)


def test_missing_values_on_the_cluster(stores, client, tmp_path):
    options = dict(n_components=3, covariance_type="full", missing="marginalize",
                   random_state=0, chunk_size=CHUNK, tol=1e-6)
    local = dmix.GaussianMixture(**options).fit(HOLES)
    remote = dmix.GaussianMixture(**options, client=client).fit(stores["holes"])
    _same(remote, local)
    assert np.all(np.diff(local.lower_bounds_) >= -1e-12 * np.abs(local.lower_bounds_[1:]))
    # per-row log-densities of incomplete rows are the marginal ones
    family, params = local._scoring_family, local._params
    np.testing.assert_allclose(local.score_samples(HOLES), log_density_missing(
        family, params, HOLES), rtol=1e-12)
    assert local.score_samples(HOLES)[5] == 0.0  # nothing observed: log p = 0
    labels = remote.predict(stores["holes"]).compute()
    np.testing.assert_array_equal(labels, local.predict(HOLES))
    # interrupted and resumed on the cluster: the uninterrupted fit
    part = dict(options, max_iter=4, tol=0.0)
    dmix.GaussianMixture(**part, client=client, checkpoint=tmp_path / "c").fit(stores["holes"])
    resumed = dmix.resume(tmp_path / "c", max_iter=9, client=client)
    whole = dmix.GaussianMixture(**dict(part, max_iter=9)).fit(HOLES)
    np.testing.assert_array_equal(resumed.means_, whole.means_)


def test_default_still_rejects_missing_values(stores, client):
    # whichever block the cluster reports first, the error names its rows
    with pytest.raises(dmix.DataError, match=r"chunk \d \(rows \d+-\d+\) of .*holes.zarr has "
                                              r"\d+ row\(s\) with non-finite values"):
        dmix.GaussianMixture(2, chunk_size=CHUNK, client=client).fit(stores["holes"])


@pytest.mark.parametrize("options", [
    dict(covariance_type="diag", cem=True),
    dict(covariance_type="tied", weight_concentration_prior=2.0, degrees_of_freedom_prior=6.0,
         mean_precision_prior=0.1),
])
def test_weights_from_zarr_with_map_and_cem_on_the_cluster(stores, client, options):
    common = dict(n_components=3, random_state=2, chunk_size=CHUNK, **options)
    local = dmix.GaussianMixture(**common).fit(X, sample_weight=WEIGHTS)
    remote = dmix.GaussianMixture(**common, client=client).fit(stores["x"],
                                                               sample_weight=stores["w"])
    _same(remote, local)


def test_select_on_the_cluster(stores, client):
    grid = dict(n_components=[2, 3], covariance_types=["full", "spherical"], n_init=2,
                random_state=5, chunk_size=CHUNK)
    local = dmix.select(X, **grid)
    remote = dmix.select(stores["x"], **grid, client=client)
    for a, b in zip(local.table, remote.table, strict=True):
        assert a["n_components"] == b["n_components"] and a["n_iter"] == b["n_iter"]
        np.testing.assert_allclose(a["bic"], b["bic"], rtol=1e-10)
    # three round clusters: BIC picks 3 spherical components
    assert (remote.best.n_components, remote.best.covariance_type) == (3, "spherical")
