"""Squared (subtractive) Gaussian mixtures: the maths, first step of issue 8.

A squared mixture (Loconte et al., "Subtractive Mixture Models via Squaring", ICLR 2024;
shared/notes/model-math.md section 4) has real weights ``w_i`` of any sign::

    p(x) = f(x)^2 / Z,   f(x) = sum_i w_i N(x; mu_i, Sigma_i),
    Z = sum_ij w_i w_j M_ij,   M_ij = int N_i N_j = N(mu_i; mu_j, Sigma_i + Sigma_j),

so ``log p(x) = 2 log |f(x)| - log Z``: a valid density whatever the signs, which lets three
components carve the hole of a ring. ``Sigma_i = L_i L_i^T`` with ``L_i`` lower triangular
(the free parameters; the gradient is taken with respect to its lower triangle).

Gradients (exact, analytic). Per row, with ``n_i = N(x; mu_i, Sigma_i)``,
``P_i = Sigma_i^{-1}`` and ``u_i = P_i (x - mu_i)``::

    d f / d w_i     = n_i
    d f / d mu_i    = w_i n_i u_i
    d f / d Sigma_i = w_i n_i (u_i u_i^T - P_i) / 2
    d log p / d theta = 2 (d f / d theta) / f - d log Z / d theta

and for the normaliser, with ``S_ij = Sigma_i + Sigma_j``, ``d_ij = mu_i - mu_j``,
``v_ij = S_ij^{-1} d_ij``::

    d Z / d w_i     = 2 sum_j w_j M_ij
    d Z / d mu_i    = -2 w_i sum_j w_j M_ij v_ij
    d Z / d Sigma_i = w_i sum_j w_j M_ij (v_ij v_ij^T - S_ij^{-1})     (j = i included)

A symmetric gradient ``G`` with respect to ``Sigma = L L^T`` becomes ``2 G L`` (lower
triangle) with respect to ``L``. Every per-row term is a sum over rows, so a block returns
sums and the engine reduces them; ``log Z`` and its gradient are computed once per step on the
driver.
"""

from __future__ import annotations

import numpy as np

__all__ = ["log_f_and_gradient", "log_normalizer", "squared_log_density"]

_LOG_2PI = float(np.log(2.0 * np.pi))


def _log_gaussian(x, mean, chol):
    """``log N(x; mean, L L^T)`` for rows ``x`` (n, D): (n,), and ``Sigma^{-1} (x - mean)``."""
    d = mean.shape[0]
    diff = x - mean
    z = np.linalg.solve(chol, diff.T)  # L^{-1} (x - mu), (D, n)
    u = np.linalg.solve(chol.T, z).T  # Sigma^{-1} (x - mu), (n, D)
    log_det = 2.0 * np.sum(np.log(np.abs(np.diag(chol))))
    return -0.5 * (d * _LOG_2PI + log_det + np.sum(z * z, axis=0)), u


def log_normalizer(weights, means, chols):
    """``log Z`` and its gradient ``(d/dw, d/dmu, d/dL)`` divided by ``Z`` (that of log Z).

    Parameters
    ----------
    weights : ndarray (K,)
        Real weights.
    means : ndarray (K, D)
    chols : ndarray (K, D, D)
        Lower Cholesky factors of the covariances.

    Returns
    -------
    log_z : float
    grads : dict
        ``weights`` (K,), ``means`` (K, D), ``chols`` (K, D, D, lower triangle) of ``log Z``.
    """
    k, d = means.shape
    sigma = chols @ np.swapaxes(chols, 1, 2)
    s = sigma[:, None] + sigma[None, :]  # S_ij (K, K, D, D)
    diff = means[:, None, :] - means[None, :, :]  # d_ij
    s_chol = np.linalg.cholesky(s)
    z = np.linalg.solve(s_chol, diff[..., None])[..., 0]
    log_det = 2.0 * np.sum(np.log(np.diagonal(s_chol, axis1=2, axis2=3)), axis=2)
    m = np.exp(-0.5 * (d * _LOG_2PI + log_det + np.sum(z * z, axis=2)))  # M_ij
    big_z = float(weights @ m @ weights)
    if not big_z > 0:
        raise FloatingPointError(f"The normaliser Z = {big_z} is not positive.")
    s_inv = np.linalg.inv(s)
    v = np.einsum("ijab,ijb->ija", s_inv, diff)  # S_ij^{-1} d_ij
    wm = weights[None, :] * m  # w_j M_ij
    g_w = 2.0 * (m @ weights)
    g_mu = -2.0 * weights[:, None] * np.einsum("ij,ija->ia", wm, v)
    g_sigma = weights[:, None, None] * np.einsum(
        "ij,ijab->iab", wm, v[..., :, None] * v[..., None, :] - s_inv)
    g_l = np.tril(2.0 * g_sigma @ chols)
    return float(np.log(big_z)), {"weights": g_w / big_z, "means": g_mu / big_z,
                                  "chols": g_l / big_z}


def log_f_and_gradient(weights, means, chols, x):
    """Per-row ``log |f(x)|`` (n,) and the sums over rows of ``d (2 log |f|) / d theta``.

    Returns
    -------
    log_abs_f : ndarray (n,)
    grads : dict
        ``weights`` (K,), ``means`` (K, D), ``chols`` (K, D, D): sums over the rows of the
        gradient of ``2 log |f(x_i)|``. Rows where ``f = 0`` (log-density ``-inf``) add
        nothing.
    """
    x = np.asarray(x, dtype=np.float64)
    k, d = means.shape
    logs, us = zip(*(_log_gaussian(x, means[i], chols[i]) for i in range(k)), strict=True)
    log_n = np.stack(logs, axis=1)  # (n, K)
    u = np.stack(us, axis=1)  # (n, K, D)
    top = np.max(log_n, axis=1, keepdims=True)
    scaled = np.exp(log_n - top)  # n_i / exp(top): f and its derivatives share the factor
    f = scaled @ weights
    with np.errstate(divide="ignore"):
        log_abs_f = np.log(np.abs(f)) + top[:, 0]
    ok = f != 0
    r = np.where(ok[:, None], scaled / np.where(ok, f, 1.0)[:, None], 0.0)  # n_i / f
    wr = 2.0 * weights[None, :] * r  # 2 w_i n_i / f
    g_w = 2.0 * np.sum(r, axis=0)
    g_mu = np.einsum("ni,nia->ia", wr, u)
    sigma_inv = np.linalg.inv(chols @ np.swapaxes(chols, 1, 2))
    g_sigma = 0.5 * (np.einsum("ni,nia,nib->iab", wr, u, u)
                     - np.sum(wr, axis=0)[:, None, None] * sigma_inv)
    g_l = np.tril(2.0 * g_sigma @ chols)
    return log_abs_f, {"weights": g_w, "means": g_mu, "chols": g_l}


def squared_log_density(weights, means, chols, x):
    """``log p(x) = 2 log |f(x)| - log Z`` per row (``-inf`` where ``f(x) = 0``)."""
    log_abs_f, _ = log_f_and_gradient(weights, means, chols, x)
    return 2.0 * log_abs_f - log_normalizer(weights, means, chols)[0]
