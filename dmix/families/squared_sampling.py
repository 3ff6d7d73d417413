"""Exact sampling from a squared Gaussian mixture, by rejection from its positive envelope.

With ``f = sum_i w_i N_i`` and the envelope ``e = sum_i |w_i| N_i >= |f|``, ``f^2 <= e^2`` and

    e(x)^2 = sum_ij |w_i| |w_j| N_i(x) N_j(x)
           = sum_ij |w_i| |w_j| M_ij N(x; c_ij, C_ij),

since a product of Gaussian densities is a Gaussian density times ``M_ij = N(mu_i; mu_j,
Sigma_i + Sigma_j)``, with ``C_ij = Sigma_i (Sigma_i + Sigma_j)^{-1} Sigma_j`` and
``c_ij = Sigma_j (Sigma_i + Sigma_j)^{-1} mu_i + Sigma_i (Sigma_i + Sigma_j)^{-1} mu_j``. So
``e^2 / Z_e`` is a mixture of ``K^2`` Gaussians, sampled exactly; a draw ``x`` is kept with
probability ``f(x)^2 / e(x)^2``, which leaves draws from ``f^2 / Z`` exactly. The acceptance
rate is ``Z / Z_e``.
"""

from __future__ import annotations

import math

import numpy as np

from dmix.errors import IllConditionedError

__all__ = ["sample"]

#: Below this acceptance rate sampling stops with an error (about a million draws per row).
MIN_ACCEPTANCE = 1e-6

#: Most envelope draws per round: bounds memory (a few hundred bytes per draw) when the
#: acceptance rate is low; more rounds follow until ``n_samples`` are kept.
MAX_ROUND = 1 << 18


def _dense(family, covariances: np.ndarray) -> np.ndarray:
    if family.full:
        return covariances
    return covariances[..., None] * np.eye(covariances.shape[1])


def envelope(family, params):
    """The envelope's Gaussians: weights (K^2,) summing to one, means (K^2, D), Cholesky
    factors (K^2, D, D), and ``log Z_e``."""
    w = np.abs(np.asarray(params["weights"], dtype=np.float64))
    mu = np.asarray(params["means"], dtype=np.float64)
    sigma = _dense(family, np.asarray(params["covariances"], dtype=np.float64))
    k, d = mu.shape
    s = sigma[:, None] + sigma[None, :]  # Sigma_i + Sigma_j
    diff = mu[:, None, :] - mu[None, :, :]
    s_chol = np.linalg.cholesky(s)
    z = np.linalg.solve(s_chol, diff[..., None])[..., 0]
    log_det = 2.0 * np.sum(np.log(np.diagonal(s_chol, axis1=2, axis2=3)), axis=2)
    log_m = -0.5 * (d * math.log(2 * math.pi) + log_det + np.sum(z * z, axis=2))
    with np.errstate(divide="ignore"):
        log_pair = np.log(w)[:, None] + np.log(w)[None, :] + log_m
    top = np.max(log_pair)
    pair = np.exp(log_pair - top)
    log_ze = float(top + np.log(np.sum(pair)))
    # C_ij = Sigma_i S^{-1} Sigma_j and c_ij = Sigma_j S^{-1} mu_i + Sigma_i S^{-1} mu_j.
    cov = sigma[:, None] @ np.linalg.solve(s, np.broadcast_to(sigma[None, :], s.shape))
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    mu_i = np.broadcast_to(mu[:, None, :, None], diff.shape + (1,))
    mu_j = np.broadcast_to(mu[None, :, :, None], diff.shape + (1,))
    mean = (sigma[None, :] @ np.linalg.solve(s, mu_i)
            + sigma[:, None] @ np.linalg.solve(s, mu_j))[..., 0]
    return (pair.ravel() / np.sum(pair), mean.reshape(k * k, d),
            np.linalg.cholesky(cov).reshape(k * k, d, d), log_ze)


def sample(family, params, n_samples: int, rng: np.random.Generator):
    """Draw ``(X, labels)`` from the squared mixture exactly.

    Rounds of draws from ``e^2 / Z_e`` are thinned by rejection, each sized from the
    acceptance rate ``Z / Z_e`` (so one round usually suffices) and at most
    :data:`MAX_ROUND`, until ``n_samples`` are kept; the result depends only on ``rng``.

    Parameters
    ----------
    family : SquaredGaussian
        The family (its covariance type and per-component log-densities).
    params : dict
        Parameters from ``family.make_params``, with ``log_normalizer``.
    n_samples : int
        Number of rows to draw.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    X : ndarray of shape (n_samples, D)
        The draws, in the order they were accepted.
    labels : ndarray of shape (n_samples,)
        For each row, the component with the largest share of the envelope ``|w_i| N_i(x)``
        (the argmax of ``family.predict_proba``), as ``predict`` would give. Components of a
        squared mixture cancel, so this is a nearest-component label, not a latent draw.

    Raises
    ------
    IllConditionedError
        If the acceptance rate ``Z / Z_e`` is below :data:`MIN_ACCEPTANCE` (components that
        cancel almost everywhere).
    """
    pair_w, pair_mean, pair_chol, log_ze = envelope(family, params)
    rate = math.exp(float(params["log_normalizer"]) - log_ze)
    if rate < MIN_ACCEPTANCE:
        raise IllConditionedError(
            f"Rejection sampling would keep {rate:.3g} of its draws (below {MIN_ACCEPTANCE:g}): "
            "the components cancel almost everywhere. Refit with fewer components or a "
            "larger reg_covar.")
    d = pair_mean.shape[1]
    kept, total = [np.empty((0, d))], 0
    while total < n_samples:
        # 10% more than the expected need, so a second round is rare (the shortfall is a
        # binomial tail); capped by MAX_ROUND.
        m = min(int(math.ceil((n_samples - total) / rate * 1.1)) + 16, MAX_ROUND)
        pair = rng.choice(pair_w.size, size=m, p=pair_w)
        x = pair_mean[pair] + np.einsum("nab,nb->na", pair_chol[pair],
                                        rng.standard_normal((m, d)))
        log_f, log_e = _log_f_and_envelope(family, params, x)
        keep = np.log(rng.random(m)) < 2.0 * (log_f - log_e)
        kept.append(x[keep])
        total += int(np.count_nonzero(keep))
    x = np.concatenate(kept)[:n_samples]
    labels = np.argmax(family.predict_proba(params, x, np), axis=1)
    return x, labels


def _log_f_and_envelope(family, params, x):
    """``log |f(x)|`` and ``log e(x)`` per row."""
    log_n, _ = family._log_components(params, x, np)
    w = np.asarray(params["weights"], dtype=np.float64)
    top = np.max(log_n, axis=1, keepdims=True)
    scaled = np.exp(log_n - top)
    with np.errstate(divide="ignore"):
        log_f = np.log(np.abs(scaled @ w)) + top[:, 0]
        log_e = np.log(scaled @ np.abs(w)) + top[:, 0]
    return log_f, log_e
