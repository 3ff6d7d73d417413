"""Gaussian mixtures trained by gradient ascent on the E-step statistics of EM.

The E-step is :class:`~dmix.families.gaussian.Gaussian`'s own (``nk``, ``s1``, ``s2`` about the
shift ``c = sum_k w_k mu_k``); the M-step is one optimizer step of
:mod:`dmix.families.gradient` instead of EM's closed form. The gradient of the log-likelihood
follows from those statistics exactly (Fisher's identity: the responsibilities at the current
parameters weight the gradients of ``log w_k N(x; mu_k, Sigma_k)``). With ``a_k = mu_k - c``,
``b_k = s1_k / N_k``, ``P_k = Sigma_k^{-1}`` and ``n`` the rows (their weight)::

    d loglik / d logit_k = N_k - n w_k                        (w = softmax(logits))
    d loglik / d mu_k    = P_k (s1_k - N_k a_k)               (sum_i r_ik P_k (x_i - mu_k))
    d loglik / d Sigma   = N (P Sigma_hat P - P) / 2          (the symmetric gradient)

``Sigma_hat`` is the scatter about the *current* means in the structure's own form,
``estimate(nk, b, s2, 0) - estimate(nk, b - a, 0, 0)`` (``estimate`` with zero second moments
is minus the structure's outer product, so the difference swaps ``b b^T`` for
``(b - a)(b - a)^T``, which recentres the moments from ``c + b`` to ``c + a``), and ``N``
makes ``N Sigma_hat`` the summed scatter the parameter sees: ``N_k`` for full and diagonal
covariances, ``sum_k N_k`` for the tied ones, times ``D`` for the spherical ones (one variance
for ``D`` coordinates). Diagonal structures take the same formula elementwise
(``P Sigma_hat P = P^2 Sigma_hat``).

Free coordinates ``theta = [logits, means, covariance]``: logits ``log w - mean(log w)`` (the
softmax gauge pinned to zero mean, so that the optimizer's zero-sum steps come back as they
were sent), the means, and for 'full' and 'tied' the lower Cholesky factor ``L`` of
``Sigma - floor I`` with a log-parametrised diagonal, for the diagonal and spherical structures
``log(variance - floor)``; ``floor = reg_covar + var_regularization``. A symmetric gradient
``G`` in ``Sigma = L L^T + floor I`` is ``2 G L`` in ``L``; a variance ``v = exp(s) + floor``
gives ``G (v - floor)`` in ``s``. Every ``theta`` is a valid model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dmix.errors import DataError, IllConditionedError
from dmix.families.base import Params, Stats
from dmix.families.gaussian import _EPS10, Gaussian, _shift
from dmix.families.gradient import (
    GradientTraining,
    factor_above_floor,
    factor_gradient,
    pack_factor,
    unpack_factor,
    variances_to_free,
)

__all__ = ["GaussianGradient"]

@dataclass(frozen=True)
class GaussianGradient(GradientTraining, Gaussian):
    """Gaussian mixture family fitted by gradients (see the module docstring).

    The gradient machinery comes first in the bases, so its ``estep`` (held-out rows),
    ``mstep`` (the optimizer step), ``objective`` and ``for_iteration`` (chunk subsets) take
    precedence over EM's; the E-step statistics, densities, posteriors and re-seeding are
    :class:`Gaussian`'s.

    Parameters
    ----------
    covariance_type, reg_covar, var_regularization, weighted
        As :class:`Gaussian`'s; ``reg_covar + var_regularization`` is the variance floor.
    optimizer, learning_rate, learning_rate_schedule, schedule_steps, batch_fraction, \
