"""Reference twins of the fused kernels: plain array code for any namespace ``xp``.

These are what runs on NumPy (and what CI tests); :mod:`dmix.kernels.cuda` holds the fused CuPy
versions, which must agree with them (tests/kernels). Each function writes into ``out`` where it
takes one, so the engine's sub-batches allocate nothing (see :class:`dmix.xp.Workspace`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["exp_floor", "normalize_log", "quadratic_features_full", "row_sq_norms"]


def exp_floor(dtype) -> float:
    """Floor of shifted log-probabilities before ``exp`` in ``dtype``.

    ``exp(-700) = 1e-304`` (float64) and ``exp(-87) = 1.6e-38`` (float32) are still normal
    numbers. Below that the results are subnormal or underflow, and NumPy's exp leaves its vector
    path (measured here 20-30x slower per element; it made the E-step of well-separated mixtures
    30% slower). A responsibility of 1e-304 (1.6e-38) instead of 0 changes no sum measurably.
    """
    return -87.0 if np.dtype(dtype).itemsize == 4 else -700.0


def normalize_log(wlp, out, xp, axis: int = 1):
    """Responsibilities and log-normaliser from weighted log-probabilities, in one sweep.

    Along ``axis`` (the components), ``out = exp(wlp - logsumexp(wlp))`` is written into
    ``out`` (may be ``wlp`` itself); returns ``logsumexp(wlp, axis)``. A row whose entries are
    all ``-inf`` or contain ``nan`` gives a non-finite log-normaliser, which the caller counts.
    Entries more than :func:`exp_floor` below their row's maximum get its tiny weight.
    """
    amax = xp.max(wlp, axis=axis, keepdims=True)
    finite_max = xp.where(xp.isfinite(amax), amax, 0.0)
    xp.subtract(wlp, finite_max, out=out)
    xp.maximum(out, exp_floor(out.dtype), out=out)  # nan stays nan
    xp.exp(out, out=out)
    total = xp.sum(out, axis=axis, keepdims=True)
    out /= total
    # Adding the raw maximum: a row of -inf (or +inf) gives a non-finite result, so is counted.
    return xp.squeeze(xp.log(total) + amax, axis=axis)


def quadratic_features_full(xt, out, xp) -> None:
    """Rows ``x_a x_b`` (``b >= a``, in ``np.triu_indices`` order) of columns ``xt`` (D, n),
    written into ``out`` (D (D + 1) / 2, n): one broadcast product per ``a``."""
    d, o = xt.shape[0], 0
    for a in range(d):
        xp.multiply(xt[a], xt[a:], out=out[o : o + d - a])
        o += d - a


def row_sq_norms(y, xp, out=None):
    """``sum_d y[:, :, d]^2`` (n, K) of an (n, K, D) array, in one sweep."""
    return xp.einsum("nkd,nkd->nk", y, y, out=out)
