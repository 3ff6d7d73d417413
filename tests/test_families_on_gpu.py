"""The skew-normal, deep, squared and gradient-trained Gaussian families on a GPU
(``device='cuda'``): the same fits as on the CPU. Marked ``gpu``: skipped where CuPy finds no CUDA GPU (conftest.py)."""

import warnings

import numpy as np
import pytest

import dmix


def _data():
    rng = np.random.default_rng(3)
    parts = [c + rng.normal(size=(3000, 3)) * [1.0, 0.7, 0.5] for c in
             ([0.0, 0.0, 0.0], [5.0, 1.0, 1.0], [1.0, 6.0, 6.0])]
    x = np.concatenate(parts)
    x[:, 0] += np.abs(rng.normal(size=len(x)))  # skewed
    return x


ESTIMATORS = [
    lambda **kw: dmix.SkewNormalMixture(3, **kw),
    lambda **kw: dmix.DeepGaussianMixture((3, 2), (2, 1), **kw),
    lambda **kw: dmix.GaussianMixtureNetwork((3, 2), (2, 1), **kw),
    lambda **kw: dmix.SquaredGaussianMixture(3, learning_rate=0.03, **kw),
    lambda **kw: dmix.SquaredGaussianMixture(3, covariance_type="diag", optimizer="lbfgs",
                                             validation_fraction=0.2, **kw),
    # L-BFGS: Adam's first steps are about lr * sign(gradient), so entries whose gradient is
    # near zero follow the rounding of the device's sums (measured on an H200: Adam's
    # float64 bounds differed from the CPU's by 4e-5 after two steps; the squared mixtures'
    # by less than 1e-10).
    lambda **kw: dmix.GaussianMixture(3, fit_method="gradient", covariance_type="tied",
                                      optimizer="lbfgs", **kw),
]


@pytest.mark.gpu
@pytest.mark.parametrize("make", ESTIMATORS, ids=["skew", "dgmm", "gmn", "squared",
                                                  "squared-diag-lbfgs-heldout", "gmm-gradient"])
def test_gpu_fit_matches_cpu_fit(make):
    x = _data()
    options = dict(random_state=0, max_iter=15, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = make(**options).fit(x)
        gpu = make(device="cuda", dtype="float64", **options).fit(x)
    np.testing.assert_allclose(gpu.lower_bounds_, cpu.lower_bounds_, rtol=1e-10)
    for key, value in cpu._params.items():
        np.testing.assert_allclose(gpu._params[key], value, rtol=1e-8, atol=1e-10,
                                   err_msg=key)
    np.testing.assert_allclose(gpu.predict_proba(x), cpu.predict_proba(x), atol=1e-8)


@pytest.mark.gpu
def test_gpu_unrestricted_skew_normal_says_it_needs_the_cpu():
    with pytest.raises(NotImplementedError, match="device='cpu'"):
        dmix.SkewNormalMixture(2, form="unrestricted", device="cuda",
                               random_state=0).fit(_data()[:, :2])
