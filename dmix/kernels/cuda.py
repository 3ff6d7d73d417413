"""Fused CuPy kernels; :mod:`dmix.kernels.reference` has their plain-array twins.

Each kernel is compiled on first use in each worker process (and cached on disk by CuPy under
``CUPY_CACHE_DIR``); kernel objects never travel through the Dask graph. Inputs are C-contiguous
arrays of float32 or float64.
"""

from __future__ import annotations

import functools

import cupy
import numpy as np

from dmix.kernels.reference import exp_floor

# One thread per row: K reads for the maximum, K for the exponentials, K writes. The array
# code makes seven passes over the (K, n) array (max, subtract, clamp, exp, sum, divide, log).
_NORMALIZE = r"""
extern "C" __global__ void dmix_normalize_log(
        const REAL* a, REAL* out, REAL* lognorm, const long long n, const long long k,
        const long long sk, const long long sj, const REAL floor_) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const REAL* src = a + j * sj;
    REAL* dst = out + j * sj;
    REAL amax = NEG_INF;
    bool has_nan = false;
    for (long long c = 0; c < k; ++c) {
        const REAL v = src[c * sk];
        if (v != v) has_nan = true;
        else if (v > amax) amax = v;
    }
    if (has_nan) amax = QNAN;
    const REAL shift = isfinite(amax) ? amax : (REAL)0;  // a row of -inf: shift by 0
    REAL total = 0;
    for (long long c = 0; c < k; ++c) {
        REAL v = src[c * sk] - shift;
        if (v < floor_) v = floor_;  // nan compares false and stays nan
        v = exp(v);
        dst[c * sk] = v;
        total += v;
    }
    for (long long c = 0; c < k; ++c) dst[c * sk] = dst[c * sk] / total;
    lognorm[j] = log(total) + amax;
}
"""

_CONSTANTS = {
    "float": ("__int_as_float(0xff800000)", "__int_as_float(0x7fc00000)"),
    "double": ("__longlong_as_double(0xfff0000000000000LL)",
               "__longlong_as_double(0x7ff8000000000000LL)"),
}
_THREADS = 256


@functools.cache
def _normalize_kernel(real: str) -> cupy.RawKernel:
    neg_inf, nan = _CONSTANTS[real]
    code = (f"#define REAL {real}\n#define NEG_INF {neg_inf}\n#define QNAN {nan}\n"
            + _NORMALIZE)
    return cupy.RawKernel(code, "dmix_normalize_log")


def _real(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"dmix's CUDA kernels take float32 or float64 arrays, not {dtype}.")


def normalize_log(wlp, out, axis: int = 1):
    """Fused :func:`dmix.kernels.reference.normalize_log` of a 2-D C-contiguous array."""
    if wlp.ndim != 2 or not wlp.flags.c_contiguous or not out.flags.c_contiguous:
        raise ValueError("normalize_log's CUDA kernel takes 2-D C-contiguous arrays.")
    if out.shape != wlp.shape or out.dtype != wlp.dtype:
        raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; "
                         f"expected {wlp.shape} and {wlp.dtype}.")
    axis = axis % 2
    k, n = (wlp.shape[0], wlp.shape[1]) if axis == 0 else (wlp.shape[1], wlp.shape[0])
    # Element (component c, row j) sits at c * sk + j * sj.
    sk, sj = (n, 1) if axis == 0 else (1, k)
    lognorm = cupy.empty(n, dtype=wlp.dtype)
    if n:
        scalar = wlp.dtype.type
        _normalize_kernel(_real(wlp.dtype))(
            ((n + _THREADS - 1) // _THREADS,), (_THREADS,),
            (wlp, out, lognorm, np.int64(n), np.int64(k), np.int64(sk), np.int64(sj),
             scalar(exp_floor(wlp.dtype))))
    return lognorm


@functools.cache
def _quadratic_kernel() -> cupy.ElementwiseKernel:
    # Output element (p, j) of the packed products: x[ia[p], j] * x[ib[p], j].
    return cupy.ElementwiseKernel(
        "raw T xt, raw int32 ia, raw int32 ib, int64 n", "T out",
        "const long long p = i / n; const long long j = i - p * n;"
        "out = xt[ia[p] * n + j] * xt[ib[p] * n + j];",
        "dmix_quadratic_features")


@functools.cache
def _pair_indices(d: int, device: int):
    rows, cols = np.triu_indices(d)
    with cupy.cuda.Device(device):
        return cupy.asarray(rows, dtype=cupy.int32), cupy.asarray(cols, dtype=cupy.int32)


def quadratic_features_full(xt, out) -> None:
    """Fused :func:`dmix.kernels.reference.quadratic_features_full`: one launch for all
    ``D (D + 1) / 2`` rows instead of ``D`` broadcast products."""
    d, n = xt.shape
    if out.shape != (d * (d + 1) // 2, n) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous of shape {(d * (d + 1) // 2, n)}.")
    ia, ib = _pair_indices(d, xt.device.id)
    _quadratic_kernel()(cupy.ascontiguousarray(xt).ravel(), ia, ib, np.int64(n), out)


@functools.cache
def _sq_norm_kernel() -> cupy.ReductionKernel:
    return cupy.ReductionKernel("T y", "T z", "y * y", "a + b", "z = a", "0",
                                "dmix_row_sq_norms")


def row_sq_norms(y, out=None):
    """Fused :func:`dmix.kernels.reference.row_sq_norms`: the squares are summed as they are
    read, with no (n, K, D) temporary of squares."""
    if out is None:
        return _sq_norm_kernel()(y, axis=2)
    return _sq_norm_kernel()(y, axis=2, out=out)
