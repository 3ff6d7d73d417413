"""What every gradient-trained family shares: held-out rows, chunk subsets, the optimizer step.

A gradient family's E-step returns sums over rows from which the driver forms the gradient of
the mean log-likelihood; its M-step is one optimizer step (:mod:`dmix.families._optim`) whose
state (moments, curvature pairs, the best parameters seen) travels in the M-step ``State``, so
a checkpoint holds it and a resumed fit continues exactly.

* **Full batch** (``batch_fraction=1``): every pass reads every chunk, one step per pass.
* **Stochastic** (``batch_fraction < 1``): a pass reads a random subset of the chunks, drawn
  from ``(random_state, step)`` alone, so restarts fitted side by side read the same chunks and
  a resumed fit draws what the uninterrupted one drew. The step follows the gradient of those
  chunks' rows (an unbiased estimate of the full one when chunks have equal sizes).
* **Held-out rows** (``validation_fraction > 0``): each row is held out with that probability,
  decided by ``(random_state, global row index)`` (the same rows whatever the chunking and for
  every restart). Held-out rows add to ``val_loglik`` and ``val_n`` only; the objective the
  engine records and stops on is their mean log-likelihood, and the fit returns the
  parameters that scored best on them (early stopping). With stochastic steps that is the
  held-out rows of the chunks the step read: a noisier estimate, as a mini-batch's is.

Without held-out rows, full-batch fits also return the best parameters evaluated (L-BFGS's
accepted point; for Adam the best of the iterates); stochastic fits return the last iterate.

A subclass is a frozen dataclass that inherits these fields and provides
``_train_stats(params, x, xp, workspace)`` (the sums over the rows of ``x``, with ``n``,
``loglik`` and ``n_nonfinite``), ``log_density``, ``_pack(params) -> theta``,
``_unpack(theta, params) -> params``, ``_owners(params)`` (the component of every entry of
``theta``, -1 for shared ones) and ``_value_and_gradient(params, stats)`` (the mean objective
over the training rows and its gradient with respect to ``theta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from dmix.errors import IllConditionedError
from dmix.families._optim import OPTIMIZERS, SCHEDULES, make_optimizer
from dmix.families.base import SPEC_OMIT_DEFAULT, Params, State, Stats
from dmix.rng import keyed_uniform

__all__ = ["GradientTraining", "factor_above_floor", "factor_gradient", "pack_factor",
           "unpack_factor", "variances_to_free"]

#: ``keyed_uniform`` streams: the held-out split.
_HELDOUT_STREAM = 0x5EED_0001
#: The key of the chunk subsets (with the seed and the step).
_SUBSET_TAG = 0x5EED_0002
#: Prefix of the M-step state's copy of the best parameters (``best_score`` their objective).
_BEST = "best_"
#: Invalid L-BFGS trial points rejected in one M-step (each halves the step or less).
_MAX_INVALID_TRIALS = 60


def _weights_column(x, weighted: bool, xp):
    """``(features, row weights or None)`` of a block."""
    if weighted:
        return x[:, :-1], x[:, -1]
    return x, None


@dataclass(frozen=True)
class GradientTraining:
    """The options of gradient training (fields shared by every gradient family).

    Parameters
    ----------
    optimizer : {'adam', 'lbfgs'}
        Adam, or L-BFGS with a backtracking line search (full batch only).
    learning_rate : float
        Adam's step size (before the schedule).
    learning_rate_schedule : {'constant', 'cosine', 'exponential'}
        How Adam's step size falls over ``schedule_steps`` steps (cosine and exponential to
        1/100).
    schedule_steps : int
        The steps the schedule spans (the estimator's ``max_iter``; 0 with the constant
        schedule, so that a resumed fit may run longer).
    batch_fraction : float in (0, 1]
        Fraction of the chunks each step reads (1: full batch).
    validation_fraction : float in [0, 1)
        Fraction of the rows held out for early stopping.
    on_collapse : {'reseed', 'raise'}
        A component whose parameters become non-finite: re-seeded by the engine, or an error.
    random_state, iteration : int
        The fit's seed (keys the held-out rows and the chunk subsets) and the step (set by
        :meth:`for_iteration`); neither enters a saved spec.
    """

    optimizer: str = "adam"
    learning_rate: float = 0.05
    learning_rate_schedule: str = "constant"
    schedule_steps: int = 0
    batch_fraction: float = 1.0
    validation_fraction: float = 0.0
    on_collapse: str = "reseed"
    random_state: int = field(default=0, metadata={SPEC_OMIT_DEFAULT: True})
    iteration: int = field(default=0, metadata={SPEC_OMIT_DEFAULT: True})

    def _check_gradient_options(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}. Got "
                             f"{self.optimizer!r} instead.")
        if self.learning_rate_schedule not in SCHEDULES:
            raise ValueError(f"learning_rate_schedule must be one of {list(SCHEDULES)}. Got "
                             f"{self.learning_rate_schedule!r} instead.")
        lr = self.learning_rate
        if isinstance(lr, bool) or not (isinstance(lr, int | float) and math.isfinite(lr)
                                        and lr > 0):
            raise ValueError(f"learning_rate must be a float > 0. Got {lr!r} instead.")
        frac = self.batch_fraction
        if isinstance(frac, bool) or not (isinstance(frac, int | float) and 0 < frac <= 1):
            raise ValueError(f"batch_fraction must be a float in (0, 1]. Got {frac!r} instead.")
        frac = self.validation_fraction
        if isinstance(frac, bool) or not (isinstance(frac, int | float) and 0 <= frac < 1):
            raise ValueError(
                f"validation_fraction must be a float in [0, 1). Got {frac!r} instead.")
        if self.learning_rate_schedule != "constant" and self.schedule_steps < 1:
            raise ValueError(f"learning_rate_schedule={self.learning_rate_schedule!r} needs "
                             f"schedule_steps >= 1. Got {self.schedule_steps!r} instead.")
        if self.on_collapse not in ("reseed", "raise"):
            raise ValueError(
                f"on_collapse must be 'reseed' or 'raise'. Got {self.on_collapse!r} instead.")
        if self.optimizer == "lbfgs" and self.batch_fraction < 1:
            raise ValueError(
                "optimizer='lbfgs' needs full batches (its line search compares objective "
                f"values of one function); got batch_fraction={self.batch_fraction!r}. Use "
                "optimizer='adam' for stochastic steps.")

    # -- worker side ------------------------------------------------------------------------

    @property
    def needs_row_index(self) -> bool:
        """Held-out rows are keyed by their global index (see the module docstring)."""
        return self.validation_fraction > 0

    def heldout_rows(self, start: int, n: int) -> np.ndarray:
        """Whether each of the rows ``start .. start + n - 1`` is held out (bool, (n,))."""
        rows = np.arange(int(start), int(start) + int(n), dtype=np.int64)
        return keyed_uniform(self.random_state, _HELDOUT_STREAM, rows) < self.validation_fraction

    def estep(self, params: Params, x, xp, workspace=None, start: int = 0) -> Stats:
        """The training sums of the block's rows; with held-out rows, also ``val_loglik`` and
        ``val_n`` (their weighted log-likelihood and weight) from the others."""
        if not self.validation_fraction:
            return self._train_stats(params, x, xp, workspace)
        held = xp.asarray(self.heldout_rows(start, x.shape[0]))
        val, weights = _weights_column(x[held], getattr(self, "weighted", False), xp)
        # Held-out rows first: the training sums may be views of the workspace's buffers.
        lp = self.log_density(params, val, xp, workspace)
        finite = xp.isfinite(lp)
        lp = xp.where(finite, lp, 0.0)
        val_n = float(val.shape[0]) if weights is None else float(xp.sum(weights))
        val_loglik = float(xp.sum(lp if weights is None else weights * lp))
        n_bad = int(val.shape[0] - int(xp.count_nonzero(finite)))
        stats = dict(self._train_stats(params, x[~held], xp, workspace))
        stats["n_nonfinite"] = stats["n_nonfinite"] + n_bad
        stats["val_loglik"] = np.float64(val_loglik)
        stats["val_n"] = np.float64(val_n)
        return stats

    # -- driver side ------------------------------------------------------------------------

    def block_subset(self, n_blocks: int):
        """The chunks step ``iteration`` reads: None (all) for full batches, else
        ``max(1, round(batch_fraction * n_blocks))`` of them drawn without replacement from
        ``(random_state, iteration)``, in increasing order."""
        if self.batch_fraction >= 1:
            return None
        m = max(1, int(round(self.batch_fraction * n_blocks)))
        rng = np.random.default_rng([int(self.random_state) % 2**63, int(self.iteration),
                                     _SUBSET_TAG])
        return np.sort(rng.choice(n_blocks, size=m, replace=False))

    def for_iteration(self, iteration: int):
        """The family of step ``iteration`` (it keys the chunk subset)."""
        if self.batch_fraction >= 1:
            return self
        return replace(self, iteration=int(iteration))

    def objective(self, params: Params, stats: Stats) -> float:
        """What the engine records and stops on: the mean log-likelihood of the held-out rows
        with ``validation_fraction > 0``, else of the rows the step read."""
        if self.validation_fraction:
            if not stats["val_n"] > 0:
                raise ValueError(
                    "No held-out rows in this pass: raise validation_fraction (or "
                    "batch_fraction), or use more rows.")
            return float(stats["val_loglik"] / stats["val_n"])
        return float(stats["loglik"] / stats["n"])

    @property
    def keeps_best(self) -> bool:
        """Whether the fit returns the best parameters evaluated (exact or held-out objective)
        rather than the last iterate (stochastic steps without held-out rows)."""
        return self.validation_fraction > 0 or self.batch_fraction >= 1

    def _optimizer(self):
        return make_optimizer(self.optimizer, learning_rate=self.learning_rate,
                              schedule=self.learning_rate_schedule,
                              total_steps=max(1, self.schedule_steps))

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        """One optimizer step from the summed statistics.

        Components whose new parameters are not finite (or not a valid covariance) keep their
        previous values, their optimizer state is reset, and they are listed under
        ``"collapsed"`` for the engine to re-seed (:meth:`reseed`), with a warning and a count.
        """
        if not stats["n"] > 0:
            raise ValueError("No training rows in this pass: lower validation_fraction or "
                             "raise batch_fraction.")
        opt = self._optimizer()
        state = dict(state)
        if self.keeps_best:
            score = self.objective(params, stats)
            if math.isfinite(score) and score > float(state.get("best_score", -math.inf)):
                state["best_score"] = np.float64(score)
                state.update({f"{_BEST}{k}": np.array(v, copy=True) for k, v in params.items()})
        theta = self._pack(params)
        value, gradient = self._value_and_gradient(params, stats)
        opt_state = {k: v for k, v in state.items() if not k.startswith(_BEST)}
        new_theta, opt_state, converged = opt.step(theta, value, gradient, opt_state)
        if self.optimizer == "lbfgs":
            # A trial point that gives no valid model (a step so long that a scale
            # overflows) is a failed trial of the line search, not a collapse: the optimizer
            # is told so at once, without a pass, and backtracks.
            for _ in range(_MAX_INVALID_TRIALS):
                if converged or not self._invalid_components(new_theta, params).size:
                    break
                new_theta, opt_state, converged = opt.step(
                    new_theta, -math.inf, np.full_like(new_theta, np.nan), opt_state)
        new, bad = self._unpack_checked(new_theta, theta, params)
        if bad.size and self.on_collapse == "raise":
            raise IllConditionedError(
                f"Gradient training failed: the parameters of component(s) "
                f"{[int(j) for j in bad]} became non-finite. Lower learning_rate, increase "
                "reg_covar, scale the data, or pass on_collapse='reseed'.")
        if bad.size:  # those components start their optimizer state afresh
            opt_state = opt.reset(opt_state, np.isin(self._owners(params), bad))
        state = {**{k: v for k, v in state.items() if k.startswith(_BEST)}, **opt_state}
        if bad.size:
            state["collapsed"] = bad
        if converged:
            state["converged"] = True
        return new, state

    def _invalid_components(self, theta: np.ndarray, params: Params) -> np.ndarray:
        """Components whose entries of ``theta`` are not finite or give no valid model."""
        owners = self._owners(params)
        bad = np.unique(owners[~np.isfinite(theta)])
        if bad.size:
            return bad
        return self._unpack(theta, params)[1]

    def _unpack_checked(self, theta: np.ndarray, previous: np.ndarray, params: Params):
        """``(params, bad components)``: the components whose entries of ``theta`` are not
        finite or whose parameters cannot be built take their ``previous`` entries."""
        owners = self._owners(params)
        bad = np.unique(owners[~np.isfinite(theta)])
        if np.any(bad < 0):  # a shared parameter went bad: no component to blame
            raise IllConditionedError(
                "Gradient training failed: a parameter shared by the components (a tied "
                "covariance) became non-finite. Lower learning_rate or scale the data.")
        theta = np.where(np.isin(owners, bad), previous, theta)
        new, invalid = self._unpack(theta, params)
        if invalid.size:
            bad = np.union1d(bad, invalid)
            new, _ = self._unpack(np.where(np.isin(owners, bad), previous, theta), params)
        return new, bad.astype(np.intp)

    def best_params(self, state: State):
        """``(params, objective)`` of the best parameters kept in ``state``, or None."""
        if "best_score" not in state:
            return None
        params = {k[len(_BEST):]: v for k, v in state.items()
                  if k.startswith(_BEST) and k != "best_score"}
        return params, float(state["best_score"])


# -- the free coordinates of covariances, shared by the gradient families --------------------
#
# A covariance is ``Sigma = L L^T + floor I`` with ``L`` lower triangular and free, its diagonal
# log-parametrised (so every value is a valid model); a variance is ``exp(s) + floor``. A
# symmetric gradient ``G`` in ``Sigma`` is ``2 G L`` in ``L`` (lower triangle), times ``l_dd``
# on the diagonal for its logarithm; in ``s`` it is ``G (v - floor)``.


def factor_above_floor(cov: np.ndarray, floor: float) -> np.ndarray:
    """``L`` with ``L L^T = cov - floor I`` (matrices (..., D, D)).

    A covariance at the floor in some direction has ``L L^T`` singular there, and rounding
    can leave ``cov - floor I`` indefinite by ``eps |cov|``: its eigenvalues are then raised to
    that level before factoring (deterministic, so resumed fits stay exact).
    """
    s = cov - floor * np.eye(cov.shape[-1])
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(0.5 * (s + np.swapaxes(s, -1, -2)))
        level = 16 * np.finfo(np.float64).eps * np.max(np.abs(vals), axis=-1, keepdims=True)
        s = (vecs * np.maximum(vals, level)[..., None, :]) @ np.swapaxes(vecs, -1, -2)
        try:
            return np.linalg.cholesky(0.5 * (s + np.swapaxes(s, -1, -2)))
        except np.linalg.LinAlgError:
            raise IllConditionedError(
                "A covariance is not above the variance floor (reg_covar) times I: raise "
                "reg_covar or scale the data.") from None


def pack_factor(chol: np.ndarray) -> np.ndarray:
    """The free entries of ``L`` (..., D, D): its lower triangle in ``np.tril_indices``
    order, the diagonal as logarithms, shape (..., D (D + 1) / 2)."""
    rows, cols = np.tril_indices(chol.shape[-1])
    free = chol[..., rows, cols]
    diag = rows == cols
    free[..., diag] = np.log(free[..., diag])
    return free


def unpack_factor(free: np.ndarray, d: int) -> np.ndarray:
    """``L`` (..., D, D) from :func:`pack_factor`'s entries (overflow gives ``inf``)."""
    rows, cols = np.tril_indices(d)
    diag = rows == cols
    chol = np.zeros(free.shape[:-1] + (d, d))
    chol[..., rows[~diag], cols[~diag]] = free[..., ~diag]
    with np.errstate(over="ignore"):
        chol[..., rows[diag], cols[diag]] = np.exp(free[..., diag])
    return chol


def factor_gradient(g_sigma: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """The gradient in :func:`pack_factor`'s entries from the symmetric gradient ``G`` in
    ``Sigma = L L^T + floor I``."""
    rows, cols = np.tril_indices(chol.shape[-1])
    free = (2.0 * g_sigma @ chol)[..., rows, cols]
    diag = rows == cols
    free[..., diag] *= chol[..., rows[diag], cols[diag]]  # d/dl of exp(l)
    return free


def variances_to_free(var: np.ndarray, floor: float) -> np.ndarray:
    """``s = log(v - floor)``; a variance at the floor (``exp(s)`` lost to rounding) keeps the
    smallest normal number."""
    return np.log(np.maximum(var - floor, np.finfo(np.float64).tiny))
