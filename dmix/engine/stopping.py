"""When one EM run stops: stopping criteria over the history of its lower bounds.

A criterion is any callable ``criterion(history) -> bool`` called after every iteration of an
EM run with the :class:`FitHistory` so far; ``True`` stops the run. Stopping means one of two
things, and each criterion says which through its attribute ``converges``:

* **converged** (``converges = True``): the objective has settled. :class:`Tol` (the default,
  scikit-learn's rule), :class:`Relative`, :class:`Aitken` and :class:`NoImprovement` (a
  patience rule, for noisy objectives such as stochastic gradient steps or a held-out score)
  are convergence tests, and so is any user callable without the attribute: a user callable
  returning ``True`` means converged.
* **stopped by a budget** (``converges = False``): the run is cut short although it has not
  settled, as it is at ``max_iter``. :class:`WallClock` is a budget: a run it stops reports
  ``converged_ = False`` (and the estimator's :class:`~dmix.errors.ConvergenceWarning`).

:func:`stop_reason` combines both: it returns :attr:`Stop.CONVERGED`, :attr:`Stop.BUDGET` or
``None`` (go on), and looks inside :class:`AnyOf`, which stops when any of its members does and
reports convergence when a converging member fired.

:func:`get_criterion` builds a criterion from a name, a string such as ``"wall_clock:600"``,
``"no_improvement:20"`` or ``"aitken|wall_clock:600"``, a JSON-compatible dict, a list of those (any of them), or returns a
callable as it is; :func:`criterion_spec` gives back the JSON form of a built-in criterion, to
save it in a checkpoint (``None`` for a user callable, which cannot be saved).

The objective is the mean log-likelihood per row, as in ``lower_bounds_``; tolerances are in
those units (nats per row).

References
----------
.. [1] McLachlan, G. J. and Peel, D. (2000). *Finite Mixture Models*. Wiley, New York.
.. [2] Böhning, D., Dietz, E., Schaub, R., Schlattmann, P. and Lindsay, B. G. (1994). The
   distribution of the likelihood ratio for mixtures of densities from the one-parameter
   exponential family. *Annals of the Institute of Statistical Mathematics* 46(2), 373-388.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from dmix.errors import InvalidParameterError

__all__ = [
    "CRITERIA",
    "Aitken",
    "AnyOf",
    "Criterion",
    "FitHistory",
    "NoImprovement",
    "Relative",
    "Stop",
    "Tol",
    "WallClock",
    "criterion_spec",
    "get_criterion",
    "stop_reason",
]


@dataclass(frozen=True)
class FitHistory:
    """What a stopping criterion sees after each iteration of one EM run.

    Parameters
    ----------
    lower_bounds : tuple of float
        The objective (mean log-likelihood per row) at every iteration so far, oldest first:
        ``lower_bounds[t]`` is that of the parameters entering iteration ``t + 1``.
    seconds : tuple of float
        Wall-clock seconds of each of those iterations (same length).
    tol : float
        The estimator's ``tol``: the tolerance of criteria built without their own.
    initial : float, default=-inf
        The value the first change is measured from: ``-inf`` for a fresh start, the previous
        fit's lower bound for a warm start (as ``run_em``'s ``lower_bound``).
    """

    lower_bounds: tuple[float, ...]
    seconds: tuple[float, ...]
    tol: float
    initial: float = -math.inf

    def __post_init__(self):
        object.__setattr__(self, "lower_bounds", tuple(float(v) for v in self.lower_bounds))
        object.__setattr__(self, "seconds", tuple(float(v) for v in self.seconds))
        if len(self.lower_bounds) != len(self.seconds):
            raise InvalidParameterError(
                f"FitHistory needs one duration per lower bound; got {len(self.lower_bounds)} "
                f"lower bounds and {len(self.seconds)} durations.")

    @property
    def n_iter(self) -> int:
        """Number of iterations so far."""
        return len(self.lower_bounds)

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of all iterations so far (their sum)."""
        return math.fsum(self.seconds)

    @property
    def values(self) -> tuple[float, ...]:
        """The sequence the criteria extrapolate: :attr:`initial` (when finite), then
        :attr:`lower_bounds`."""
        if math.isfinite(self.initial):
            return (self.initial, *self.lower_bounds)
        return self.lower_bounds

    @property
    def change(self) -> float:
        """The last difference ``l_t - l_{t-1}`` (signed), ``inf`` before there are two values
        (as in ``run_em``: the first change of a fresh start is ``l_1 - (-inf) = inf``)."""
        values = self.values
        if len(values) < 2:
            return math.inf
        return values[-1] - values[-2]


