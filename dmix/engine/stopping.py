"""When an EM run stops: built-in stopping criteria and the signature of your own.

A criterion is any callable ``criterion(history) -> bool`` called after every iteration with
the run's :class:`FitHistory`; True means the run has converged. ``max_iter`` ends a run
either way. The built-ins, by name (``GaussianMixture(stopping_criterion=...)``):

============ ==========================================================================
``"tol"``     ``|l_t - l_{t-1}| < tol`` on the mean log-likelihood ``l`` (scikit-learn's
              rule; the default)
``"relative"`` ``|l_t - l_{t-1}| < tol |l_t|``
``"aitken"``  Aitken's acceleration: with ``a = (l_t - l_{t-1}) / (l_{t-1} - l_{t-2})``, the
              limit is estimated as ``l_inf = l_{t-1} + (l_t - l_{t-1}) / (1 - a)`` and the run
              stops when ``|l_inf - l_t| < tol`` (McLachlan & Peel 2000, section 2.11;
              Böhning et al. 1994). It stops earlier than ``"tol"`` on slowly converging runs.
============ ==========================================================================

:class:`WallClock` is a budget rather than a convergence test (``WallClock(3600)``: stop a run
after an hour; it is reported as not converged), and :class:`AnyOf` combines criteria.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dmix.errors import InvalidParameterError

__all__ = ["AnyOf", "Aitken", "FitHistory", "Relative", "Tol", "WallClock", "get_criterion"]


@dataclass(frozen=True)
class FitHistory:
    """What a criterion sees after each iteration of one EM run.

    Attributes
    ----------
    lower_bounds : tuple of float
        The objective (mean log-likelihood) at every iteration so far, oldest first.
    seconds : tuple of float
        Wall-clock seconds of every iteration (of this run, resumed ones included).
    tol : float
        The estimator's ``tol``.
    initial : float
        The bound the first change is measured from: ``-inf`` for a fresh start, the previous
        fit's with ``warm_start``.
    """

    lower_bounds: tuple[float, ...]
    seconds: tuple[float, ...]
    tol: float
    initial: float = -math.inf

    @property
    def n_iter(self) -> int:
        return len(self.lower_bounds)

    @property
    def elapsed(self) -> float:
        return float(sum(self.seconds))

    @property
    def change(self) -> float:
        """``l_t - l_{t-1}`` (from ``initial`` after one iteration; ``inf`` before)."""
        b = self.lower_bounds
        if len(b) >= 2:
            return b[-1] - b[-2]
        return b[0] - self.initial if b else math.inf


def _tol(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidParameterError(f"The tolerance of {name} must be a float >= 0. Got "
                                    f"{value!r} instead.")
    return float(value)


@dataclass(frozen=True)
class Tol:
    """Converged when ``|l_t - l_{t-1}| < tol`` (the history's ``tol`` unless given)."""

    tol: float | None = None
    converges = True

    def __post_init__(self):
        _tol(self.tol, type(self).__name__)

    def __call__(self, history: FitHistory) -> bool:
        tol = history.tol if self.tol is None else self.tol
        return abs(history.change) < tol


@dataclass(frozen=True)
class Relative:
    """Converged when ``|l_t - l_{t-1}| < tol |l_t|``."""

    tol: float | None = None
    converges = True

    def __post_init__(self):
        _tol(self.tol, type(self).__name__)

    def __call__(self, history: FitHistory) -> bool:
        tol = history.tol if self.tol is None else self.tol
        return history.n_iter >= 2 and abs(history.change) < tol * abs(history.lower_bounds[-1])


@dataclass(frozen=True)
class Aitken:
    """Converged when Aitken's estimate of the limit is within ``tol`` of ``l_t``.

    Needs three values. Where the rate ``a`` is not in [0, 1) (the sequence is not converging
    linearly, or two values are equal) it falls back to ``|l_t - l_{t-1}| < tol``.
    """

    tol: float | None = None
    converges = True

    def __post_init__(self):
        _tol(self.tol, type(self).__name__)

    def __call__(self, history: FitHistory) -> bool:
        tol = history.tol if self.tol is None else self.tol
        b = history.lower_bounds
        if len(b) < 3:
            return False
        step, before = b[-1] - b[-2], b[-2] - b[-3]
        if before == 0 or not 0 <= step / before < 1:
            return abs(step) < tol
        rate = step / before
        limit = b[-2] + step / (1.0 - rate)
        return abs(limit - b[-1]) < tol


@dataclass(frozen=True)
class WallClock:
    """Stop a run once its iterations took ``seconds`` in all: a budget, not convergence
    (the run is reported as not converged)."""

    seconds: float
    converges = False

    def __post_init__(self):
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float) or not (
            self.seconds > 0
        ):
            raise InvalidParameterError(
                f"WallClock needs a number of seconds > 0. Got {self.seconds!r} instead.")

    def __call__(self, history: FitHistory) -> bool:
        return history.elapsed >= self.seconds


@dataclass(frozen=True)
class AnyOf:
    """Stop when any of ``criteria`` says so; converged if one that converges says so."""

    criteria: tuple

    def __init__(self, *criteria):
        object.__setattr__(self, "criteria", tuple(get_criterion(c, None) for c in criteria))

    def __call__(self, history: FitHistory) -> bool:
        return any(c(history) for c in self.criteria)

    def converged(self, history: FitHistory) -> bool:
        return any(getattr(c, "converges", True) and c(history) for c in self.criteria)


_NAMES = {"tol": Tol, "relative": Relative, "aitken": Aitken}


def get_criterion(spec, tol) -> Callable[[FitHistory], bool]:
    """The criterion for ``spec``: None or a name of :data:`_NAMES` (using the estimator's
    ``tol`` from the history), or a callable, returned as is.

    Raises :class:`~dmix.errors.InvalidParameterError` for anything else.
    """
    if spec is None:
        return Tol()
    if isinstance(spec, str):
        if spec not in _NAMES:
            raise InvalidParameterError(
                f"Unknown stopping_criterion {spec!r}: use one of {sorted(_NAMES)}, "
                "dmix.engine.stopping.WallClock(seconds), or a callable "
                "criterion(history) -> bool.")
        return _NAMES[spec]()
    if callable(spec):
        return spec
    raise InvalidParameterError(
        f"stopping_criterion must be a name among {sorted(_NAMES)} or a callable "
        f"criterion(history) -> bool. Got {spec!r} instead.")


def evaluate(criterion, lower_bounds: Sequence[float], seconds: Sequence[float],
             tol: float, initial: float = -math.inf) -> tuple[bool, bool]:
    """``(stop, converged)`` for a run with this history."""
    history = FitHistory(tuple(lower_bounds), tuple(seconds), float(tol), float(initial))
    if isinstance(criterion, AnyOf):
        return criterion(history), criterion.converged(history)
    stop = bool(criterion(history))
    return stop, stop and getattr(criterion, "converges", True)
