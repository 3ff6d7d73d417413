"""Exceptions and warnings raised by dmix.

Every error is a :class:`DmixError`, itself a :class:`ValueError`, and its message names the
offending value and says what to do. Where scikit-learn is installed, :class:`NotFittedError`
and :class:`ConvergenceWarning` also derive from scikit-learn's classes of the same name, so code
written against scikit-learn catches them unchanged.
"""

from __future__ import annotations

try:  # scikit-learn is optional; users who have it expect its exception types
    from sklearn.exceptions import ConvergenceWarning as _SkConvergenceWarning
    from sklearn.exceptions import NotFittedError as _SkNotFittedError
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    _SkConvergenceWarning = UserWarning

    class _SkNotFittedError(ValueError, AttributeError):
        pass


__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CollapseWarning",
    "ConvergenceWarning",
    "DataError",
    "DeviceError",
    "DmixError",
    "IllConditionedError",
    "InvalidParameterError",
    "NotFittedError",
]


class DmixError(ValueError):
    """Base class of every error dmix raises on purpose."""


class InvalidParameterError(DmixError, TypeError):
    """A constructor or method parameter has an invalid type or value."""


class DataError(DmixError):
    """The input data cannot be used: wrong shape or dtype, non-finite values, too few rows."""


class IllConditionedError(DmixError):
    """A covariance estimate is not positive definite (a collapsed or empty component)."""


class DeviceError(DmixError, RuntimeError):
    """The requested compute device cannot be used here (no CuPy, no GPU)."""


class CheckpointMismatchError(DmixError):
    """A checkpoint was written for other data or incompatible options."""


class NotFittedError(DmixError, _SkNotFittedError):
    """An estimator method that needs fitted parameters was called before ``fit``."""


class ConvergenceWarning(_SkConvergenceWarning):
    """EM stopped at ``max_iter`` before the change in mean log-likelihood fell below ``tol``."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) and an older one is used instead."""


class CollapseWarning(UserWarning):
    """Components collapsed (empty, or a singular covariance) and were re-seeded."""
