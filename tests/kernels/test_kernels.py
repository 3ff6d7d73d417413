"""The E-step kernels: reference twins against float64 references (everywhere), the fused CuPy
kernels against their twins (on a GPU, tests marked ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from dmix.kernels import exp_floor, reference
from dmix.xp import Compute

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-13, np.float32: 2e-6}


def log_probs(n=300, k=7, seed=0, dtype=np.float64):
    """(k, n) weighted log-probabilities with a spread typical of an E-step, and special rows:
    one of -inf (a row no component explains), one with a nan, one with a +inf, one with
    entries 1000 below the rest (their exp underflows)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(-30, 20, size=(k, n))
    a[:, 0] = -np.inf
    a[2, 1] = np.nan
    a[3, 2] = np.inf
    a[1:, 3] = a[0, 3] - 1000.0
    return a.astype(dtype)


# -- the twins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1])
def test_normalize_log_matches_scipy(dtype, axis):
    a = log_probs(dtype=dtype)
    if axis == 1:
        a = np.ascontiguousarray(a.T)
    out = np.empty_like(a)
    with np.errstate(invalid="ignore"):  # the nan and inf rows
        lognorm = reference.normalize_log(a, out, np, axis=axis)
    assert lognorm.dtype == dtype and out.dtype == dtype
    ok = np.ones(a.shape[1 - axis], bool)
    ok[:3] = False  # -inf, nan and +inf rows: non-finite, for the caller to count
    assert not np.isfinite(lognorm[~ok]).any()
    ref = a.astype(np.float64)
    ref_lognorm = logsumexp(ref, axis=axis)
    take = (slice(None), ok) if axis == 0 else (ok, slice(None))
    np.testing.assert_allclose(lognorm[ok], ref_lognorm[ok], rtol=TOL[dtype])
    # Responsibilities: softmax, except that entries more than the floor below their row's
    # maximum count as that far below (a tiny normal number instead of an underflow to 0).
    shifted = np.maximum(ref[take] - ref[take].max(axis=axis, keepdims=True), exp_floor(dtype))
    np.testing.assert_allclose(out[take], softmax(shifted, axis=axis), rtol=10 * TOL[dtype])
    np.testing.assert_allclose(out[take], softmax(ref[take], axis=axis), rtol=10 * TOL[dtype],
                               atol=2 * np.exp(exp_floor(dtype)))
    np.testing.assert_allclose(out[take].sum(axis=axis), 1.0, rtol=10 * TOL[dtype])


