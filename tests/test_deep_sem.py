"""The deep estimators with ``fit_method='stochastic'``: fits that do not depend on the
chunking, exact resume, the seed, wine clusters and option errors (the statistics are checked
in families/test_sem.py)."""

import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.metrics import adjusted_rand_score

import dmix
from dmix.errors import InvalidParameterError

CLASSES = [dmix.DeepGaussianMixture, dmix.GaussianMixtureNetwork]


def _wine():
    x, y = load_wine(return_X_y=True)
    return (x - x.mean(0)) / x.std(0), y


X, Y = _wine()


def _fit(cls, x=X, **options):
    options = {"layer_sizes": (3, 1), "layer_dims": (3, 2), "fit_method": "stochastic",
               "random_state": 0, "max_iter": 12, "tol": 0.0, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = options.pop("sample_weight", None)
        return cls(**options).fit(x, sample_weight=weights)


def _assert_same(a, b, rtol):
    assert set(a.params_) == set(b.params_)
    for key in a.params_:
        np.testing.assert_allclose(a.params_[key], b.params_[key], rtol=rtol,
                                   atol=0 if rtol == 0 else 1e-12, err_msg=key)


@pytest.mark.parametrize("cls", CLASSES)
def test_fit_does_not_depend_on_the_chunking(cls):
    a = _fit(cls, chunk_size=50)
    b = _fit(cls, x=da.from_array(X, chunks=(29, 13)))
    c = _fit(cls, x=da.from_array(X, chunks=(178, 13)))
    _assert_same(a, b, rtol=1e-10)
    _assert_same(a, c, rtol=1e-10)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_resume_equals_the_uninterrupted_fit(cls, tmp_path):
    full = _fit(cls)
    _fit(cls, max_iter=5, checkpoint=tmp_path / "c")
    resumed = dmix.resume(tmp_path / "c", X, max_iter=12)
    _assert_same(resumed, full, rtol=0)
    assert resumed.lower_bounds_ == full.lower_bounds_
    assert resumed.fit_method == "stochastic"


def test_the_seed_decides_the_fit():
    a, b = _fit(dmix.DeepGaussianMixture), _fit(dmix.DeepGaussianMixture)
    _assert_same(a, b, rtol=0)
    # the same initialisation (init_params='kmeans' is seeded too) but other draws
    c = _fit(dmix.DeepGaussianMixture, random_state=1)
    assert not np.allclose(a.params_["layer0/loadings"], c.params_["layer0/loadings"])
    # exact EM from the same start differs from SEM
    d = _fit(dmix.DeepGaussianMixture, fit_method="exact")
    assert not np.allclose(a.params_["layer0/loadings"], d.params_["layer0/loadings"])


@pytest.mark.parametrize("cls", CLASSES)
def test_wine_clusters(cls):
    model = _fit(cls, n_init=5, max_iter=60)
    # Measured 1.000 for both (exact EM, n_init=5: 0.982, test_deep_mixture.py); single
    # restarts with seeds 0, 1, 2 gave 1.000, 0.894 and 0.982. The last 20 bounds spanned
    # 0.031 per row.
    assert adjusted_rand_score(Y, model.predict(X)) >= 0.95
    # the lower bound is noisy but stationary: the last 20 within 0.1 per row
    assert np.ptp(model.lower_bounds_[-20:]) < 0.1


def test_bad_options_raise():
    with pytest.raises(InvalidParameterError, match="'fit_method'.*'exact' or 'stochastic'"):
        dmix.DeepGaussianMixture(fit_method="sem").fit(X)


@pytest.mark.parametrize("cls", CLASSES)
def test_sample_weights(cls):
    """Unit weights are the unweighted fit, bit for bit; a weighted fit does not depend on the
    chunking, differs from the unweighted one, and only the weights' ratios matter."""
    plain = _fit(cls)
    _assert_same(_fit(cls, sample_weight=np.ones(len(X))), plain, rtol=0)
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=len(X))
    a = _fit(cls, sample_weight=w, chunk_size=50)
    b = _fit(cls, x=da.from_array(X, chunks=(29, 13)), sample_weight=w)
    _assert_same(a, b, rtol=1e-10)
    assert not np.allclose(a.means_, plain.means_)
    # Doubling every weight changes no ratio: the same fit up to rounding.
    _assert_same(_fit(cls, sample_weight=2 * w, chunk_size=50), a, rtol=1e-8)


def test_save_and_load_keep_the_method(tmp_path):
    model = _fit(dmix.GaussianMixtureNetwork)
    model.save(tmp_path / "m")
    loaded = dmix.load(tmp_path / "m")
    assert loaded.fit_method == "stochastic"
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_cli_fit_method_stochastic(tmp_path):
    import zarr

    from dmix.cli import main

    path = tmp_path / "wine.zarr"
    arr = zarr.create_array(path, shape=X.shape, chunks=(60, X.shape[1]), dtype="f8")
    arr[:] = X
    code = main(["fit", str(path), "-k", "3", "--model", "dgmm", "--layer-sizes", "3,1",
                 "--layer-dims", "3,2", "--fit-method", "stochastic", "--seed", "0",
                 "--max-iter", "12", "--tol", "0", "--n-workers", "1", "--dashboard-address",
                 ":0", "--output", str(tmp_path / "m")])
    assert code == 0
    loaded = dmix.load(tmp_path / "m")
    assert loaded.fit_method == "stochastic"
    _assert_same(loaded, _fit(dmix.DeepGaussianMixture, x=str(path)), rtol=1e-10)


def test_restarts_draw_with_their_own_keys():
    from dmix.engine.grid import fit_restarts
    from dmix.engine.loop import Monitor
    from dmix.families.deep import DeepGaussian

    family = DeepGaussian((3, 1), (3, 2), fit_method="stochastic", random_state=5)
    assert family.for_restart(0) is family
    keys = {family.for_restart(r).random_state for r in range(1, 4)}
    assert len(keys) == 3 and 5 not in keys
    exact = DeepGaussian((3, 1), (3, 2))
    assert exact.for_restart(2) is exact

    class Ends(Monitor):
        runs = []

        def end_init(self, init, result, seconds):
            self.runs.append(result)

    start = _fit(dmix.DeepGaussianMixture, max_iter=0).params_  # one start for both restarts
    fit_restarts(family, da.from_array(X, chunks=60), lambda restart: start, n_init=2,
                 max_iter=4, tol=0.0, monitor=Ends())
    a, b = Ends.runs
    assert a.lower_bounds[0] == b.lower_bounds[0]  # the same start...
    assert a.lower_bounds[-1] != b.lower_bounds[-1]  # ...and other draws
