"""scikit-learn conventions of dmix.GaussianMixture: parameters, errors, outputs, warm start,
verbose output, sampling, and BIC/AIC against scikit-learn."""

from __future__ import annotations

import math
import re

import dask
import dask.array as da
import numpy as np
import pytest
import sklearn.base
import sklearn.exceptions
import zarr
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dmix
from dmix.errors import DataError, InvalidParameterError, NotFittedError

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical", "tied_diag", "tied_spherical"]
SK_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def data(n=150, d=2, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0] * d, [5.0] + [0.0] * (d - 1), [0.0, 5.0] + [0.0] * (d - 2)])
    x = np.concatenate([rng.normal(size=(n // 3, d)) * s + c
                        for c, s in zip(centers, (1.0, 0.7, 1.3), strict=True)])
    return x[rng.permutation(len(x))]


@pytest.fixture(scope="module")
def X():
    return data()


@pytest.fixture(scope="module")
def fitted(X):
    with dask.config.set(scheduler="sync"):
        return dmix.GaussianMixture(3, random_state=0, tol=1e-6).fit(X)


# -- parameters ----------------------------------------------------------------------------

ALL_PARAMS = sorted(["n_components", "covariance_type", "tol", "reg_covar", "max_iter",
                     "n_init", "init_params", "weights_init", "means_init", "precisions_init",
                     "random_state", "warm_start", "verbose", "verbose_interval", "chunk_size",
                     "client", "split_every", "persist", "device", "dtype", "checkpoint",
                     "checkpoint_every", "checkpoint_keep", "weight_concentration_prior",
                     "mean_prior", "mean_precision_prior", "covariance_prior",
                     "degrees_of_freedom_prior", "var_regularization", "cem", "annealing",
                     "annealing_start", "annealing_iter", "stopping_criterion", "on_collapse", "missing",
                     "fit_method", "optimizer", "learning_rate", "learning_rate_schedule",
                     "batch_fraction", "validation_fraction", "n_iter_no_change"])


def test_get_params_defaults_like_sklearn():
    params = dmix.GaussianMixture().get_params()
    assert sorted(params) == ALL_PARAMS
    sk = SkGaussianMixture().get_params()
    for name, value in sk.items():
        assert params[name] == value, name
    assert params["chunk_size"] is None and params["client"] is None
    assert params["split_every"] is None and params["persist"] == "auto"
    assert params["device"] == "cpu" and params["dtype"] is None
    assert params["checkpoint"] is None
    assert (params["checkpoint_every"], params["checkpoint_keep"]) == (1, 3)
    assert dmix.GaussianMixture().get_params(deep=False) == params


def test_set_params_and_clone_round_trip():
    means = np.zeros((2, 3))
    gm = dmix.GaussianMixture(2, covariance_type="diag", means_init=means, random_state=4)
    assert gm.set_params(tol=1e-5, max_iter=300) is gm
    assert gm.tol == 1e-5 and gm.max_iter == 300
    params = gm.get_params()
    twin = sklearn.base.clone(gm)
    assert twin is not gm and type(twin) is dmix.GaussianMixture
    assert twin.get_params().keys() == params.keys()
    for key, value in params.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(twin.get_params()[key], value)
        else:
            assert twin.get_params()[key] == value
    # a fresh estimator from get_params gives the same params
    again = dmix.GaussianMixture(**params)
    assert repr(again) == repr(gm)
    # clone drops fitted state
    gm.fit(np.random.default_rng(0).normal(size=(20, 3)))
    assert hasattr(gm, "means_") and not hasattr(sklearn.base.clone(gm), "means_")


def test_set_params_unknown_name():
    with pytest.raises(InvalidParameterError, match=re.escape(
            "Invalid parameter 'n_clusters' for estimator GaussianMixture. Valid parameters "
            f"are: {ALL_PARAMS!r}.")):
        dmix.GaussianMixture().set_params(n_clusters=3)


def test_repr():
    assert repr(dmix.GaussianMixture()) == "GaussianMixture()"
    assert (repr(dmix.GaussianMixture(3, covariance_type="diag", tol=1e-4))
            == "GaussianMixture(covariance_type='diag', n_components=3, tol=0.0001)")
    assert repr(dmix.GaussianMixture(1, random_state=0)) == "GaussianMixture(random_state=0)"
    assert repr(dmix.GaussianMixture(chunk_size=1000)) == "GaussianMixture(chunk_size=1000)"


# -- not fitted ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "score_samples",
                                    "sample", "bic", "aic"])
