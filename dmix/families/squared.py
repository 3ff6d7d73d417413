"""Squared (subtractive) Gaussian mixtures, trained by streamed gradients.

A squared mixture (Loconte et al., "Subtractive Mixture Models via Squaring", ICLR 2024;
shared/notes/model-math.md section 4) has real weights ``w_i`` of any sign::

    p(x) = f(x)^2 / Z,   f(x) = sum_i w_i N(x; mu_i, Sigma_i),
    Z = sum_ij w_i w_j M_ij,   M_ij = int N_i N_j = N(mu_i; mu_j, Sigma_i + Sigma_j),

so ``log p(x) = 2 log |f(x)| - log Z``: a valid density whatever the signs, which lets three
components carve the hole of a ring. It has no closed-form M-step; the family is fitted by
gradient ascent on the mean log-likelihood (:mod:`dmix.families.gradient`).

Parameters (``Params``): ``weights`` (K,), ``means`` (K, D), ``covariances`` (K, D, D) for
``covariance_type='full'`` or (K, D) for ``'diag'``, and, derived from them,
``precisions_cholesky`` (scikit-learn's convention: upper ``U`` with ``Sigma^{-1} = U U^T``,
or ``1 / sqrt(variance)``) and ``log_normalizer`` (``log Z``). The optimizer moves
``theta = [w, mu, L]`` with ``Sigma = L L^T + reg_covar I``, ``L`` lower triangular with a
log-parametrised diagonal (``Sigma = diag(exp(s)) + reg_covar`` for diagonal covariances):
every ``theta`` is a valid model.

Gradients (exact, analytic). Per row, with ``n_i = N(x; mu_i, Sigma_i)``, ``d_i = x - mu_i``,
``P_i = Sigma_i^{-1}`` and ``rho_i = 2 w_i n_i / f``::

    d (2 log|f|) / d w_i     = 2 n_i / f
    d (2 log|f|) / d mu_i    = rho_i P_i d_i
    d (2 log|f|) / d Sigma_i = rho_i (P_i d_i d_i^T P_i - P_i) / 2

so a block returns the sums over its rows of ``2 n_i / f``, ``rho_i``, ``rho_i d_i`` and
``rho_i d_i d_i^T`` (moments about the current means, known before the pass), and the driver
multiplies by ``P_i``. For the normaliser, with ``S_ij = Sigma_i + Sigma_j``,
``v_ij = S_ij^{-1} (mu_i - mu_j)``::

    d Z / d w_i     = 2 sum_j w_j M_ij
    d Z / d mu_i    = -2 w_i sum_j w_j M_ij v_ij
    d Z / d Sigma_i = w_i sum_j w_j M_ij (v_ij v_ij^T - S_ij^{-1})     (j = i included)

computed once per step on the driver. A symmetric gradient ``G`` with respect to
``Sigma = L L^T + r I`` is ``2 G L`` (lower triangle) with respect to ``L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dmix.families.base import Params, Stats, tree_add
from dmix.families.gradient import (
    GradientTraining,
    factor_above_floor,
    factor_gradient,
    pack_factor,
    unpack_factor,
    variances_to_free,
)
from dmix.xp import asarray_f64, to_host

__all__ = ["SquaredGaussian", "log_normalizer"]

_LOG_2PI = float(np.log(2.0 * np.pi))
COVARIANCE_TYPES = ("full", "diag")


def log_normalizer(weights, means, covariances, *, gradient: bool = True):
    """``log Z`` and its gradient with respect to ``(w, mu, Sigma)``.

    ``Z = sum_ij w_i w_j M_ij`` with ``M_ij = N(mu_i; mu_j, Sigma_i + Sigma_j)``.

    Parameters
    ----------
    weights : ndarray (K,)
    means : ndarray (K, D)
    covariances : ndarray (K, D, D) or (K, D)
        Full covariances, or the variances of diagonal ones.
    gradient : bool, default=True
        Whether to compute the gradient (it needs the inverses of the ``K^2`` pair
        covariances; the value alone needs only their Cholesky factors).

    Returns
    -------
    log_z : float
    grads : dict or None
        ``weights`` (K,), ``means`` (K, D) and ``covariances`` (the shape of
        ``covariances``; the symmetric gradient for full ones) of ``log Z``; None when
        ``gradient`` is false.
    """
    weights = np.asarray(weights, dtype=np.float64)
    k, d = means.shape
    diff = means[:, None, :] - means[None, :, :]  # mu_i - mu_j
    diagonal = covariances.ndim == 2
    s = covariances[:, None] + covariances[None, :]
    if diagonal:  # every quantity factorises over the features
        v = diff / s
        log_m = -0.5 * (d * _LOG_2PI + np.sum(np.log(s) + diff * v, axis=2))
    else:
        s_chol = np.linalg.cholesky(s)
        z = np.linalg.solve(s_chol, diff[..., None])[..., 0]
        log_det = 2.0 * np.sum(np.log(np.diagonal(s_chol, axis1=2, axis2=3)), axis=2)
        log_m = -0.5 * (d * _LOG_2PI + log_det + np.sum(z * z, axis=2))
    top = np.max(log_m)
    m = np.exp(log_m - top)  # M_ij / exp(top): Z and its gradient share the factor
    big_z = float(weights @ m @ weights)
    if not big_z > 0:
        raise FloatingPointError(f"The normaliser Z = {big_z} is not positive: every weight is "
                                 "zero or the components coincide.")
    log_z = float(np.log(big_z) + top)
    if not gradient:
        return log_z, None
    if diagonal:
        s_inv, outer = 1.0 / s, v * v
    else:
        s_inv = np.linalg.inv(s)
        v = np.einsum("ijab,ijb->ija", s_inv, diff)
        outer = v[..., :, None] * v[..., None, :]
    wm = weights[None, :] * m / big_z  # w_j M_ij / Z
    axes = "ija" if diagonal else "ijab"
    grads = {
        "weights": 2.0 * (m @ weights) / big_z,
        "means": -2.0 * weights[:, None] * np.einsum("ij,ija->ia", wm, v),
        "covariances": weights.reshape((k,) + (1,) * (covariances.ndim - 1))
        * np.einsum(f"ij,{axes}->{axes[0] + axes[2:]}", wm, outer - s_inv),
    }
    return log_z, grads


@dataclass(frozen=True)
class SquaredGaussian(GradientTraining):
    """Squared Gaussian mixture family (real weights), trained by gradients.

    Parameters
    ----------
    covariance_type : {'full', 'diag'}
    reg_covar : float
        The floor added to every variance: ``Sigma = L L^T + reg_covar I``.
    weighted : bool
        Blocks carry the rows' weights as their last column.
    optimizer, learning_rate, learning_rate_schedule, schedule_steps, batch_fraction, \
