"""Driver-side maths of the skew-normal family: the ECM updates from the summed statistics, the
moment start for zero skewness, and the linear algebra both need (all NumPy, all float64).

The statistics are those of :mod:`dmix.families.skew_normal` (about the shift ``c_k`` = the
current locations); equations from shared/notes/model-math.md sections 2.1 and 2.2.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "data_covariance",
    "ecm_update",
    "not_positive_definite",
    "precision_cholesky",
    "restricted_loadings",
    "sqrt_and_inverse_sqrt",
    "zero_skew_start",
]

_EPS10 = 10 * np.finfo(np.float64).eps


def precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``Sigma^{-1} = U U^T`` (scikit-learn's ``precisions_cholesky_``)."""
    chol = np.linalg.cholesky(covariances)
    eye = np.broadcast_to(np.eye(covariances.shape[-1]), covariances.shape)
    return np.swapaxes(np.linalg.solve(chol, eye), -1, -2)


def sqrt_and_inverse_sqrt(covariances: np.ndarray):
    """Symmetric ``Sigma^{1/2}`` and ``Sigma^{-1/2}`` (K, D, D), from one eigendecomposition."""
    values, vectors = np.linalg.eigh(covariances)
    root = np.sqrt(values)[:, None, :]
    vt = np.swapaxes(vectors, 1, 2)
    return (vectors * root) @ vt, (vectors / root) @ vt