def test_normalize_log_in_place_and_floor():
    a = log_probs()
    expected = np.empty_like(a)
    same = a.copy()
    with np.errstate(invalid="ignore"):  # the nan and inf rows
        lognorm = reference.normalize_log(a, expected, np, axis=0)
        np.testing.assert_array_equal(reference.normalize_log(same, same, np, axis=0), lognorm)
    np.testing.assert_array_equal(same, expected)
    # The entries 1000 below their row's maximum: the floor's normal number, not 0.
    assert np.all(expected[1:, 3] == np.exp(-700.0)) and expected[1, 3] > 0
    assert exp_floor(np.float32) == -87.0 and np.exp(np.float32(-87.0)) > np.finfo(np.float32).tiny


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_quadratic_features_full(dtype, d):
    xt = np.random.default_rng(d).normal(size=(d, 50)).astype(dtype)
    out = np.full((d * (d + 1) // 2, 50), np.nan, dtype=dtype)
    reference.quadratic_features_full(xt, out, np)
    rows, cols = np.triu_indices(d)
    np.testing.assert_array_equal(out, xt[rows] * xt[cols])


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sq_norms(dtype):
    y = np.random.default_rng(1).normal(size=(40, 6, 9)).astype(dtype)
    out = np.empty((40, 6), dtype)
    got = reference.row_sq_norms(y, np, out=out)
    assert got is out
    np.testing.assert_allclose(out, (y.astype(np.float64) ** 2).sum(-1), rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("device, dtype, expected", [
    ("cpu", None, Compute("cpu", "float64")), ("cuda", None, Compute("cuda", "float32")),
    ("cuda", "float64", Compute("cuda", "float64")), ("cpu", np.float32, Compute("cpu", "float32")),
    ("cpu", "f4", Compute("cpu", "float32")),
])
def test_compute_options(device, dtype, expected):
    assert Compute.from_options(device, dtype) == expected


@pytest.mark.parametrize("device, dtype, match", [
    ("gpu", None, "device must be one of .*'gpu'"), ("cuda:1", None, "'cuda:1'"),
    ("cpu", "float16", "'float16'"), ("cpu", "banana", "'banana'"), ("cpu", int, "int"),
])
def test_compute_options_errors_name_the_value(device, dtype, match):
    with pytest.raises(ValueError, match=match):
        Compute.from_options(device, dtype)


# -- the fused CUDA kernels against the twins --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k, n", [(7, 300), (1, 5), (64, 100_003), (1024, 2_000)])
def test_cuda_normalize_log(dtype, axis, k, n):
    import cupy

    from dmix.kernels import cuda

    a = log_probs(n=n, k=k, seed=k + n, dtype=dtype) if k > 3 else (
        np.random.default_rng(n).normal(-30, 20, size=(k, n)).astype(dtype))
    if axis == 1:
        a = np.ascontiguousarray(a.T)
    want_out = np.empty_like(a)
    with np.errstate(invalid="ignore"):  # the nan and inf rows
        want = reference.normalize_log(a, want_out, np, axis=axis)
    dev = cupy.asarray(a)
    got_out = cupy.empty_like(dev)
    got = cuda.normalize_log(dev, got_out, axis=axis)
    # The log-normaliser ``max + log sum exp(a - max)`` errs by a few units of ``|max|``'s
    # last place: an absolute error, which is large relative to values near 0 (measured on an
    # H200 in float32: 1.5e-7 at a value of 1e-3). The GPU flushes results below the smallest
    # normal number to zero.
    scale = np.max(np.abs(a[np.isfinite(a)]), initial=1.0)
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    np.testing.assert_allclose(got.get(), want, rtol=TOL[dtype] * 4, atol=4 * eps * scale,
                               equal_nan=True)
    np.testing.assert_allclose(got_out.get(), want_out, rtol=TOL[dtype] * 16, atol=2 * tiny,
                               equal_nan=True)
    # In place, through the dispatching function the families call.
    from dmix.kernels import normalize_log

    same = dev.copy()
    np.testing.assert_array_equal(normalize_log(same, same, cupy, axis=axis).get(), got.get())
    np.testing.assert_array_equal(same.get(), got_out.get())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 64, 128])
def test_cuda_quadratic_features_full(dtype, d):
    import cupy

    from dmix.kernels import cuda

    xt = np.random.default_rng(d).normal(size=(d, 1001)).astype(dtype)
    want = np.empty((d * (d + 1) // 2, 1001), dtype)
    reference.quadratic_features_full(xt, want, np)
    got = cupy.full(want.shape, cupy.nan, dtype=dtype)
    cuda.quadratic_features_full(cupy.asarray(xt), got)
    np.testing.assert_array_equal(got.get(), want)  # one rounding of one product: exact


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_row_sq_norms(dtype):
    import cupy

    from dmix.kernels import cuda

    y = np.random.default_rng(2).normal(size=(5000, 32, 64)).astype(dtype)
    want = reference.row_sq_norms(y, np)
    out = cupy.empty((5000, 32), dtype)
    got = cuda.row_sq_norms(cupy.asarray(y), out=out)
    np.testing.assert_allclose(got.get(), want, rtol=TOL[dtype] * 50)
    np.testing.assert_allclose(out.get(), want, rtol=TOL[dtype] * 50)


@pytest.mark.gpu
@pytest.mark.parametrize("src_dtype, dtype", [(np.float64, np.float32), (np.float32, np.float32),
                                              (np.float64, np.float64)])
@pytest.mark.parametrize("n, rows", [(10_000, 1_024), (1_000, 5_000), (0, 64), (4_097, 4_096)])
def test_device_batches_stream_every_row_once(src_dtype, dtype, n, rows):
    """The double-buffered host-to-device stream yields exactly the rows, in order, cast; a
    batch is read before the next is requested, as the engine does."""
    import cupy

    from dmix.kernels.transfer import device_batches

    x = np.random.default_rng(n).normal(size=(n, 7)).astype(src_dtype)
    got = [cupy.asnumpy(b) * 1 for b in device_batches(x, rows, dtype)]
    assert all(g.dtype == dtype for g in got)
    np.testing.assert_array_equal(np.concatenate(got), x.astype(dtype))
    # A device-resident block is sliced and cast, not copied through the host.
    got = [b.get() for b in device_batches(cupy.asarray(x), rows, dtype)]
    np.testing.assert_array_equal(np.concatenate(got), x.astype(dtype))
