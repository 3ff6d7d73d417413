"""Kernels of the E-step: fused CuPy kernels on the GPU, their reference twins elsewhere.

Family code calls these functions with the namespace ``xp`` of its block; on CuPy arrays they
run the fused kernels of :mod:`dmix.kernels.cuda` (one launch, one read of the input, where the
array code takes several passes), on anything else the plain array code of
:mod:`dmix.kernels.reference`. The two agree to rounding (tests/kernels), and CI, which has no
GPU, tests the twins.

===========================  ===============================================================
``normalize_log``            responsibilities ``exp(a - logsumexp(a))`` and the log-normaliser
``quadratic_features_full``  the packed products ``x_a x_b`` (a <= b) of centred rows
``row_sq_norms``             ``sum_d y[n, k, d]^2``: squared Mahalanobis distances from the
                             whitened differences of the direct form
===========================  ===============================================================
"""

from __future__ import annotations

from dmix.kernels import reference
from dmix.kernels.reference import exp_floor
from dmix.xp import is_cupy

__all__ = ["exp_floor", "normalize_log", "quadratic_features_full", "row_sq_norms"]


def normalize_log(wlp, out, xp, axis: int = 1):
    """See :func:`dmix.kernels.reference.normalize_log`."""
    if is_cupy(wlp):
        from dmix.kernels import cuda

        return cuda.normalize_log(wlp, out, axis)
    return reference.normalize_log(wlp, out, xp, axis)


def quadratic_features_full(xt, out, xp) -> None:
    """See :func:`dmix.kernels.reference.quadratic_features_full`."""
    if is_cupy(xt):
        from dmix.kernels import cuda

        return cuda.quadratic_features_full(xt, out)
    return reference.quadratic_features_full(xt, out, xp)


def row_sq_norms(y, xp, out=None):
    """See :func:`dmix.kernels.reference.row_sq_norms`."""
    if is_cupy(y):
        from dmix.kernels import cuda

        return cuda.row_sq_norms(y, out)
    return reference.row_sq_norms(y, xp, out)