validation_fraction, on_collapse, random_state, iteration
        See :class:`dmix.families.gradient.GradientTraining`.

    The EM-only options of :class:`Gaussian` (``prior``, ``cem``, annealing and
    ``missing='marginalize'``) are rejected.
    """

    name: ClassVar[str] = "gaussian_gradient"

    def __post_init__(self):
        Gaussian.__post_init__(self)
        for option, bad in (("prior", self.prior is not None), ("cem", self.cem),
                            ("annealing", self.annealing_iter or self.inverse_temperature < 1),
                            ("missing='marginalize'", self.missing == "marginalize")):
            if bad:
                raise ValueError(f"{option} is an option of EM; gradient training does not "
                                 "have it.")
        self._check_gradient_options()

    @property
    def floor(self) -> float:
        """The floor of every variance: ``Sigma = L L^T + floor I``."""
        return float(self.reg_covar + self.var_regularization)

    # -- parameters -------------------------------------------------------------------------

    def start(self, params: Params) -> Params:
        """Parameters the free coordinates can represent: weights normalised, and each
        covariance with no margin above the floor (a single point's, ``reg_covar``) raised by
        the floor, so that ``Sigma - floor I`` is positive definite."""
        cov = self.covariance
        k, d = params["means"].shape
        covs = np.array(params["covariances"], dtype=np.float64)
        floor = self.floor
        lifted = covs + floor * (np.eye(d) if cov.matrix else 1.0)
        stacked = covs if not cov.tied else covs[None]
        for j in range(1 if cov.tied else k):
            if not self._has_margin(stacked[j]):
                if cov.tied:
                    covs = lifted
                else:
                    covs[j] = lifted[j]
        if not all(self._has_margin(c) for c in (covs[None] if cov.tied else covs)):
            raise IllConditionedError(
                "Gradient training needs covariances above the variance floor (reg_covar + "
                "var_regularization); a starting covariance is singular. Increase reg_covar.")
        weights = np.asarray(params["weights"], dtype=np.float64)
        if not np.all(weights > 0):
            raise DataError("Gradient training needs positive initial weights (they are "
                            "softmax logits); got a zero weight.")
        return self.make_params(weights / np.sum(weights), params["means"], covs)

    def _has_margin(self, cov) -> bool:
        if self.covariance.matrix:
            try:
                np.linalg.cholesky(cov - self.floor * np.eye(cov.shape[-1]))
            except np.linalg.LinAlgError:
                return False
            return True
        return bool(np.all(np.isfinite(cov)) and np.all(cov - self.floor > 0))

    def _pack(self, params: Params) -> np.ndarray:
        log_w = np.log(params["weights"])
        cov = np.asarray(params["covariances"], dtype=np.float64)
        if self.covariance.matrix:
            free = pack_factor(factor_above_floor(cov, self.floor))
        else:
            free = variances_to_free(cov, self.floor)
        return np.concatenate([log_w - np.mean(log_w), params["means"].ravel(),
                               np.ravel(free)])

    def _unpack(self, theta: np.ndarray, params: Params):
        """``(params, invalid components)`` from ``theta`` (finite by the caller's check)."""
        k, d = params["means"].shape
        logits, means, free = theta[:k], theta[k : k + k * d].reshape(k, d), theta[k + k * d:]
        weights = np.exp(logits - np.max(logits))
        weights /= np.sum(weights)
        shape = self.covariance.shape(k, d)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.covariance.matrix:
                chol = unpack_factor(free.reshape(shape[:-2] + (-1,)), d)
                cov = chol @ np.swapaxes(chol, -1, -2) + self.floor * np.eye(d)
            else:
                cov = (np.exp(free) + self.floor).reshape(shape)
        per = cov.reshape(1 if self.covariance.tied else k, -1)
        bad = ~np.all(np.isfinite(per), axis=1)
        if not np.any(bad):  # a factorisation that fails (floor 0, underflow) is invalid too
            try:
                prec_chol = self.covariance.precision_cholesky(cov)
                bad = ~np.all(np.isfinite(prec_chol.reshape(per.shape[0], -1)), axis=1)
            except IllConditionedError:  # which ones (at least one fails)
                bad = np.array([not self._precision_ok(c)
                                for c in (cov[None] if self.covariance.tied else cov)])
                bad |= ~np.any(bad)
        if np.any(bad):
            if self.covariance.tied:
                raise IllConditionedError(
                    "The shared (tied) covariance became non-finite or singular during "
                    "gradient training; lower learning_rate or increase reg_covar.")
            return params, np.flatnonzero(bad)
        return {"weights": weights, "means": means.copy(), "covariances": cov,
                "precisions_cholesky": prec_chol}, np.zeros(0, dtype=np.intp)

    def _precision_ok(self, cov) -> bool:
        try:
            self.covariance.precision_cholesky(cov[None] if not self.covariance.tied else cov)
        except IllConditionedError:
            return False
        return True

    def _owners(self, params: Params) -> np.ndarray:
        k, d = params["means"].shape
        comp = np.arange(k)
        m = self.covariance.n_parameters(k, d)  # entries of theta
        cov_owner = np.full(m, -1) if self.covariance.tied else np.repeat(comp, m // k)
        return np.concatenate([comp, np.repeat(comp, d), cov_owner])

    # -- worker side ------------------------------------------------------------------------

    def _train_stats(self, params: Params, x, xp, workspace=None) -> Stats:
        """EM's E-step statistics (``nk``, ``s1``, ``s2`` about ``c``) of the rows ``x``."""
        return Gaussian.estep(self, params, x, xp, workspace)

    # -- driver side ------------------------------------------------------------------------

    def scatter(self, params: Params, stats: Stats):
        """``(Sigma_hat, N)``: the responsibility-weighted scatter about the current means in
        the structure's form, and the weight ``N`` with ``N Sigma_hat`` the summed scatter."""
        cov = self.covariance
        nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10
        b = np.ascontiguousarray(stats["s1"]) / nk[:, None]
        s2 = cov.from_quadratic(np.ascontiguousarray(np.asarray(stats["s2"]).T))
        a = params["means"] - _shift(params)
        sigma_hat = cov.estimate(nk, b, s2, 0.0) - cov.estimate(nk, b - a, 0.0 * s2, 0.0)
        return sigma_hat, cov.scatter_counts(nk, a.shape[1])

    def _value_and_gradient(self, params: Params, stats: Stats):
        """The mean log-likelihood of the step's rows and its gradient in ``theta``."""
        cov = self.covariance
        n = float(stats["n"])
        nk = np.asarray(stats["nk"], dtype=np.float64)
        s1 = np.ascontiguousarray(stats["s1"], dtype=np.float64)
        prec = cov.precisions(params["precisions_cholesky"])
        sigma_hat, weight = self.scatter(params, stats)
        resid = s1 - nk[:, None] * (params["means"] - _shift(params))  # sum_i r_ik (x_i - mu_k)
        g_mu = cov.apply_precision(prec, resid)
        g_cov = 0.5 * weight * (cov.sandwich(prec, sigma_hat) - prec)
        g_logit = nk - np.sum(nk) * params["weights"]
        grad = np.concatenate([g_logit, g_mu.ravel(),
                               np.ravel(self._covariance_gradient(g_cov, params))])
        return float(stats["loglik"]) / n, grad / n

    def _covariance_gradient(self, g_cov, params: Params) -> np.ndarray:
        """The gradient with respect to the free covariance entries (see ``_pack``)."""
        cov = np.asarray(params["covariances"], dtype=np.float64)
        if not self.covariance.matrix:
            return g_cov * (cov - self.floor)  # d/ds of exp(s) + floor
        return factor_gradient(g_cov, factor_above_floor(cov, self.floor))
