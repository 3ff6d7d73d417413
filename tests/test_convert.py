"""dmix.convert: fitted models to and from scikit-learn."""

import sys

import numpy as np
import pytest
from sklearn import mixture

from dmix import COVARIANCE_TYPES, GaussianMixture
from dmix.convert import SKLEARN_TYPE, from_sklearn, to_sklearn
from dmix.errors import InvalidParameterError, NotFittedError

PARAMS = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")
SCALARS = ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "n_features_in_")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return np.concatenate([rng.normal(c, [1.0, 0.5, 2.0], (100, 3)) for c in (-4, 0, 4)])


@pytest.fixture(scope="module")
def models(data):
    return {ct: GaussianMixture(n_components=3, covariance_type=ct, random_state=0,
                                max_iter=50).fit(data)
            for ct in COVARIANCE_TYPES}


def _assert_same_predictions(a, b, data):
    np.testing.assert_allclose(a.score_samples(data), b.score_samples(data), rtol=1e-10)
    np.testing.assert_allclose(a.predict_proba(data), b.predict_proba(data), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_array_equal(a.predict(data), b.predict(data))


@pytest.mark.parametrize("cov_type", list(COVARIANCE_TYPES))
def test_to_sklearn(models, data, cov_type):
    est = models[cov_type]
    sk = to_sklearn(est)
    assert type(sk) is mixture.GaussianMixture
    assert sk.covariance_type == SKLEARN_TYPE[cov_type]
    assert sk.get_params() == {**{k: v for k, v in est.get_params().items()
                                  if k in sk.get_params()},
                               "covariance_type": SKLEARN_TYPE[cov_type]}
    for name in SCALARS:
        assert getattr(sk, name) == getattr(est, name), name
    _assert_same_predictions(est, sk, data)
    # scikit-learn's own consistency: its precisions from its Cholesky factors.
    ref = mixture.GaussianMixture(3, covariance_type=sk.covariance_type)
    ref.n_features_in_ = 3
    ref._set_parameters((sk.weights_, sk.means_, sk.covariances_, sk.precisions_cholesky_))
    np.testing.assert_allclose(ref.precisions_, sk.precisions_, rtol=1e-14)
    np.testing.assert_allclose(sk.score(data), est.score(data), rtol=1e-10)


def test_tied_types_become_sklearn_types(models):
    d = 3
    sk = to_sklearn(models["tied_diag"])
    assert sk.covariances_.shape == (d, d)
    np.testing.assert_array_equal(sk.covariances_, np.diag(models["tied_diag"].covariances_))
    sk = to_sklearn(models["tied_spherical"])
    assert sk.covariances_.shape == (3,)
    assert np.all(sk.covariances_ == float(models["tied_spherical"].covariances_))


@pytest.mark.parametrize("cov_type", list(COVARIANCE_TYPES))
def test_sklearn_round_trip(models, data, cov_type):
    est = models[cov_type]
    kwargs = {} if SKLEARN_TYPE[cov_type] == cov_type else {"covariance_type": cov_type}
    back = from_sklearn(to_sklearn(est), **kwargs)
    assert type(back) is GaussianMixture and back.get_params() == est.get_params()
    for name in PARAMS + SCALARS:
        np.testing.assert_array_equal(getattr(back, name), getattr(est, name), err_msg=name)
    np.testing.assert_array_equal(back.score_samples(data), est.score_samples(data))
    assert back.bic(data) == est.bic(data)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_from_sklearn(data, cov_type):
    sk = mixture.GaussianMixture(3, covariance_type=cov_type, tol=1e-4, reg_covar=1e-5,
                                 max_iter=60, init_params="k-means++", random_state=3).fit(data)
    est = from_sklearn(sk, chunk_size=100)
    assert est.chunk_size == 100
    for name in ("n_components", "covariance_type", "tol", "reg_covar", "max_iter",
                 "init_params", "random_state"):
        assert getattr(est, name) == getattr(sk, name), name
    for name in PARAMS:
        np.testing.assert_allclose(getattr(est, name), getattr(sk, name), rtol=1e-12,
                                   err_msg=name)
    for name in SCALARS:
        assert getattr(est, name) == getattr(sk, name), name
    _assert_same_predictions(est, sk, data)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_from_sklearn_keeps_initial_parameters(data):
    means = np.array([[-4.0, -4, -4], [0, 0, 0], [4, 4, 4]])
    sk = mixture.GaussianMixture(3, covariance_type="tied", means_init=means,
                                 precisions_init=np.diag([1.0, 2, 3]), max_iter=5).fit(data)
    est = from_sklearn(sk)
    np.testing.assert_array_equal(est.means_init, means)
    sk2 = to_sklearn(GaussianMixture(3, covariance_type="tied_diag",
                                     precisions_init=np.array([1.0, 2, 3]), max_iter=5)
                     .fit(data))
    np.testing.assert_array_equal(sk2.precisions_init, np.diag([1.0, 2, 3]))
    back = from_sklearn(sk2, covariance_type="tied_diag")
    np.testing.assert_array_equal(back.precisions_init, [1.0, 2, 3])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_refusals(data, models):
    with pytest.raises(NotFittedError, match="not fitted"):
        to_sklearn(GaussianMixture(3))
    with pytest.raises(NotFittedError, match="not fitted"):
        from_sklearn(mixture.GaussianMixture(3))
    with pytest.raises(InvalidParameterError, match="BayesianGaussianMixture"):
        from_sklearn(mixture.BayesianGaussianMixture(n_components=2, max_iter=5).fit(data))
    sk = to_sklearn(models["full"])
    with pytest.raises(InvalidParameterError, match="n_components"):
        from_sklearn(sk, n_components=4)
    with pytest.raises(InvalidParameterError, match=r"'full'.*'diag'.*\['full'\]"):
        from_sklearn(sk, covariance_type="diag")
    with pytest.raises(InvalidParameterError, match="not a diagonal matrix"):
        from_sklearn(to_sklearn(models["tied"]), covariance_type="tied_diag")
    with pytest.raises(InvalidParameterError, match="not all equal"):
        from_sklearn(to_sklearn(models["spherical"]), covariance_type="tied_spherical")


def test_without_sklearn(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        to_sklearn(models["full"])
    with pytest.raises(ImportError, match="needs scikit-learn"):
        from_sklearn(object())