validation_fraction, random_state, iteration
        See :class:`dmix.families.gradient.GradientTraining`.
    """

    name: ClassVar[str] = "squared_gaussian"

    covariance_type: str = "full"
    reg_covar: float = 1e-6
    weighted: bool = False

    def __post_init__(self):
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {list(COVARIANCE_TYPES)} for "
                             f"squared mixtures. Got {self.covariance_type!r} instead.")
        if not (isinstance(self.reg_covar, int | float) and math.isfinite(self.reg_covar)
                and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a float >= 0. Got {self.reg_covar!r} instead.")
        self._check_gradient_options()

    @property
    def full(self) -> bool:
        return self.covariance_type == "full"

    # -- parameters -------------------------------------------------------------------------

    def make_params(self, weights, means, covariances) -> Params:
        """Complete parameters (with the precision factors and ``log Z``)."""
        weights = np.array(weights, dtype=np.float64)
        means = np.array(means, dtype=np.float64)
        covariances = np.array(covariances, dtype=np.float64)
        if self.full:
            chol = np.linalg.cholesky(covariances)
            eye = np.broadcast_to(np.eye(means.shape[1]), covariances.shape)
            prec_chol = np.swapaxes(np.linalg.solve(chol, eye), 1, 2)  # U = L^{-T}
        else:
            prec_chol = 1.0 / np.sqrt(covariances)
        log_z, _ = log_normalizer(weights, means, covariances, gradient=False)
        return {"weights": weights, "means": means, "covariances": covariances,
                "precisions_cholesky": prec_chol, "log_normalizer": np.float64(log_z)}

    def n_parameters(self, params: Params) -> int:
        """Free parameters: ``p(x)`` does not change when every weight is scaled, so ``K - 1``
        weights, plus means and covariances."""
        k, d = params["means"].shape
        cov = k * d * (d + 1) // 2 if self.full else k * d
        return k - 1 + k * d + cov

    def _pack(self, params: Params) -> np.ndarray:
        cov = params["covariances"]
        if self.full:
            free = pack_factor(factor_above_floor(cov, self.reg_covar))
        else:
            free = variances_to_free(cov, self.reg_covar)
        return np.concatenate([params["weights"], params["means"].ravel(), free.ravel()])

    def _split(self, theta: np.ndarray, k: int, d: int):
        w, rest = theta[:k], theta[k:]
        return w, rest[: k * d].reshape(k, d), rest[k * d:].reshape(k, -1)

    def _unpack(self, theta: np.ndarray, params: Params):
        """``(params, invalid components)`` from ``theta`` (finite by the caller's check)."""
        k, d = params["means"].shape
        w, mu, free = self._split(theta, k, d)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.full:
                chol = unpack_factor(free, d)
                cov = chol @ np.swapaxes(chol, 1, 2) + self.reg_covar * np.eye(d)
            else:
                cov = np.exp(free) + self.reg_covar
        variances = np.diagonal(cov, axis1=1, axis2=2) if self.full else cov
        invalid = np.flatnonzero(~np.all(np.isfinite(cov.reshape(k, -1)), axis=1)
                                 | ~np.all(variances > 0, axis=1))
        if invalid.size:
            return params, invalid
        return self.make_params(w, mu, cov), invalid

    def _owners(self, params: Params) -> np.ndarray:
        k, d = params["means"].shape
        m = d * (d + 1) // 2 if self.full else d
        comp = np.arange(k)
        return np.concatenate([comp, np.repeat(comp, d), np.repeat(comp, m)])

    # -- worker side ------------------------------------------------------------------------

    def _log_components(self, params: Params, x, xp):
        """``log N(x; mu_i, Sigma_i)`` (n, K) and the differences ``x - mu_i`` (K, n, D), in
        float64 whatever the data's precision (components cancel: float32 cannot resolve
        ``f``)."""
        x = asarray_f64(x, xp)
        means = xp.asarray(params["means"], dtype=np.float64)
        prec = xp.asarray(params["precisions_cholesky"], dtype=np.float64)
        k, d = params["means"].shape
        diff = x[None, :, :] - means[:, None, :]
        if self.full:
            z = xp.matmul(diff, prec)  # (K, n, D): U^T d as rows
            log_det = np.sum(np.log(np.diagonal(params["precisions_cholesky"], axis1=1,
                                                axis2=2)), axis=1)
        else:
            z = diff * prec[:, None, :]
            log_det = np.sum(np.log(params["precisions_cholesky"]), axis=1)
        log_n = -0.5 * (d * _LOG_2PI + xp.sum(z * z, axis=2)) + xp.asarray(log_det)[:, None]
        return log_n.T, diff

    def _log_abs_f(self, params: Params, x, xp):
        """``log |f(x)|`` per row, the scaled densities ``n_i / exp(top)``, ``f / exp(top)``
        and the differences (the shift by the row's largest ``log n_i`` keeps them finite)."""
        log_n, diff = self._log_components(params, x, xp)
        top = xp.max(log_n, axis=1, keepdims=True)
        scaled = xp.exp(log_n - top)
        f = scaled @ xp.asarray(params["weights"], dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_abs_f = xp.log(xp.abs(f)) + top[:, 0]
        return log_abs_f, scaled, f, diff

    def log_density(self, params: Params, x, xp, workspace=None):
        """``log p(x) = 2 log|f(x)| - log Z`` per row (``-inf`` where ``f(x) = 0``)."""
        log_abs_f, *_ = self._log_abs_f(params, x, xp)
        return 2.0 * log_abs_f - float(params["log_normalizer"])

    def predict_proba(self, params: Params, x, xp, workspace=None):
        """Each component's share of the positive envelope ``sum_i |w_i| N_i(x)`` per row.

        Components of a squared mixture overlap and cancel, so no posterior over them exists;
        the envelope's shares say which components explain a row (and ``predict`` takes the
        largest)."""
        log_n, _ = self._log_components(params, x, xp)
        with np.errstate(divide="ignore"):
            log_w = xp.asarray(np.log(np.abs(params["weights"])), dtype=np.float64)
        a = log_n + log_w
        a = a - xp.max(a, axis=1, keepdims=True)
        e = xp.exp(a)
        return e / xp.sum(e, axis=1, keepdims=True)

    def _train_stats(self, params: Params, x, xp, workspace=None) -> Stats:
        x = asarray_f64(x, xp)
        x, row_w = (x[:, :-1], x[:, -1]) if self.weighted else (x, None)
        log_abs_f, scaled, f, diff = self._log_abs_f(params, x, xp)
        ok = xp.isfinite(log_abs_f)
        r = scaled / xp.where(ok, f, 1.0)[:, None]  # n_i / f
        r = xp.where(ok[:, None], r, 0.0)
        if row_w is not None:
            r = r * row_w[:, None]
        rho = 2.0 * r * xp.asarray(params["weights"], dtype=np.float64)[None, :]  # (n, K)
        rho_t = rho.T[:, :, None]  # (K, n, 1)
        if self.full:
            second = xp.matmul(xp.swapaxes(diff * rho_t, 1, 2), diff)  # (K, D, D)
        else:
            second = xp.sum(rho_t * diff * diff, axis=1)  # (K, D)
        lp = xp.where(ok, 2.0 * log_abs_f - float(params["log_normalizer"]), 0.0)
        n = float(x.shape[0]) if row_w is None else float(xp.sum(row_w))
        return {
            "n": np.float64(n),
            "loglik": np.float64(float(xp.sum(lp if row_w is None else row_w * lp))),
            "n_nonfinite": np.float64(x.shape[0] - int(xp.count_nonzero(ok))),
            "g_weights": _host(2.0 * xp.sum(r, axis=0)),
            "rho": _host(xp.sum(rho, axis=0)),
            "rho_diff": _host(xp.sum(rho_t * diff, axis=1)),
            "rho_second": _host(second),
        }

    def combine(self, a: Stats, b: Stats) -> Stats:
        return tree_add(a, b)

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        # diff, z and the weighted copy: three (K, D) per row, plus (K,) several times.
        return 8 * n_components * (3 * n_features + 6)

    # -- driver side ------------------------------------------------------------------------

    def _value_and_gradient(self, params: Params, stats: Stats):
        """The mean log-likelihood of the step's rows and its gradient in ``theta``."""
        n = float(stats["n"])
        w, means, cov = params["weights"], params["means"], params["covariances"]
        k, d = means.shape
        _, gz = log_normalizer(w, means, cov)
        rho = np.asarray(stats["rho"])
        if self.full:
            u = params["precisions_cholesky"]
            prec = u @ np.swapaxes(u, 1, 2)
            g_mu = np.einsum("kab,kb->ka", prec, stats["rho_diff"])
            g_cov = 0.5 * (prec @ stats["rho_second"] @ prec - rho[:, None, None] * prec)
        else:
            prec = params["precisions_cholesky"] ** 2
            g_mu = prec * stats["rho_diff"]
            g_cov = 0.5 * (prec * prec * stats["rho_second"] - rho[:, None] * prec)
        g_w = (np.asarray(stats["g_weights"]) - n * gz["weights"]) / n
        g_mu = (g_mu - n * gz["means"]) / n
        g_cov = (g_cov - n * gz["covariances"]) / n
        return float(stats["loglik"]) / n, np.concatenate(
            [g_w, g_mu.ravel(), self._covariance_gradient(g_cov, cov).ravel()])

    def _covariance_gradient(self, g_cov: np.ndarray, cov: np.ndarray) -> np.ndarray:
        """The gradient with respect to the free covariance entries (see ``_pack``)."""
        if not self.full:
            return g_cov * (cov - self.reg_covar)  # d/ds of exp(s) + reg
        return factor_gradient(g_cov, factor_above_floor(cov, self.reg_covar))

    def row_scores(self, params: Params, x, xp, workspace=None):
        """Each row's log-density (the engine re-seeds components at the lowest)."""
        if self.weighted:
            return xp.where(x[:, -1] > 0, self.log_density(params, x[:, :-1], xp), xp.inf)
        return self.log_density(params, x, xp)

    def reseed(self, params: Params, collapsed, rows) -> Params:
        """Re-seed the ``collapsed`` components at ``rows``: each takes a row as its mean, the
        mean covariance of the other components and the mean magnitude of their weights."""
        weights = np.array(params["weights"])
        means = np.array(params["means"])
        cov = np.array(params["covariances"])
        k, d = means.shape
        collapsed = np.asarray(collapsed, dtype=np.intp)
        keep = np.setdiff1d(np.arange(k), collapsed)
        means[collapsed] = np.asarray(rows, dtype=np.float64)[:, :d]
        if keep.size:
            cov[collapsed] = np.mean(cov[keep], axis=0)
            weights[collapsed] = np.mean(np.abs(weights[keep]))
        return self.make_params(weights, means, cov)

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator):
        """Draw ``(X, labels)`` exactly (see :func:`dmix.families.squared_sampling.sample`)."""
        from dmix.families.squared_sampling import sample

        return sample(self, params, n_samples, rng)


def _host(a) -> np.ndarray:
    """A float64 NumPy copy of a block's sum (a CuPy array comes back to the host)."""
    return np.asarray(to_host(a), dtype=np.float64)