def test_not_fitted(method, X):
    gm = dmix.GaussianMixture(2)
    call = getattr(gm, method)
    args = () if method == "sample" else (X,)
    with pytest.raises(NotFittedError, match=re.escape(
            "This GaussianMixture instance is not fitted yet. Call 'fit' with appropriate "
            "arguments before using this estimator.")) as info:
        call(*args)
    assert isinstance(info.value, sklearn.exceptions.NotFittedError)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)


# -- invalid parameters --------------------------------------------------------------------


@pytest.mark.parametrize("params,message", [
    (dict(n_components=0), "The 'n_components' parameter of GaussianMixture must be an int in "
                           "the range [1, inf). Got 0 instead."),
    (dict(n_components=2.0), "The 'n_components' parameter of GaussianMixture must be an int "
                             "in the range [1, inf). Got 2.0 instead."),
    (dict(tol=-1), "The 'tol' parameter of GaussianMixture must be a float in the range "
                   "[0, inf). Got -1 instead."),
    (dict(reg_covar=-1e-6), "The 'reg_covar' parameter of GaussianMixture must be a float in "
                            "the range [0, inf). Got -1e-06 instead."),
    (dict(max_iter=-1), "The 'max_iter' parameter of GaussianMixture must be an int in the "
                        "range [0, inf). Got -1 instead."),
    (dict(n_init=0), "The 'n_init' parameter of GaussianMixture must be an int in the range "
                     "[1, inf). Got 0 instead."),
    (dict(max_iter=True), "The 'max_iter' parameter of GaussianMixture must be an int in the "
                          "range [0, inf). Got True instead."),
    (dict(split_every=1), "The 'split_every' parameter of GaussianMixture must be an int in "
                          "the range [2, inf). Got 1 instead."),
    (dict(covariance_type="bogus"),
     "The 'covariance_type' parameter of GaussianMixture must be a str among ['diag', 'full', "
     "'spherical', 'tied', 'tied_diag', 'tied_full', 'tied_spherical']. Got 'bogus' instead."),
    (dict(init_params="bogus"),
     "The 'init_params' parameter of GaussianMixture must be a str among ['k-means++', "
     "'kmeans', 'random', 'random_from_data']. Got 'bogus' instead."),
    (dict(weights_init=[0.5, 0.5]),
     "The parameter 'weights' should have the shape of (3,), but got (2,)."),
    (dict(weights_init=[0.3, 0.3, 0.3]),
     "The parameter 'weights' should be normalized, but got sum(weights) = 0.90000"),
    (dict(weights_init=[1.2, -0.1, -0.1]),
     "The parameter 'weights' should be in the range [0, 1], but got max value 1.20000, min "
     "value -0.10000"),
    (dict(means_init=np.zeros((2, 2))),
     "The parameter 'means' should have the shape of (3, 2), but got (2, 2)."),
    (dict(means_init=np.zeros((3, 3))),
     "The parameter 'means' should have the shape of (3, 2), but got (3, 3)."),
    (dict(precisions_init=np.stack([np.eye(2)] * 2)),
     "The parameter 'full precision' should have the shape of (3, 2, 2), but got (2, 2, 2)."),
    (dict(precisions_init=np.stack([np.eye(2), np.eye(2), -np.eye(2)])),
     "'full precision' should be symmetric, positive-definite"),
    (dict(precisions_init=np.stack([np.eye(2), np.eye(2), [[1.0, 0.5], [0.0, 1.0]]])),
     "'full precision' should be symmetric, positive-definite"),
    (dict(covariance_type="diag", precisions_init=np.ones((3, 3))),
     "The parameter 'diag precision' should have the shape of (3, 2), but got (3, 3)."),
    (dict(covariance_type="tied", precisions_init=np.eye(3)),
     "The parameter 'tied precision' should have the shape of (2, 2), but got (3, 3)."),
    (dict(covariance_type="spherical", precisions_init=np.array([1.0, 1.0, 0.0])),
     "'spherical precision' should be symmetric, positive-definite"),
])
def test_invalid_parameters(params, message, X):
    gm = dmix.GaussianMixture(**{"n_components": 3, **params})
    with pytest.raises(InvalidParameterError, match="^" + re.escape(message)) as info:
        gm.fit(X)
    assert isinstance(info.value, ValueError)