class Stop(str, enum.Enum):
    """Why a run stopped (:func:`stop_reason`); a ``str`` so that it prints and saves plainly."""

    CONVERGED = "converged"
    BUDGET = "budget"


#: The type of a stopping criterion.
Criterion = Callable[[FitHistory], bool]


def _error(message: str) -> InvalidParameterError:
    return InvalidParameterError(message)


def _check_tol(owner: str, tol) -> float | None:
    """``tol``: None, or a finite real number >= 0."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (
            math.isfinite(tol) and tol >= 0):
        raise _error(f"The 'tol' of {owner} must be None or a finite float >= 0. "
                     f"Got {tol!r} instead.")
    return float(tol)


def _tol(own: float | None, history: FitHistory) -> float:
    return history.tol if own is None else own


@dataclass(frozen=True)
class Tol:
    r"""Absolute change: stop when :math:`|\ell_t - \ell_{t-1}| < \mathrm{tol}`.

    scikit-learn's rule and dmix's default, on the mean log-likelihood per row
    :math:`\ell_t`. It is a test of lack of progress: on a slowly converging run (linear rate
    :math:`r` near 1) it stops about :math:`\mathrm{tol} \cdot r / (1 - r)` short of the
    limit (see :class:`Aitken`).

    Parameters
    ----------
    tol : float, optional
        The tolerance; default: the history's (the estimator's ``tol``).
    """

    converges: ClassVar[bool] = True
    name: ClassVar[str] = "tol"
    tol: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "tol", _check_tol(type(self).__name__, self.tol))

    def __call__(self, history: FitHistory) -> bool:
        return abs(history.change) < _tol(self.tol, history)


@dataclass(frozen=True)
class Relative:
    r"""Relative change: stop when
    :math:`|\ell_t - \ell_{t-1}| < \mathrm{tol} \cdot |\ell_t|`.

    Multiplying every :math:`\ell_t` by a constant does not change where it stops (but a
    change of the data's units adds a constant to the mean log-likelihood, which does).
    Near :math:`\ell_t = 0` it asks for an almost exact fixed point; at 0 it never stops.
    mclust's EM uses a relative tolerance on the log-likelihood (``emControl``, default
    ``1e-5``).

    Parameters
    ----------
    tol : float, optional
        The relative tolerance; default: the history's (the estimator's ``tol``).
    """

    converges: ClassVar[bool] = True
    name: ClassVar[str] = "relative"
    tol: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "tol", _check_tol(type(self).__name__, self.tol))

    def __call__(self, history: FitHistory) -> bool:
        values = history.values
        if len(values) < 2:
            return False
        return abs(values[-1] - values[-2]) < _tol(self.tol, history) * abs(values[-1])


@dataclass(frozen=True)
class Aitken:
    r"""Aitken's acceleration: stop when the extrapolated limit is within ``tol``.

    From the last three values :math:`\ell_{t-1}, \ell_t, \ell_{t+1}` (McLachlan and Peel
    2000 [1]_; Böhning et al. 1994 [2]_):

    .. math::

        a_t = \frac{\ell_{t+1} - \ell_t}{\ell_t - \ell_{t-1}}, \qquad
        \ell_\infty = \ell_t + \frac{\ell_{t+1} - \ell_t}{1 - a_t},

    and EM stops when :math:`|\ell_\infty - \ell_t| < \mathrm{tol}`. EM converges linearly,
    :math:`\ell_t \approx L - c\, r^t`; on such a sequence :math:`a_t = r` and
    :math:`\ell_\infty = L` exactly, so the test bounds the distance of :math:`\ell_t` to
    the limit rather than the size of the last step. With the same ``tol`` it therefore stops
    *later* than :class:`Tol` on slowly converging runs (:math:`r` near 1), where Tol stops
    :math:`r / (1 - r)` tolerances short of the limit, and at about the same iteration on fast
    ones.

    Guards: no stop before three values; no stop when :math:`a_t \ge 1` or is not finite (the
    increments do not shrink, so there is no limit to extrapolate), including
    :math:`\ell_t = \ell_{t-1} \ne \ell_{t+1}`; with ``tol > 0``, stop when the last two
    increments are both exactly zero (a fixed point). Near convergence, where the increments
    are rounding noise, :math:`a_t` is erratic and the test may not fire: pair it with
    ``max_iter`` (always) or a :class:`WallClock`.

    Parameters
    ----------
    tol : float, optional
        The tolerance on :math:`|\ell_\infty - \ell_t|`; default: the history's (the
        estimator's ``tol``).
    """

    converges: ClassVar[bool] = True
    name: ClassVar[str] = "aitken"
    tol: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "tol", _check_tol(type(self).__name__, self.tol))

    @staticmethod
    def limit(l0: float, l1: float, l2: float) -> float:
        r"""Aitken's estimate :math:`\ell_\infty` from three successive values, or ``nan``
        where it is undefined (:math:`a \ge 1`, a zero or non-finite increment ratio).

        Its rounding error is about :math:`\epsilon |\ell| / (1 - a)^2` (the second difference
        in the denominator): 1e-12 relative or better for :math:`a \le 0.9`."""
        step0, step1 = l1 - l0, l2 - l1
        if step0 == 0.0:
            return l1 if step1 == 0.0 else math.nan
        a = step1 / step0
        if not math.isfinite(a) or a >= 1.0:
            return math.nan
        return l1 + step1 / (1.0 - a)

    def __call__(self, history: FitHistory) -> bool:
        values = history.values
        if len(values) < 3:
            return False
        l0, l1, l2 = values[-3:]
        limit = self.limit(l0, l1, l2)
        return bool(abs(limit - l1) < _tol(self.tol, history))  # False when limit is nan


def _best(values) -> float:
    """The largest of ``values``, ``-inf`` when empty; a NaN counts as ``-inf``."""
    return max((v for v in values if not math.isnan(v)), default=-math.inf)


@dataclass(frozen=True)
class NoImprovement:
    r"""Patience: stop when ``patience`` successive values brought no improvement above
    ``tol``.

    With :math:`p` = ``patience`` and :math:`n` values so far, stop when

    .. math::

        \max_{n - p < t \le n} \ell_t \;\le\; \max_{t \le n - p} \ell_t + \mathrm{tol},

    never before there are :math:`p + 1` values. This is the rule of scikit-learn's
    ``MLPClassifier`` (``n_iter_no_change``, ``tol``), measured here against the best value
    *before* the window: a run creeping up by less than ``tol`` per iteration but by more
    than ``tol`` over the window goes on (scikit-learn's running best would stop it).
    Unlike :class:`Tol` it tolerates a non-monotone objective (stochastic gradient steps, a
    held-out score), at the cost of ``patience`` iterations past the best one; pair it with
    a family that keeps its best parameters. NaN values count as no improvement.

    Parameters
    ----------
    patience : int, default=10
        The window, an int >= 1.
    tol : float, optional
        The improvement that counts; default: the history's (the estimator's ``tol``).
    """

    converges: ClassVar[bool] = True
    name: ClassVar[str] = "no_improvement"
    patience: int = 10
    tol: float | None = None

    def __post_init__(self):
        p = self.patience
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
            raise _error("The 'patience' of NoImprovement must be an int >= 1. "
                         f"Got {p!r} instead.")
        object.__setattr__(self, "patience", int(p))
        object.__setattr__(self, "tol", _check_tol(type(self).__name__, self.tol))

    def __call__(self, history: FitHistory) -> bool:
        values = history.values
        if len(values) <= self.patience:
            return False
        before, window = values[:-self.patience], values[-self.patience:]
        return _best(window) <= _best(before) + _tol(self.tol, history)


@dataclass(frozen=True)
class WallClock:
    """A time budget: stop once the run's iterations took ``seconds`` or more in all.

    A budget, not a convergence test (``converges = False``): a run it stops reports
    ``converged = False``. It counts the iterations of one EM run (one initialisation), as
    recorded in :attr:`FitHistory.seconds`; it is checked after each iteration, so a run
    overshoots the budget by up to one iteration.

    Parameters
    ----------
    seconds : float
        The budget, a finite number >= 0 (0 stops after the first iteration).
    """

    converges: ClassVar[bool] = False
    name: ClassVar[str] = "wall_clock"
    seconds: float

    def __post_init__(self):
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (
                math.isfinite(s) and s >= 0):
            raise _error("The 'seconds' of WallClock must be a finite float >= 0. "
                         f"Got {s!r} instead.")
        object.__setattr__(self, "seconds", float(s))

    def __call__(self, history: FitHistory) -> bool:
        return history.elapsed >= self.seconds


@dataclass(frozen=True, init=False)
class AnyOf:
    """Stop when any of ``criteria`` does.

    The run counts as converged when a member with ``converges = True`` (or a user callable)
    fired, and as stopped by a budget when only budget members did (:func:`stop_reason`).

    Parameters
    ----------
    *criteria : criterion or spec
        Criteria, or anything :func:`get_criterion` accepts; at least one.
    tol : float, optional
        Passed to :func:`get_criterion` for the members given by name.
    """

    #: Calling an AnyOf says only whether to stop; :func:`stop_reason` says why.
    converges: ClassVar[bool] = True
    name: ClassVar[str] = "any_of"
    criteria: tuple

    def __init__(self, *criteria, tol: float | None = None):
        if len(criteria) == 1 and isinstance(criteria[0], (list, tuple)):
            criteria = tuple(criteria[0])
        if not criteria:
            raise _error("AnyOf needs at least one criterion.")
        object.__setattr__(self, "criteria", tuple(get_criterion(c, tol) for c in criteria))

    def __call__(self, history: FitHistory) -> bool:
        # Every member sees every history (none short-circuits another's state, if it has one).
        return any([bool(c(history)) for c in self.criteria])  # noqa: C419


def stop_reason(criterion: Criterion, history: FitHistory) -> Stop | None:
    """Whether and why ``criterion`` stops the run at ``history``.

    Returns
    -------
    Stop or None
        ``None`` to go on; :attr:`Stop.CONVERGED` when a converging criterion (``converges``
        true or absent) fired; :attr:`Stop.BUDGET` when only budgets fired. For
        :class:`AnyOf`, convergence takes precedence over a budget that fires at the same
        iteration.
    """
    if isinstance(criterion, AnyOf):
        reasons = [stop_reason(c, history) for c in criterion.criteria]
        if Stop.CONVERGED in reasons:
            return Stop.CONVERGED
        return Stop.BUDGET if Stop.BUDGET in reasons else None
    if not criterion(history):
        return None
    return Stop.CONVERGED if getattr(criterion, "converges", True) else Stop.BUDGET


# -- specs -------------------------------------------------------------------------------------

#: The built-in criteria by name.
CRITERIA: dict[str, type] = {c.name: c for c in (Tol, Relative, Aitken, NoImprovement,
                                                 WallClock, AnyOf)}

#: The number a ``"name:value"`` string sets, per name.
_NUMBER = {"tol": "tol", "relative": "tol", "aitken": "tol", "no_improvement": "patience",
           "wall_clock": "seconds"}
#: The keys a dict spec may give besides ``name``, per name (the default: its ``_NUMBER``).
_KEYS = {"no_improvement": {"patience", "tol"}}

_FORMS = ("None, 'tol', 'relative', 'aitken', 'no_improvement:<patience>', "
          "'wall_clock:<seconds>', 'name:<number>', "
          "several joined by '|' (any of them), a dict such as "
          "{'name': 'wall_clock', 'seconds': 600}, a list of those, or a callable "
          "history -> bool")


def _invalid(spec, why: str = "") -> InvalidParameterError:
    return _error(f"Invalid stopping criterion {spec!r}{': ' + why if why else ''}. Valid "
                  f"names are {sorted(CRITERIA)}; the criterion may be given as {_FORMS}.")


def _number(spec, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _invalid(spec, f"{text!r} is not a number") from None


def _integer(spec, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _invalid(spec, f"{text!r} is not an integer") from None


def _from_string(spec: str, tol: float | None) -> Criterion:
    parts = [p.strip() for p in spec.split("|")]
    if len(parts) > 1:
        return AnyOf(*(_from_string(p, tol) for p in parts))
    name, sep, value = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in _NUMBER:
        raise _invalid(spec, f"unknown name {name!r}")
    if sep:
        parse = _integer if _NUMBER[name] == "patience" else _number
        return _build(spec, name, {_NUMBER[name]: parse(spec, value.strip())}, tol)
    if name == "wall_clock":
        raise _invalid(spec, "wall_clock needs its seconds, e.g. 'wall_clock:600'")
    return _build(spec, name, {}, tol)


def _build(spec, name: str, kwargs: dict, tol: float | None) -> Criterion:
    if name == "any_of":
        members = kwargs.get("criteria")
        if not isinstance(members, (list, tuple)) or set(kwargs) != {"criteria"}:
            raise _invalid(spec, "any_of takes exactly one key besides 'name', 'criteria', "
                           "a list")
        return AnyOf(*members, tol=tol)
    if name == "wall_clock" and "seconds" not in kwargs:
        raise _invalid(spec, "wall_clock needs its 'seconds'")
    allowed = _KEYS.get(name, {_NUMBER[name]})
    unknown = set(kwargs) - allowed
    if unknown:
        raise _invalid(spec, f"{name} takes {sorted(allowed)}, not {sorted(unknown)}")
    if name != "wall_clock" and kwargs.get("tol") is None:
        kwargs = {**kwargs, "tol": tol}
    try:
        return CRITERIA[name](**kwargs)
    except InvalidParameterError as exc:
        raise _invalid(spec, str(exc)) from None


def get_criterion(spec: Any = None, tol: float | None = None) -> Criterion:
    """The stopping criterion ``spec`` describes.

    Parameters
    ----------
    spec : None, str, dict, list or callable
        * ``None`` or ``"tol"``: :class:`Tol` (scikit-learn's rule);
        * ``"relative"``, ``"aitken"``, ``"no_improvement"``; ``"name:<number>"`` sets the
          tolerance (``"aitken:1e-6"``), the patience (``"no_improvement:20"``, an integer
          >= 1) or the budget (``"wall_clock:600"``, seconds); ``"aitken|wall_clock:600"``:
          any of them (:class:`AnyOf`);
        * a dict, the JSON form of :func:`criterion_spec`: ``{"name": "tol"}``,
          ``{"name": "aitken", "tol": 1e-6}``, ``{"name": "wall_clock", "seconds": 600}``,
          ``{"name": "no_improvement", "patience": 20, "tol": 1e-4}``,
          ``{"name": "any_of", "criteria": [...]}``;
        * a list or tuple of specs: any of them;
        * a callable ``history -> bool`` (a built-in criterion or the user's): returned as is.
    tol : float, optional
        The tolerance of criteria named without one. Default ``None``: the history's at each
        call (the estimator's ``tol``).

    Returns
    -------
    callable
        ``criterion(history: FitHistory) -> bool``.

    Raises
    ------
    InvalidParameterError
        For an unknown name, a spec of another type (a number, a bool, a class), a missing,
        negative or non-finite number, a patience that is not an integer >= 1; the message
        names the value and the valid names.
    """
    tol = _check_tol("get_criterion", tol)
    if spec is None:
        return Tol(tol)
    if isinstance(spec, str):
        return _from_string(spec, tol)
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str) or name not in CRITERIA:
            raise _invalid(spec, f"unknown or missing 'name' {name!r}")
        return _build(spec, name, kwargs, tol)
    if isinstance(spec, (list, tuple)):
        return AnyOf(*spec, tol=tol)
    if isinstance(spec, type):
        raise _invalid(spec, "pass an instance, e.g. Aitken(), not the class")
    if callable(spec):
        return spec
    raise _invalid(spec, f"a {type(spec).__name__} is neither a name nor a callable")


def criterion_spec(criterion: Criterion) -> dict | None:
    """The JSON-compatible form of a built-in criterion (``get_criterion`` builds it back), or
    ``None`` for a user callable (or an :class:`AnyOf` holding one), which cannot be saved.

    Examples
    --------
    >>> criterion_spec(get_criterion("aitken|wall_clock:600"))
    {'name': 'any_of', 'criteria': [{'name': 'aitken'}, {'name': 'wall_clock', 'seconds': 600.0}]}
    """
    if isinstance(criterion, AnyOf):
        members = [criterion_spec(c) for c in criterion.criteria]
        if any(m is None for m in members):
            return None
        return {"name": "any_of", "criteria": members}
    if type(criterion) in (Tol, Relative, Aitken):
        return {"name": criterion.name} | ({} if criterion.tol is None
                                          else {"tol": criterion.tol})
    if type(criterion) is NoImprovement:
        return {"name": criterion.name, "patience": criterion.patience} | (
            {} if criterion.tol is None else {"tol": criterion.tol})
    if type(criterion) is WallClock:
        return {"name": "wall_clock", "seconds": criterion.seconds}
    return None
