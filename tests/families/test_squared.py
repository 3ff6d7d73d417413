"""The maths of squared (subtractive) Gaussian mixtures: the normaliser against numerical
integration, a density that is non-negative and integrates to 1, and every analytic gradient
against central finite differences in float64."""

import numpy as np
import pytest

from dmix.families.squared import log_f_and_gradient, log_normalizer, squared_log_density


def _params(k=3, d=2, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.array([1.0, -0.6, 0.8])[:k]  # one negative weight
    means = rng.normal(size=(k, d))
    chols = np.tril(rng.normal(scale=0.3, size=(k, d, d)))
    chols[:, np.arange(d), np.arange(d)] = rng.uniform(0.6, 1.3, size=(k, d))
    return weights, means, chols


def _grid(lo=-9.0, hi=9.0, n=901):
    t = np.linspace(lo, hi, n)
    xx, yy = np.meshgrid(t, t, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1), (t[1] - t[0]) ** 2


def test_normaliser_and_density_against_numerical_integration():
    w, mu, chol = _params()
    grid, area = _grid()
    log_abs_f, _ = log_f_and_gradient(w, mu, chol, grid)
    z_numeric = np.sum(np.exp(2.0 * log_abs_f)) * area
    log_z, _ = log_normalizer(w, mu, chol)
    assert np.exp(log_z) == pytest.approx(z_numeric, rel=1e-6)
    p = np.exp(squared_log_density(w, mu, chol, grid))
    assert np.all(p >= 0)
    assert np.sum(p) * area == pytest.approx(1.0, rel=1e-6)


def _fd(fn, value, eps=1e-6, mask=None):
    """Central differences of the scalar ``fn(value)`` for every entry (of ``mask``)."""
    grad = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
        if mask is not None and not mask[idx]:
            continue
        up, down = value.copy(), value.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (fn(up) - fn(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("d", [1, 2, 3])
def test_gradients_against_finite_differences(d):
    w, mu, chol = _params(d=d, seed=d)
    x = np.random.default_rng(5).normal(size=(40, d)) * 1.5

    def loglik(wv, mv, lv):
        return float(np.sum(squared_log_density(wv, mv, lv, x)))

    _, g_f = log_f_and_gradient(w, mu, chol, x)
    _, g_z = log_normalizer(w, mu, chol)
    analytic = {key: g_f[key] - len(x) * g_z[key] for key in g_f}
    lower = np.broadcast_to(np.tril(np.ones((d, d), dtype=bool)), chol.shape)
    numeric = {
        "weights": _fd(lambda v: loglik(v, mu, chol), w),
        "means": _fd(lambda v: loglik(w, v, chol), mu),
        "chols": _fd(lambda v: loglik(w, mu, v), chol, mask=lower),
    }
    for key in analytic:
        scale = np.max(np.abs(numeric[key]))
        np.testing.assert_allclose(analytic[key], numeric[key], rtol=1e-6,
                                   atol=1e-6 * scale, err_msg=key)
    # and log Z's own gradient
    numeric_z = _fd(lambda v: log_normalizer(v, mu, chol)[0], w)
    np.testing.assert_allclose(g_z["weights"], numeric_z, rtol=1e-6, atol=1e-9)


def test_row_sums_do_not_depend_on_the_chunking():
    w, mu, chol = _params()
    x = np.random.default_rng(2).normal(size=(500, 2)) * 2
    whole = log_f_and_gradient(w, mu, chol, x)
    parts = [log_f_and_gradient(w, mu, chol, piece) for piece in np.split(x, [1, 77, 300])]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole[0], rtol=1e-13)
    for key in whole[1]:
        np.testing.assert_allclose(sum(p[1][key] for p in parts), whole[1][key], rtol=1e-11,
                                   atol=1e-12)


def test_a_zero_of_f_is_minus_infinity_and_adds_no_gradient():
    w = np.array([1.0, -1.0])
    mu = np.array([[0.0], [0.0]])
    chol = np.array([[[1.0]], [[1.0]]])
    log_abs_f, grads = log_f_and_gradient(w, mu + [[0.0], [1e-300]], chol, np.zeros((1, 1)))
    assert log_abs_f[0] == -np.inf
    assert all(np.all(np.isfinite(v)) for v in grads.values())
