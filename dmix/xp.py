"""Array-namespace helpers: the only module that branches on NumPy versus CuPy.

Family code receives the namespace ``xp`` of the block it works on and calls the helpers here
for what the array API lacks (``logsumexp``) or spells differently between backends.
"""

from __future__ import annotations

import numpy as np

__all__ = ["get_namespace", "is_cupy", "logsumexp", "to_host", "asarray_f64"]


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