def restricted_loadings(covariances: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Restricted ``Delta = Sigma^{1/2} lambda / sqrt(1 + lambda^T lambda)`` (K, D)."""
    root, _ = sqrt_and_inverse_sqrt(covariances)
    delta = shapes / np.sqrt(1.0 + np.sum(shapes * shapes, axis=1))[:, None]
    return np.einsum("kij,kj->ki", root, delta)


def not_positive_definite(mats: np.ndarray) -> np.ndarray:
    """Boolean (K,): the matrices that are not finite and positive definite (Cholesky fails)."""
    bad = np.zeros(mats.shape[0], dtype=bool)
    for j, m in enumerate(mats):
        try:
            bad[j] = not np.all(np.isfinite(np.linalg.cholesky(m)))
        except np.linalg.LinAlgError:
            bad[j] = True
    return bad


def _arrays(stats):
    nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10  # empty components divide by eps
    return (nk, *(np.asarray(stats[key], dtype=np.float64)
                  for key in ("y_sum", "yy_sum", "t1_sum", "yt1_sum", "t2_sum")))


def ecm_update(restricted: bool, params: dict, stats: dict, reg: float):
    """The CM-steps of one iteration.

    Restricted (2.2): ``mu = c + (S_y - Delta_old S_t1) / N``; then jointly ``Delta = B /
    S_t2`` and ``Gamma = (S - B B^T / S_t2) / N + reg I`` with ``B = S_yt1 - m S_t1`` and
    ``S`` the scatter about the new location; ``Sigma = Gamma + Delta Delta^T`` and ``lambda =
    Sigma^{-1/2} Delta sqrt(1 + Delta^T Gamma^{-1} Delta)``. Unrestricted (2.1): ``xi = c +
    (S_y - Delta_old S_t1) / N``; ``Sigma = (S - Delta B^T - B Delta + Delta S_t2 Delta) / N +
    reg I`` with ``B = S_yt1 - m S_t1^T`` and the old ``Delta``; ``delta = (Sigma^{-1} o
    S_t2)^{-1} diag(Sigma^{-1} B)`` with the new ``Sigma``.

    Returns
    -------
    means, covariances, skew : ndarrays
        The new locations, scales and shapes (restricted) or skewness (unrestricted).
    bad : ndarray of bool (K,)
        Components whose ``Gamma`` (restricted) or ``Sigma`` is not positive definite; their
        other outputs are placeholders.
    """
    shift = params["means"]
    d = shift.shape[1]
    nk, y_sum, yy_sum, t1_sum, yt1_sum, t2_sum = _arrays(stats)
    eye = np.eye(d)
    if restricted:
        old = restricted_loadings(params["covariances"], params["shapes"])
        m = (y_sum - old * t1_sum[:, None]) / nk[:, None]  # mu - c
        b = yt1_sum - m * t1_sum[:, None]  # sum r t1 (y - m)
    else:
        old = params["skewness"]
        m = (y_sum - old * t1_sum) / nk[:, None]  # xi - c
        b = yt1_sum - m[:, :, None] * t1_sum[:, None, :]  # sum r (y - m) t1^T
    # Scatter about the new location: S_yy - m S_y^T - S_y m^T + N m m^T.
    scatter = (yy_sum - m[:, :, None] * y_sum[:, None, :] - y_sum[:, :, None] * m[:, None, :]
               + nk[:, None, None] * m[:, :, None] * m[:, None, :])
    if restricted:
        # Gamma = (S - Delta B^T - B Delta^T + S_t2 Delta Delta^T) / N = (S - B B^T / S_t2) / N.
        t2 = t2_sum + _EPS10
        delta = b / t2[:, None]
        gamma = (scatter - b[:, :, None] * b[:, None, :] / t2[:, None, None]) / nk[:, None, None]
        gamma = 0.5 * (gamma + np.swapaxes(gamma, 1, 2)) + reg * eye
        bad = not_positive_definite(gamma)
        safe = np.where(bad[:, None, None], eye, gamma)
        # 1 / sqrt(1 - Delta^T Sigma^{-1} Delta) = sqrt(1 + Delta^T Gamma^{-1} Delta): no
        # cancellation as |delta| -> 1.
        s = np.einsum("ki,ki->k", delta, np.linalg.solve(safe, delta[:, :, None])[:, :, 0])
        sigma = safe + delta[:, :, None] * delta[:, None, :]
        _, inv_root = sqrt_and_inverse_sqrt(sigma)
        skew = np.einsum("kij,kj->ki", inv_root, delta) * np.sqrt(1.0 + s)[:, None]
        return shift + m, sigma, skew, bad
    sigma = (scatter - old[:, :, None] * np.swapaxes(b, 1, 2) - b * old[:, None, :]
             + old[:, :, None] * t2_sum * old[:, None, :]) / nk[:, None, None]
    sigma = 0.5 * (sigma + np.swapaxes(sigma, 1, 2)) + reg * eye
    bad = not_positive_definite(sigma) | (nk < 1)
    safe = np.where(bad[:, None, None], eye, sigma)
    # The Hadamard product needs the entries of Sigma^{-1} themselves.
    precision = np.linalg.solve(safe, np.broadcast_to(eye, safe.shape))
    rhs = np.einsum("kij,kji->ki", precision, b)
    hadamard = np.where(bad[:, None, None], eye, precision * t2_sum)  # empty: S_t2 = 0
    skew = np.linalg.solve(hadamard, rhs[:, :, None])[:, :, 0]
    return shift + m, sigma, skew, bad


def moment_start(restricted: bool, mean, cov, gamma):
    """Location, scale and skewness of one component with the given mean, covariance and
    coordinatewise skewness ``gamma`` (method of moments per coordinate).

    A coordinate of either form is a univariate skew-normal with standardised ``d = delta /
    omega``, whose skewness is ``(4 - pi) / 2 b^3 / (1 - b^2)^{3/2}``, ``b = sqrt(2/pi) d``;
    solved for ``d``, with ``|d| <= 0.95``. Restricted: ``Delta_j = d_j sqrt(Sigma_jj)``,
    ``Sigma = cov + (2/pi) Delta Delta^T`` (``Delta`` shrunk so that ``Delta^T Sigma^{-1}
    Delta < 1``); unrestricted: ``delta_j = d_j omega_j``, ``Sigma = cov - (1 - 2/pi)
    diag(delta^2)`` (``delta`` halved until it is positive definite); location ``mean -
    sqrt(2/pi) Delta``.
    """
    c = 2.0 / math.pi
    r = np.cbrt(2.0 * gamma / (4.0 - math.pi))
    d = np.clip(r / np.sqrt(1.0 + r * r) / math.sqrt(c), -0.95, 0.95)
    var = np.diagonal(cov)
    loading = d * np.sqrt(var / (1.0 - c * d * d))  # Delta_j (restricted), delta_j (SDB)
    if restricted:
        # Delta^T Sigma^{-1} Delta = s / (1 + c s) with s = Delta^T cov^{-1} Delta: below 1
        # for s < 1 / (1 - c) = 2.75.
        s = loading @ np.linalg.solve(cov, loading)
        loading = loading * min(1.0, math.sqrt(2.5 / s)) if s > 0 else loading
        sigma = cov + c * np.outer(loading, loading)
        _, inv_root = sqrt_and_inverse_sqrt(sigma[None])
        inner = loading @ np.linalg.solve(sigma, loading)
        skew = inv_root[0] @ loading / math.sqrt(1.0 - inner)
    else:
        for _ in range(40):
            sigma = cov - (1.0 - c) * np.diag(loading * loading)
            if not not_positive_definite(sigma[None])[0]:
                break
            loading = 0.5 * loading
        skew = loading
    return mean - math.sqrt(c) * loading, sigma, skew


def zero_skew_start(restricted: bool, skew_key: str, params: dict, stats: dict, means, sigma,
                    skew, reg: float):
    """Components whose skewness is exactly zero get a method-of-moments start
    (:func:`moment_start`, from the third moments ``y3_sum``) instead of the ECM update.

    Zero skewness is a stationary point of both forms: the latent's posterior moments do not
    depend on the row (``A = 0`` or ``q = 0``), so the skewness update is zero again, and EM
    from Gaussian components would stay Gaussian forever. Returns updated copies.
    """
    nk = np.asarray(stats["nk"], dtype=np.float64)
    zero = np.flatnonzero(np.all(params[skew_key] == 0, axis=1) & (nk > 1))
    if not zero.size:
        return means, sigma, skew
    means, sigma, skew = means.copy(), sigma.copy(), np.array(skew, copy=True)
    eye = np.eye(means.shape[1])
    for j in zero:
        b = np.asarray(stats["y_sum"][j]) / nk[j]
        second = np.asarray(stats["yy_sum"][j]) / nk[j]
        cov = second - np.outer(b, b) + reg * eye
        var = np.diagonal(cov)
        third = (np.asarray(stats["y3_sum"][j]) / nk[j] - 3.0 * b * np.diagonal(second)
                 + 2.0 * b**3)  # central third moments from those about the shift
        if not_positive_definite(cov[None])[0]:
            continue  # the M-step's collapse test decides
        means[j], sigma[j], skew[j] = moment_start(restricted, params["means"][j] + b, cov,
                                                   third / var**1.5)
    return means, sigma, skew


def data_covariance(params: dict, stats: dict) -> np.ndarray:
    """The covariance of all the rows from the per-component statistics (responsibilities sum
    to 1 per row), about the data mean ``p``: ``sum_k [S_yy - S_y e^T - e S_y^T + N_k e e^T] /
    n`` with ``e = p - c_k``."""
    nk = np.asarray(stats["nk"], dtype=np.float64)
    y_sum, shift = np.asarray(stats["y_sum"]), params["means"]
    total = np.sum(nk)
    dev = np.sum(nk[:, None] * shift + y_sum, axis=0) / total - shift
    scatter = (np.asarray(stats["yy_sum"]) - y_sum[:, :, None] * dev[:, None, :]
               - dev[:, :, None] * y_sum[:, None, :]
               + nk[:, None, None] * dev[:, :, None] * dev[:, None, :])
    return np.sum(scatter, axis=0) / total
