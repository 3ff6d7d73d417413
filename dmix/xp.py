"""Array-namespace helpers: the only module that branches on NumPy versus CuPy.

Family code receives the namespace ``xp`` of the block it works on and calls the helpers here
for what the array API lacks (``logsumexp``) or spells differently between backends.
"""

from __future__ import annotations

import contextlib

import numpy as np

__all__ = [
    "Workspace",
    "asarray_f64",
    "get_namespace",
    "is_cupy",
    "logsumexp",
    "normalize_log",
    "quiet_nonfinite",
    "to_host",
]


def is_cupy(x) -> bool:
    """Whether ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_namespace(x):
    """Return the array module (``numpy`` or ``cupy``) that owns ``x``."""
    if is_cupy(x):
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """Copy ``x`` to a NumPy array on the host (no copy when it already is one)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def asarray_f64(x, xp):
    """``x`` as a float64 array of namespace ``xp`` (no copy when it already is one)."""
    return xp.asarray(x, dtype=xp.float64)


def quiet_nonfinite(xp):
    """A context in which NumPy does not warn about inf or nan arising in arithmetic.

    The E-step counts rows whose log-density is not finite and raises an error naming them;
    NumPy's RuntimeWarnings about the same rows would only be noise before it. (CuPy does not
    warn.)
    """
    if xp is np:
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")
    return contextlib.nullcontext()


def logsumexp(a, axis: int, xp):
    """``log(sum(exp(a), axis))`` with the maximum subtracted first.

    Rows whose entries are all ``-inf`` give ``-inf``; a ``nan`` or ``+inf`` propagates, so the
    caller can count non-finite rows from the result.
    """
    amax = xp.max(a, axis=axis, keepdims=True)
    # A row of -inf has max -inf; subtracting it would give nan, so shift by 0 there.
    amax = xp.where(xp.isfinite(amax), amax, 0.0)
    out = xp.log(xp.sum(xp.exp(a - amax), axis=axis, keepdims=True)) + amax
    return xp.squeeze(out, axis=axis)


class Workspace:
    """Scratch arrays reused across the sub-batches of one block.

    Allocating a fresh multi-megabyte temporary per sub-batch is slow on Dask workers: the
    Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which turns off glibc's adaptive mmap threshold, so
    every such array is mmapped, page-faulted and unmapped again (measured here: 4x slower
    E-steps). Methods that take a workspace write their large temporaries into its buffers.
    """

    def __init__(self):
        self._flat: dict = {}
        self._memo: dict = {}

    def take(self, name: str, shape: tuple, xp, dtype=None):
        """An uninitialised array of ``shape`` backed by the buffer called ``name``."""
        dtype = xp.float64 if dtype is None else dtype
        size = 1
        for s in shape:
            size *= int(s)
        buf = self._flat.get(name)
        if buf is None or buf.size < size or get_namespace(buf) is not xp or buf.dtype != dtype:
            buf = xp.empty(max(size, 1), dtype=dtype)
            self._flat[name] = buf
        return buf[:size].reshape(shape)

    def memo(self, name: str, key, compute):
        """``compute()``, cached until it is asked for with another ``key`` object.

        Per-parameter constants (precision matrices, coefficient tables) are computed once per
        block, not once per sub-batch: the engine passes the same parameters object to every
        sub-batch, and identity (``is``) decides whether the cached value still holds.
        """
        held = self._memo.get(name)
        if held is None or held[0] is not key:
            held = (key, compute())
            self._memo[name] = held
        return held[1]


#: Floor of the shifted log-probabilities before ``exp``: ``exp(-700) = 1e-304`` is still a
#: normal float64. Below about -708 the results are subnormal or underflow, and NumPy's exp then
#: leaves its vector path: measured here 20-30x slower per element, which made the E-step of
#: well-separated mixtures (most entries far below -745) 30% slower. A responsibility of
#: 1e-304 instead of 0 changes no sum by more than 1e-300 relative.
EXP_FLOOR = -700.0


def normalize_log(wlp, out, xp, axis: int = 1):
    """Responsibilities and log-normaliser from weighted log-probabilities, in one sweep.

    Along ``axis`` (the components), ``out = exp(wlp - logsumexp(wlp))`` is written into
    ``out`` (may be ``wlp`` itself); returns ``logsumexp(wlp, axis)``. A row whose entries are
    all ``-inf`` or contain ``nan`` gives a non-finite log-normaliser, which the caller counts.
    Entries more than 700 below their row's maximum get :data:`EXP_FLOOR`'s tiny weight.
    """
    amax = xp.max(wlp, axis=axis, keepdims=True)
    finite_max = xp.where(xp.isfinite(amax), amax, 0.0)
    xp.subtract(wlp, finite_max, out=out)
    xp.maximum(out, EXP_FLOOR, out=out)  # nan stays nan
    xp.exp(out, out=out)
    total = xp.sum(out, axis=axis, keepdims=True)
    out /= total
    # Adding the raw maximum: a row of -inf (or +inf) gives a non-finite result, so is counted.
    return xp.squeeze(xp.log(total) + amax, axis=axis)