def test_sample_invalid_n():
    gm = dmix.GaussianMixture(1).fit(data(n=30))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidParameterError, match=re.escape(
                f"Invalid value for 'n_samples': {bad!r}. The sampling requires at least one "
                "sample.")):
            gm.sample(bad)


# -- fit and outputs -----------------------------------------------------------------------


def test_fit_returns_self(X):
    gm = dmix.GaussianMixture(2, random_state=0)
    assert gm.fit(X) is gm
    assert gm.n_features_in_ == 2
    assert gm.weights_.shape == (2,) and gm.means_.shape == (2, 2)
    assert gm.fit_seconds_ > 0


def test_fit_predict_equals_fit_then_predict(X):
    labels = dmix.GaussianMixture(3, random_state=1).fit_predict(X)
    again = dmix.GaussianMixture(3, random_state=1).fit(X).predict(X)
    np.testing.assert_array_equal(labels, again)
    assert labels.shape == (len(X),) and set(np.unique(labels)) == {0, 1, 2}


def test_predict_proba_rows_sum_to_one(fitted, X):
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 3)
    assert np.all(proba >= 0) and np.all(proba <= 1)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fitted.predict(X), proba.argmax(axis=1))


def test_score_is_mean_of_score_samples(fitted, X):
    samples = fitted.score_samples(X)
    assert samples.shape == (len(X),)
    assert fitted.score(X) == pytest.approx(samples.mean(), rel=1e-12)
    # and the fit's lower bound is the score of the parameters entering the last iteration,
    # so the final score is at least as high
    assert fitted.score(X) >= fitted.lower_bound_ - 1e-12


@pytest.mark.parametrize("covariance_type", SK_TYPES)
def test_score_samples_and_proba_match_sklearn_with_same_params(covariance_type, X):
    gm = dmix.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    sk = _sklearn_copy(gm)
    np.testing.assert_allclose(gm.score_samples(X), sk.score_samples(X), rtol=1e-12)
    np.testing.assert_allclose(gm.predict_proba(X), sk.predict_proba(X), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(gm.precisions_, sk.precisions_, rtol=1e-10)


def test_numpy_in_numpy_out(fitted, X):
    for method in ("predict", "predict_proba", "score_samples"):
        assert type(getattr(fitted, method)(X)) is np.ndarray, method
    assert type(fitted.score(X)) is float


def test_dask_and_zarr_in_dask_out(fitted, X, tmp_path):
    path = tmp_path / "x.zarr"
    z = zarr.create_array(path, shape=X.shape, chunks=(40, 2), dtype="f8")
    z[:] = X
    inputs = {"dask": da.from_array(X, chunks=(33, 1)), "zarr": z, "path": path}
    for name, value in inputs.items():
        for method in ("predict", "predict_proba", "score_samples"):
            out = getattr(fitted, method)(value)
            assert isinstance(out, da.Array), (name, method)
            np.testing.assert_allclose(out.compute(), getattr(fitted, method)(X), rtol=1e-12,
                                       atol=1e-15, err_msg=f"{name} {method}")
        assert fitted.score(value) == pytest.approx(fitted.score(X), rel=1e-12)
        assert fitted.bic(value) == pytest.approx(fitted.bic(X), rel=1e-12)


def test_numpy_integer_parameters(X):
    gm = dmix.GaussianMixture(np.int64(2), random_state=np.int64(0), max_iter=np.int32(50),
                              chunk_size=np.int64(10)).fit(X)
    ref = dmix.GaussianMixture(2, random_state=0, max_iter=50, chunk_size=10).fit(X)
    np.testing.assert_allclose(gm.means_, ref.means_, rtol=1e-12)
    assert gm.n_iter_ == ref.n_iter_


def test_numpy_integer_split_every(X):
    """split_every is validated as numbers.Integral, so np.int64 must be accepted end to end."""
    gm = dmix.GaussianMixture(2, random_state=0, split_every=np.int64(3), chunk_size=10).fit(X)
    ref = dmix.GaussianMixture(2, random_state=0, split_every=3, chunk_size=10).fit(X)
    np.testing.assert_allclose(gm.means_, ref.means_, rtol=1e-12)


def test_random_state_instances(X):
    a = dmix.GaussianMixture(3, random_state=np.random.RandomState(7)).fit(X)
    b = dmix.GaussianMixture(3, random_state=np.random.RandomState(7)).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    c = dmix.GaussianMixture(3, random_state=np.random.default_rng(7), n_init=2).fit(X)
    d = dmix.GaussianMixture(3, random_state=np.random.default_rng(7), n_init=2).fit(X)
    np.testing.assert_array_equal(c.means_, d.means_)
    with pytest.raises(ValueError, match="random_state must be None, an int"):
        dmix.GaussianMixture(3, random_state="seed").fit(X)


# -- warm start ----------------------------------------------------------------------------


def test_warm_start_continues_previous_solution(X):
    kw = dict(tol=0.0, init_params="random", random_state=3)
    cold = dmix.GaussianMixture(3, max_iter=10, **kw)
    with pytest.warns(dmix.ConvergenceWarning):
        cold.fit(X)
    warm = dmix.GaussianMixture(3, max_iter=5, warm_start=True, **kw)
    with pytest.warns(dmix.ConvergenceWarning):
        warm.fit(X)
    first = list(warm.lower_bounds_)
    assert warm.n_iter_ == 5
    with pytest.warns(dmix.ConvergenceWarning):
        warm.fit(X)
    assert warm.n_iter_ == 5  # n_iter_ counts this fit's iterations only
    # 5 + 5 warm iterations are the 10 cold ones
    np.testing.assert_allclose(first + warm.lower_bounds_, cold.lower_bounds_, rtol=1e-12)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(warm, name), getattr(cold, name), rtol=1e-12,
                                   atol=1e-14)
    # the bound kept increasing across the two fits
    assert warm.lower_bounds_[0] >= first[-1]
    assert warm.lower_bound_ > first[-1]


