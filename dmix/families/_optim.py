"""Optimizers for gradient M-steps: Adam and L-BFGS, one objective evaluation per call.

A gradient-trained family evaluates its objective (to *maximise*: the mean log-likelihood per
row) and its gradient in one pass over the data, then calls ``optimizer.step(theta, value,
gradient, state)``, which returns the next point to evaluate, the new state and whether the
optimizer has converged. Because every evaluation is a pass over out-of-core data, no
optimizer here evaluates anything itself: L-BFGS's line search is a state machine advanced by
one evaluation per call.

The state is a flat ``dict[str, numpy.ndarray]`` (0-d arrays for scalars; float64 or int64) so
that a checkpoint writes it to Zarr and reads it back exactly; ``{}`` is a fresh start. Every
function is deterministic and returns new arrays (inputs are never modified), so a fit resumed
from a saved state continues bit for bit as the uninterrupted one. ``step`` returns only the
optimizer's own keys (``adam_*`` or ``lbfgs_*``); other keys of the given state are dropped.

References
----------
.. [1] Kingma, D. P. and Ba, J. (2015). Adam: a method for stochastic optimization. *ICLR*.
.. [2] Nocedal, J. and Wright, S. J. (2006). *Numerical Optimization*, 2nd ed. Springer
   (Algorithm 7.4, the two-loop recursion; Section 3.5, backtracking by interpolation).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Adam",
    "LBFGS",
    "make_optimizer",
    "scheduled_learning_rate",
]

#: Learning-rate schedules of :func:`scheduled_learning_rate`.
SCHEDULES = ("constant", "cosine", "exponential")
#: Optimizer names of :func:`make_optimizer`.
OPTIMIZERS = ("adam", "lbfgs")
#: The floor of the decaying schedules, as a fraction of the learning rate.
_FLOOR = 0.01


def _check_positive_int(owner: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"The {name!r} of {owner} must be an int >= {low}. Got {value!r} "
                         "instead.")
    return int(value)


def _check_real(owner: str, name: str, value, low: float, high: float = math.inf, *,
                open_low: bool = False, open_high: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value)
          and (value > low if open_low else value >= low)
          and (value < high if open_high else value <= high))
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"The {name!r} of {owner} must be a finite float in {lo}{low}, "
                         f"{high}{hi}. Got {value!r} instead.")
    return float(value)


def _check_schedule(schedule) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {schedule!r}; valid schedules are "
                         f"{list(SCHEDULES)}.")
    return schedule


def scheduled_learning_rate(learning_rate: float, schedule: str, step: int,
                            total_steps: int) -> float:
    r"""The learning rate of step ``step`` (counted from 0) under ``schedule``.

    With :math:`u = \min(\mathrm{step}, T) / T` (:math:`T` = ``total_steps``):

    * ``"constant"``: :math:`\eta`;
    * ``"cosine"``: :math:`\eta\,(0.01 + 0.99 \cdot \tfrac12 (1 + \cos \pi u))`, from
      :math:`\eta` down to :math:`0.01\,\eta`;
    * ``"exponential"``: :math:`\eta \cdot 0.01^{u}`, falling 100-fold over ``total_steps``.

    Both decaying schedules stay at :math:`0.01\,\eta` after ``total_steps``.

    Parameters
    ----------
    learning_rate : float
        :math:`\eta > 0`.
    schedule : {'constant', 'cosine', 'exponential'}
    step : int
        Steps taken so far (>= 0).
    total_steps : int
        :math:`T \ge 1`, the length of the decay.

    Returns
    -------
    float
    """
    _check_schedule(schedule)
    _check_positive_int("scheduled_learning_rate", "step", step, low=0)
    total = _check_positive_int("scheduled_learning_rate", "total_steps", total_steps)
    lr = float(learning_rate)
    u = min(int(step), total) / total
    if schedule == "cosine":
        return lr * (_FLOOR + (1.0 - _FLOOR) * 0.5 * (1.0 + math.cos(math.pi * u)))
    if schedule == "exponential":
        return lr * _FLOOR ** u
    return lr


def _as_vector(owner: str, theta, gradient) -> tuple[np.ndarray, np.ndarray]:
    theta = np.array(theta, dtype=np.float64)  # a copy: the caller's array is never aliased
    gradient = np.array(gradient, dtype=np.float64)
    if theta.shape != gradient.shape:
        raise ValueError(f"{owner}: theta has shape {theta.shape} but the gradient has shape "
                         f"{gradient.shape}.")
    return theta, gradient


def _scalar(value: float) -> np.ndarray:
    """A 0-d float64 array (what Zarr stores and gives back), not a NumPy scalar."""
    return np.array(value, dtype=np.float64)


def _check_state_shape(owner: str, state: dict, key: str, shape: tuple) -> None:
    if key in state and np.shape(state[key]) != shape:
        raise ValueError(f"{owner}: the state's {key!r} has shape {np.shape(state[key])}, "
                         f"but theta has shape {shape}; was the state made for another "
                         "model?")


# -- Adam ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adam:
    r"""Adam [1]_, as gradient *ascent*.

    With :math:`g_t` the gradient of the objective at :math:`\theta_{t-1}`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \theta_t = \theta_{t-1} + \eta_t \,
            \frac{m_t / (1 - \beta_1^{n})}{\sqrt{v_t / (1 - \beta_2^{n})} + \epsilon},

    elementwise, :math:`\eta_t` from :func:`scheduled_learning_rate` at step :math:`t - 1`
    and :math:`n` the number of updates of the entry's moments (equal to :math:`t` unless
    :meth:`reset` restarted them). A non-finite gradient entry makes only that entry (and its
    moments) non-finite.

    State: ``adam_t`` (0-d int64, steps taken, for the schedule), ``adam_m``, ``adam_v`` (the
    moments) and ``adam_n`` (int64 per entry, the :math:`n` of the bias correction).

    Parameters
    ----------
    learning_rate : float, default=0.05
    schedule : {'constant', 'cosine', 'exponential'}, default='constant'
    total_steps : int, default=100
        The length of the schedule's decay.
    beta1, beta2 : float, default=0.9, 0.999
        Decay rates of the moments, in [0, 1).
    eps : float, default=1e-8
    """

    learning_rate: float = 0.05
    schedule: str = "constant"
    total_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        _check_real("Adam", "learning_rate", self.learning_rate, 0.0, open_low=True)
        _check_schedule(self.schedule)
        _check_positive_int("Adam", "total_steps", self.total_steps)
        _check_real("Adam", "beta1", self.beta1, 0.0, 1.0, open_high=True)
        _check_real("Adam", "beta2", self.beta2, 0.0, 1.0, open_high=True)
        _check_real("Adam", "eps", self.eps, 0.0, open_low=True)

    def step(self, theta, value, gradient, state) -> tuple[np.ndarray, dict, bool]:
        """One ascent step from ``theta`` (``value`` is not used).

        Returns
        -------
        theta : ndarray
            The next point.
        state : dict
            The new state.
        converged : bool
            Always ``False``: Adam has no convergence test of its own.
        """
        theta, g = _as_vector("Adam", theta, gradient)
        for key in ("adam_m", "adam_v", "adam_n"):
            _check_state_shape("Adam", state, key, theta.shape)
        t = int(state.get("adam_t", 0))
        m = state.get("adam_m", np.zeros_like(theta))
        v = state.get("adam_v", np.zeros_like(theta))
        n = np.asarray(state.get("adam_n", np.full(theta.shape, t, np.int64))) + 1
        m = self.beta1 * m + (1.0 - self.beta1) * g
        v = self.beta2 * v + (1.0 - self.beta2) * (g * g)
        mhat = m / (1.0 - self.beta1 ** n)
        vhat = v / (1.0 - self.beta2 ** n)
        lr = scheduled_learning_rate(self.learning_rate, self.schedule, t, self.total_steps)
        new = theta + lr * mhat / (np.sqrt(vhat) + self.eps)
        return new, {"adam_t": np.array(t + 1, dtype=np.int64),
                     "adam_m": m, "adam_v": v, "adam_n": n.astype(np.int64)}, False

    def reset(self, state, mask) -> dict:
        """``state`` with the moments of the entries where ``mask`` is true restarted (zero
        moments, zero updates: the next step of those entries is bias-corrected as a first
        one); the step count of the schedule is kept."""
        if "adam_m" not in state:
            return dict(state)
        mask = np.asarray(mask, dtype=bool)
        _check_state_shape("Adam", state, "adam_m", mask.shape)
        new = {k: np.array(v, copy=True) for k, v in state.items()}
        for key in ("adam_m", "adam_v"):
            new[key] = np.where(mask, 0.0, np.asarray(state[key], dtype=np.float64))
        n = np.asarray(state.get("adam_n", np.full(mask.shape, int(state["adam_t"]))))
        new["adam_n"] = np.where(mask, 0, n).astype(np.int64)
        return new

    def best(self, state) -> None:
        """Adam keeps no accepted point: always ``None``."""
        return None


# -- L-BFGS -------------------------------------------------------------------------------------

#: The L-BFGS state's keys (x, F, G: the accepted point, its minimised objective -value and
#: gradient -gradient; p the direction; alpha the pending trial step, 0 when the next point
#: is to be accepted as it is; s, y, count the curvature pairs, oldest first).
_X, _F, _G, _P, _ALPHA = "lbfgs_x", "lbfgs_f", "lbfgs_g", "lbfgs_p", "lbfgs_alpha"
_S, _Y, _COUNT = "lbfgs_s", "lbfgs_y", "lbfgs_count"


@dataclass(frozen=True)
class LBFGS:
    r"""Limited-memory BFGS with a backtracking Armijo line search, one evaluation per call.

    Internally it minimises :math:`F = -\mathrm{value}` with gradient
    :math:`G = -\mathrm{gradient}`. Each call evaluates one point:

    * the first point (and the next one after :meth:`reset` or a convergence) is accepted as
      it is; the direction is :math:`p = -G` with a first step
      :math:`\alpha = \min(1, 1 / \lVert G \rVert_2)` when no curvature pair is held;
    * any other point is the trial :math:`x + \alpha p`. It is accepted when its objective
      and gradient are finite and it satisfies Armijo's condition
      :math:`F_\mathrm{trial} \le F + c_1 \alpha\, G^\top p`; the pair
      :math:`s = x_\mathrm{trial} - x`, :math:`y = G_\mathrm{trial} - G` enters the memory
      when :math:`s^\top y > 10^{-10} \lVert y \rVert^2` (the oldest leaves when full), the
      new direction comes from the two-loop recursion with :math:`H_0 = \gamma I`,
      :math:`\gamma = s^\top y / y^\top y` of the newest pair (steepest descent, memory
      cleared, if it is not a descent direction), and the next trial step is
      :math:`\alpha = 1`;
    * otherwise the step shrinks to the minimiser of the quadratic through :math:`F(0)`,
      :math:`F'(0) = G^\top p` and :math:`F(\alpha)`, clipped to
      :math:`[0.1\alpha, 0.5\alpha]` (to :math:`0.5\alpha` when :math:`F(\alpha)` is not
      finite).

    Converged: :math:`\max |G| \le` ``gtol`` at an accepted point,
    :math:`|F_\mathrm{new} - F_\mathrm{old}| \le` ``ftol``
    :math:`\cdot \max(|F_\mathrm{new}|, |F_\mathrm{old}|, 1)` between successive accepted
    points, or a step below ``min_step``. A converged step returns the accepted point, never
    a failed trial.

    Parameters
    ----------
    memory : int, default=10
        Curvature pairs kept.
    c1 : float, default=1e-4
        Armijo's constant, in (0, 1).
    gtol, ftol : float, default=1e-6, 1e-9
    min_step : float, default=1e-12

    Raises
    ------
    FloatingPointError
        From :meth:`step`, when a point it must accept (the first one) has a non-finite
        objective or gradient: there is nothing to backtrack to.
    """

    memory: int = 10
    c1: float = 1e-4
    gtol: float = 1e-6
    ftol: float = 1e-9
    min_step: float = 1e-12

    def __post_init__(self):
        _check_positive_int("LBFGS", "memory", self.memory)
        _check_real("LBFGS", "c1", self.c1, 0.0, 1.0, open_low=True, open_high=True)
        _check_real("LBFGS", "gtol", self.gtol, 0.0)
        _check_real("LBFGS", "ftol", self.ftol, 0.0)
        _check_real("LBFGS", "min_step", self.min_step, 0.0, open_low=True)

    def step(self, theta, value, gradient, state) -> tuple[np.ndarray, dict, bool]:
        """Take the evaluation of ``theta`` and return the next point to evaluate.

        Returns
        -------
        theta : ndarray
            The next point (the accepted point when converged).
        state : dict
            The new state.
        converged : bool
        """
        x_new, G_new = _as_vector("LBFGS", theta, gradient)
        G_new = -G_new
        F_new = -float(value)
        _check_state_shape("LBFGS", state, _X, x_new.shape)
        alpha = float(state.get(_ALPHA, 0.0))
        if _X not in state or alpha == 0.0:
            return self._accept_as_is(x_new, F_new, G_new, state)

        x, F, G, p = (np.asarray(state[k], dtype=np.float64) for k in (_X, _F, _G, _P))
        F = float(F)
        slope = float(G @ p)
        finite = math.isfinite(F_new) and bool(np.all(np.isfinite(G_new)))
        if finite and F_new <= F + self.c1 * alpha * slope:
            S, Y, count = _push(state, x_new - x, G_new - G)
            converged = (self._small_gradient(G_new)
                         or abs(F_new - F) <= self.ftol * max(abs(F_new), abs(F), 1.0))
            return self._next(x_new, F_new, G_new, S, Y, count, converged)

        # Backtrack: minimiser of q(a) = F + slope a + c a^2 through q(alpha) = F_new.
        new_alpha = 0.5 * alpha
        if math.isfinite(F_new):
            curvature = F_new - F - slope * alpha  # c alpha^2, > 0 when Armijo fails
            if curvature > 0.0:
                quadratic = -slope * alpha * alpha / (2.0 * curvature)
                new_alpha = min(max(quadratic, 0.1 * alpha), 0.5 * alpha)
        out = {k: np.array(v, copy=True) for k, v in state.items() if k.startswith("lbfgs_")}
        if not new_alpha >= self.min_step:  # gives up: the accepted point is the answer
            out[_ALPHA] = _scalar(0.0)
            return x.copy(), out, True
        out[_ALPHA] = _scalar(new_alpha)
        return x + new_alpha * p, out, False

    def _small_gradient(self, G: np.ndarray) -> bool:
        return bool(np.max(np.abs(G), initial=0.0) <= self.gtol)

    def _accept_as_is(self, x, F, G, state) -> tuple[np.ndarray, dict, bool]:
        """The first point, or the one after a reset or a convergence: nothing to compare it
        with, so it is accepted (the memory, if any, is kept)."""
        if not (math.isfinite(F) and np.all(np.isfinite(G))):
            raise FloatingPointError(
                "L-BFGS cannot start from a point whose objective or gradient is not finite "
                f"(objective {-F!r}, {int(np.sum(~np.isfinite(G)))} non-finite gradient "
                "entries).")
        if _COUNT in state:
            S, Y = (np.array(state[k], dtype=np.float64) for k in (_S, _Y))
            count = int(state[_COUNT])
        else:
            S = np.zeros((self.memory, x.size))
            Y = np.zeros((self.memory, x.size))
            count = 0
        return self._next(x, F, G, S, Y, count, self._small_gradient(G))

    def _next(self, x, F, G, S, Y, count, converged) -> tuple[np.ndarray, dict, bool]:
        """The state at the accepted point ``x`` and the next point to evaluate."""
        p, count = _direction(G.ravel(), S, Y, count)
        p = p.reshape(x.shape)
        S, Y = _clear_unused(S, Y, count)
        if converged:
            alpha = 0.0
        elif count == 0:
            alpha = min(1.0, 1.0 / float(np.linalg.norm(G)))
        else:
            alpha = 1.0
        state = {_X: x, _F: _scalar(F), _G: G, _P: p, _ALPHA: _scalar(alpha),
                 _S: S, _Y: Y, _COUNT: np.array(count, dtype=np.int64)}
        if converged:
            return x.copy(), state, True
        return x + alpha * p, state, False

    def reset(self, state, mask) -> dict:
        """``state`` without its curvature pairs (all of them: ``mask`` is not used), keeping
        the accepted point for :meth:`best`. The next point given to :meth:`step` is accepted
        as it is (after a reset the caller may evaluate any point, e.g. with re-seeded
        components)."""
        if _X not in state:
            return dict(state)
        new = {k: np.array(v, copy=True) for k, v in state.items()}
        new[_S] = np.zeros_like(np.asarray(state[_S], dtype=np.float64))
        new[_Y] = np.zeros_like(new[_S])
        new[_COUNT] = np.array(0, dtype=np.int64)
        new[_ALPHA] = _scalar(0.0)
        return new

    def best(self, state) -> tuple[np.ndarray, float] | None:
        """``(point, value)``: the last accepted point and its objective (the maximised
        value), or ``None`` before the first one."""
        if _X not in state:
            return None
        return np.array(state[_X], dtype=np.float64), -float(state[_F])


def _push(state: dict, s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The memory with ``(s, y)`` appended (oldest dropped when full) if ``s.y`` is safely
    positive (the BFGS update keeps H positive definite only then); else as it is."""
    S = np.array(state[_S], dtype=np.float64)
    Y = np.array(state[_Y], dtype=np.float64)
    count = int(state[_COUNT])
    s, y = s.ravel(), y.ravel()
    sy = float(s @ y)
    if not (np.isfinite(sy) and sy > 1e-10 * float(y @ y)):
        return S, Y, count
    if count == S.shape[0]:  # full: shift the oldest out, keeping oldest-first order
        S = np.concatenate([S[1:], s[None]])
        Y = np.concatenate([Y[1:], y[None]])
    else:
        S[count], Y[count] = s, y
        count += 1
    return S, Y, count


