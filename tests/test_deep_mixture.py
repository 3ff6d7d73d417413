"""The deep estimators on real data and their option errors (the engine features are in
test_estimator_families.py, the maths in families/test_deep.py)."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.metrics import adjusted_rand_score

import dmix
from dmix.errors import InvalidParameterError


def _wine():
    x, y = load_wine(return_X_y=True)
    return (x - x.mean(0)) / x.std(0), y


@pytest.mark.parametrize("cls", [dmix.DeepGaussianMixture, dmix.GaussianMixtureNetwork])
def test_wine_clusters(cls):
    x, y = _wine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(layer_sizes=(3, 1), layer_dims=(3, 2), n_init=5, max_iter=200,
                    random_state=0).fit(x)
    # Measured 0.982 for both (the mixes package reports 0.975 for its DGMM; scikit-learn's
    # GaussianMixture(3, n_init=5) gives 0.90 here).
    assert adjusted_rand_score(y, model.predict(x)) >= 0.95
    assert model.weights_.shape == (3,) and model.means_.shape == (3, 13)
    np.testing.assert_allclose(model.weights_.sum(), 1.0, rtol=1e-12)
    # cluster means are the posterior-weighted data means at a fixed point of EM (to its tol)
    proba = model.predict_proba(x)
    np.testing.assert_allclose(model.means_, proba.T @ x / proba.sum(0)[:, None], atol=0.05)


def test_layer_errors_name_the_values():
    x, _ = _wine()
    with pytest.raises(InvalidParameterError, match=r"13.*r_1 = 13"):
        dmix.DeepGaussianMixture(layer_sizes=(3, 1), layer_dims=(13, 2)).fit(x)
    with pytest.raises(InvalidParameterError, match=r"600 paths.*512"):
        dmix.DeepGaussianMixture(layer_sizes=(3, 10, 20), layer_dims=(3, 2, 1)).fit(x)
    with pytest.raises(InvalidParameterError, match="non-increasing"):
        dmix.GaussianMixtureNetwork(layer_sizes=(3, 2), layer_dims=(2, 3)).fit(x)
    with pytest.raises(InvalidParameterError, match="'kmeans' or 'random'"):
        dmix.DeepGaussianMixture(init_params="k-means++").fit(x)


def test_default_layer_dims_halve_from_d_minus_one():
    x, _ = _wine()
    model = dmix.DeepGaussianMixture(layer_sizes=(2, 2, 1), max_iter=2,
                                     random_state=0).fit(x)
    assert model._family.layer_dims == (12, 6, 3)
    assert model.params_["layer2/loadings"].shape == (1, 6, 3)