def test_warm_start_tol_measured_from_previous_bound(X):
    gm = dmix.GaussianMixture(3, warm_start=True, tol=1e-4, max_iter=300, random_state=0)
    gm.fit(X)
    assert gm.converged_
    previous = gm.lower_bound_
    gm.set_params(n_init=5)  # ignored on a warm start: one run from the previous solution
    gm.fit(X)
    assert gm.converged_ and gm.n_iter_ == 1
    assert abs(gm.lower_bounds_[0] - previous) < 1e-4
    assert gm.lower_bounds_[0] >= previous - 1e-12


def test_no_warm_start_restarts(X):
    gm = dmix.GaussianMixture(3, tol=1e-4, random_state=0).fit(X)
    n_iter = gm.n_iter_
    gm.fit(X)
    assert gm.n_iter_ == n_iter  # same seed, fresh start, same run


# -- verbose ---------------------------------------------------------------------------------


def test_verbose_one(capsys, X):
    gm = dmix.GaussianMixture(3, verbose=1, n_init=2, random_state=0, tol=1e-3).fit(X)
    lines = capsys.readouterr().out.splitlines()
    # the two restarts run side by side (one pass per iteration for both): both start, then
    # both end
    assert lines[:2] == ["Initialization 0", "Initialization 1"]
    pattern = re.compile(r"^Initialization (converged|did not converge)\. time lapse "
                         r"\d+\.\d{5}s\t lower bound -?\d+\.\d{5}\.$")
    assert pattern.match(lines[2])
    assert pattern.match(lines[3])
    assert len(lines) == 4
    assert f"lower bound {gm.lower_bound_:.5f}." in "\n".join(lines)


def test_verbose_two_with_interval(capsys, X):
    gm = dmix.GaussianMixture(3, verbose=2, verbose_interval=2, random_state=0, tol=0.0,
                              max_iter=7)
    with pytest.warns(dmix.ConvergenceWarning):
        gm.fit(X)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Initialization 0"
    iterations = lines[1:-1]
    assert [int(re.match(r"^  Iteration (\d+)\t", line).group(1)) for line in iterations] == [
        2, 4, 6]
    changes = np.diff(gm.lower_bounds_)
    for line, it in zip(iterations, (2, 4, 6), strict=True):
        m = re.match(r"^  Iteration \d+\t time lapse \d+\.\d{5}s\t ll change (-?\d+\.\d{5})$",
                     line)
        assert m, line
        assert m.group(1) == f"{changes[it - 2]:.5f}"
    assert lines[-1].startswith("Initialization did not converge. time lapse ")
    assert lines[-1].endswith(f"\t lower bound {gm.lower_bound_:.5f}.")


def test_verbose_zero_is_silent(capsys, X):
    dmix.GaussianMixture(2, random_state=0).fit(X)
    assert capsys.readouterr().out == ""