def _direction(G: np.ndarray, S: np.ndarray, Y: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """``(p, count)``: ``p = -H G`` by the two-loop recursion over the ``count`` pairs, or
    ``-G`` (and ``count = 0``: the memory is dropped) when that is not a descent direction."""
    if count == 0:
        return -G, 0
    rho = np.empty(count)
    a = np.empty(count)
    q = G.copy()
    for i in range(count - 1, -1, -1):  # newest first
        rho[i] = 1.0 / float(Y[i] @ S[i])
        a[i] = rho[i] * float(S[i] @ q)
        q = q - a[i] * Y[i]
    r = (float(S[count - 1] @ Y[count - 1]) / float(Y[count - 1] @ Y[count - 1])) * q
    for i in range(count):  # oldest first
        b = rho[i] * float(Y[i] @ r)
        r = r + (a[i] - b) * S[i]
    p = -r
    if not float(p @ G) < 0.0:  # not a descent direction (or not finite)
        return -G, 0
    return p, count


def _clear_unused(S: np.ndarray, Y: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero the rows past ``count`` so that equal memories have equal arrays."""
    S, Y = S.copy(), Y.copy()
    S[count:] = 0.0
    Y[count:] = 0.0
    return S, Y


def make_optimizer(name: str, *, learning_rate: float = 0.05, schedule: str = "constant",
                   total_steps: int = 100) -> Adam | LBFGS:
    """The optimizer ``name`` (:data:`OPTIMIZERS`).

    Parameters
    ----------
    name : {'adam', 'lbfgs'}
    learning_rate : float, default=0.05
        Adam's learning rate (> 0; checked for L-BFGS too, which has no learning rate).
    schedule : {'constant', 'cosine', 'exponential'}, default='constant'
        Adam's learning-rate schedule.
    total_steps : int, default=100
        The length of the schedule (>= 1).

    Raises
    ------
    ValueError
        For an unknown name or schedule, a learning rate that is not a finite float > 0, or
        ``total_steps`` not an int >= 1; the message names the value and the valid ones.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid optimizers are "
                         f"{list(OPTIMIZERS)}.")
    adam = Adam(learning_rate=learning_rate, schedule=schedule, total_steps=total_steps)
    return adam if name == "adam" else LBFGS()