# -- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_sample_shapes(covariance_type):
    x = data(n=90, d=3, seed=1)
    gm = dmix.GaussianMixture(3, covariance_type=covariance_type, random_state=2).fit(x)
    xs, labels = gm.sample(11)
    assert xs.shape == (11, 3) and labels.shape == (11,)
    assert xs.dtype == np.float64
    assert np.all(np.diff(labels) >= 0)  # grouped by component
    assert set(labels.tolist()) <= {0, 1, 2}
    one, one_label = gm.sample()
    assert one.shape == (1, 3) and one_label.shape == (1,)


def test_sample_distribution_and_reproducibility():
    x = data(n=300, d=2, seed=2)
    gm = dmix.GaussianMixture(3, random_state=5, covariance_type="full").fit(x)
    xs, labels = gm.sample(60_000)
    a, b = gm.sample(50)
    c, d = gm.sample(50)
    np.testing.assert_array_equal(a, c)  # an int random_state: the same draws each call
    np.testing.assert_array_equal(b, d)
    counts = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(counts, gm.weights_, atol=0.01)
    for k in range(3):
        part = xs[labels == k]
        np.testing.assert_allclose(part.mean(0), gm.means_[k], atol=0.05)
        np.testing.assert_allclose(np.cov(part.T), gm.covariances_[k], atol=0.06)


# -- BIC and AIC -----------------------------------------------------------------------------


def _sklearn_copy(gm):
    sk = SkGaussianMixture(gm.n_components, covariance_type=gm.covariance_type)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        setattr(sk, name, getattr(gm, name))
    sk.converged_, sk.n_iter_, sk.lower_bound_ = True, gm.n_iter_, gm.lower_bound_
    sk.n_features_in_ = gm.n_features_in_
    return sk


@pytest.mark.parametrize("covariance_type", SK_TYPES)
def test_bic_aic_match_sklearn(covariance_type, X):
    gm = dmix.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    sk = _sklearn_copy(gm)
    assert gm.bic(X) == pytest.approx(sk.bic(X), rel=1e-12)
    assert gm.aic(X) == pytest.approx(sk.aic(X), rel=1e-12)
    # a dmix optimum is a scikit-learn fixed point: EM from it moves the bound by < 1e-8
    tight = dmix.GaussianMixture(3, covariance_type=covariance_type, random_state=0, tol=1e-10,
                                 max_iter=2000).fit(X)
    assert tight.converged_
    ref = SkGaussianMixture(3, covariance_type=covariance_type, tol=1e-10, max_iter=2000,
                            means_init=tight.means_, weights_init=tight.weights_,
                            precisions_init=tight.precisions_).fit(X)
    assert ref.lower_bound_ == pytest.approx(tight.lower_bound_, abs=1e-8)
    np.testing.assert_allclose(ref.means_, tight.means_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance_type,n_cov", [("tied_diag", 2), ("tied_spherical", 1)])
def test_bic_aic_tied_diag_and_tied_spherical(covariance_type, n_cov, X):
    gm = dmix.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    n, d, k = X.shape[0], 2, 3
    cov = np.diag(np.broadcast_to(gm.covariances_, (d,)))
    density = sum(w * multivariate_normal(m, cov).pdf(X)
                  for w, m in zip(gm.weights_, gm.means_, strict=True))
    loglik = np.log(density).sum()
    np.testing.assert_allclose(gm.score_samples(X), np.log(density), rtol=1e-12)
    p = n_cov + k * d + k - 1
    assert gm.bic(X) == pytest.approx(-2 * loglik + p * math.log(n), rel=1e-12)
    assert gm.aic(X) == pytest.approx(-2 * loglik + 2 * p, rel=1e-12)


# -- scikit-learn interoperability and non-finite input at predict time -----------------------


def test_works_with_sklearn_model_selection(X):
    from sklearn.model_selection import KFold, cross_val_score

    cv = KFold(3, shuffle=True, random_state=0)
    scores = cross_val_score(dmix.GaussianMixture(3, random_state=0), X, cv=cv)
    expected = [dmix.GaussianMixture(3, random_state=0).fit(X[train]).score(X[test])
                for train, test in cv.split(X)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score_samples"])
def test_non_finite_input_at_predict_raises(fitted, method):
    x = data(n=12)
    x[5, 0] = np.nan
    with pytest.raises(DataError, match="Input X contains NaN or infinity"):
        getattr(fitted, method)(x)
