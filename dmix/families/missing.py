"""Gaussian mixtures on rows with missing entries (NaN), by marginalising the missing features.

This is the E-step of EM for incomplete data, exact under "missing at random" (Ghahramani and
Jordan 1994; Little and Rubin, *Statistical Analysis with Missing Data*, ch. 11). For a row
``x`` with observed features ``o`` and missing features ``m``, and component ``k``::

    log p(x_o | k) = log N(x_o; mu_o, Sigma_oo)                      (the marginal Gaussian)
    r_k            = w_k p(x_o | k) / sum_j w_j p(x_o | j)
    xhat_k         = x with x_m := mu_m + Sigma_mo Sigma_oo^{-1} (x_o - mu_o)
    C_k            = 0 except C_mm = Sigma_mm - Sigma_mo Sigma_oo^{-1} Sigma_om

and the statistics are those of :mod:`dmix.families.gaussian` with the expected sufficient
statistics in place of the complete-data ones (``c`` the shift of the current parameters)::

    nk_k += r_k,   s1_k += r_k (xhat_k - c),   s2_k += r_k [Q(xhat_k - c) + P(C_k)]

where ``P`` packs a symmetric matrix as ``quadratic_features`` packs ``x x^T`` (upper triangle
for full/tied, the diagonal for the diagonal types, the trace for the spherical ones), so that
``E[Q(x - c) | x_o, k] = Q(xhat_k - c) + P(C_k)``. ``loglik`` is the observed-data
log-likelihood ``sum_i log sum_k w_k p(x_o,i | k)``, which EM with these statistics and the
family's unchanged M-step never decreases. Every statistic is a sum over rows, so blocks and
sub-batches combine by addition as before.

A row with every feature missing has ``p(x_o | k) = 1`` (an empty marginal): ``log p = 0``,
``r = w / sum(w)``, ``xhat_k = mu_k`` and ``C_k = Sigma_k``. It leaves the M-step's estimates
where they are (its expected statistics are those of the current model), which is still exact
EM; it only adds 0 to the log-likelihood.

A row with a ``+-inf`` entry is counted in ``n_nonfinite`` and contributes nothing, as in
``Gaussian.estep``; so does a row whose log-density is not finite for all components.

Computation (float64, on the host; CuPy input is copied over):

* rows without NaN go through the family's own ``estep`` / ``log_density`` /
  ``predict_proba`` (its fast expanded form, and bit for bit what they get without this
  module). The caller must therefore dispatch here only for rows that have a NaN, or at least
  not come back here from those methods for NaN-free rows.
* full and tied: the incomplete rows are grouped by missing pattern (the mask rows packed into
  integer keys, one ``np.unique``). Per pattern, ``Sigma_oo = L L^T`` is factored once per
  component (once in all when tied) and one batched solve
  ``L [Z | W] = [(x_o - mu_o)^T | Sigma_om]`` serves all rows of the pattern:
  ``maha = |Z|^2``, the conditional mean ``mu_m + W^T Z`` and the conditional covariance
  ``Sigma_mm - W^T W`` (no inverse is formed). ``C_k`` does not depend on the row, so it enters
  ``s2`` once per pattern, weighted by the pattern's ``sum_i r_ik``. Rows of rare patterns
  (fewer than :data:`SMALL_PATTERN_ROWS` rows: with many features and scattered NaN, nearly
  every row has its own) are done together instead, with the padded matrices of
  :func:`_padded`, so the Python work does not grow with the number of patterns.
* diagonal and spherical types: the features are independent given ``k``, so ``xhat_m = mu_m``
  and ``C`` is the diagonal of the missing variances; the whole batch is done at once with the
  observed mask, without grouping.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular

from dmix.families.base import tree_add
from dmix.families.covariance import Full
from dmix.kernels import reference
from dmix.xp import to_host

__all__ = ["estep_missing", "log_density_missing", "predict_proba_missing"]

_LOG_2PI = math.log(2.0 * math.pi)

#: Patterns with fewer rows than this go through the padded, row-batched path (one factor per
#: row); the others are factored once per pattern. Per-pattern Python work costs about as much
#: as a few rows of the padded path.
SMALL_PATTERN_ROWS = 4
#: Elements of the (rows, K, D, D + 1) arrays of one chunk of the padded path (16 MB each).
_PADDED_ELEMENTS = 2**21


def _shift(params) -> np.ndarray:
    # The same expression as dmix.families.gaussian._shift (bit for bit), repeated here so this
    # module does not import gaussian (which calls into this one).
    return np.sum(params["weights"][:, None] * params["means"], axis=0)


def _variance_rows(family, params) -> np.ndarray:
    """Per-component variances (K, D) of a diagonal or spherical structure."""
    k, d = params["means"].shape
    var = np.asarray(params["covariances"], dtype=np.float64)
    return np.ascontiguousarray(family.covariance.per_coordinate(var, k, d))


def _zero_stats(k: int, d: int, n_quadratic: int) -> dict:
    return {"nk": np.zeros(k), "s1": np.zeros((k, d)), "s2": np.zeros((k, n_quadratic))}


def _prepare(x):
    """Host float64 rows, the missing mask, and the rows with an infinite entry.

    Infinite entries are replaced by 0 in the working copy (those rows are set aside later) so
    that they cannot turn the sums of other rows into ``nan``.
    """
    x = np.array(to_host(x), dtype=np.float64)  # a copy: written below
    if x.ndim != 2:
        raise ValueError(f"Expected 2-D rows; got an array of shape {x.shape}.")
    missing = np.isnan(x)
    infinite = np.isinf(x)
    has_inf = infinite.any(axis=1)
    x[missing | infinite] = 0.0
    return x, missing, has_inf


def _normalize(wlp, has_inf):
    """Responsibilities (n, K), log-normaliser (n,) and the rows to drop (non-finite)."""
    resp = np.empty_like(wlp)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        log_norm = reference.normalize_log(wlp, resp, np, axis=1)
    bad = has_inf | ~np.isfinite(log_norm)
    return resp, log_norm, bad


def _diagonal(family, params, x, missing, has_inf, want_stats: bool):
    """Diagonal and spherical structures, whole batch at once (no grouping by pattern)."""
    means = params["means"]
    k, d = means.shape
    var = _variance_rows(family, params)
    obs = ~missing
    obs_f = obs.astype(np.float64)
    # log p(x_o | k) = -1/2 sum_{a in o} [log(2 pi var_ka) + (x_a - mu_ka)^2 / var_ka]
    diff = x[:, None, :] - means[None, :, :]
    diff *= obs_f[:, None, :]
    maha = np.einsum("nkd,nkd,kd->nk", diff, diff, 1.0 / var, optimize=True)
    del diff
    logp = -0.5 * (obs_f @ (np.log(var) + _LOG_2PI).T + maha)
    wlp = logp + np.log(params["weights"])
    resp, log_norm, bad = _normalize(wlp, has_inf)
    if not want_stats:
        return resp, log_norm, bad, None
    resp[bad] = 0.0
    shift = _shift(params)
    means_c = means - shift
    y_obs = (x - shift) * obs_f  # x_o - c on the observed entries, 0 on the missing ones
    miss_w = resp.T @ missing.astype(np.float64)  # (K, D): sum_i r_ik [a missing in row i]
    # xhat_ka = x_a (observed) or mu_ka (missing); C_k = diag(var_ka, a missing).
    s1 = resp.T @ y_obs + miss_w * means_c
    q = resp.T @ (y_obs * y_obs) + miss_w * (means_c * means_c + var)
    if family.covariance.n_quadratic(x.shape[1]) == 1:  # spherical: Q(x) = |x|^2, P(C) = tr C
        q = np.sum(q, axis=1, keepdims=True)
    return resp, log_norm, bad, {"nk": np.sum(resp, axis=0), "s1": s1, "s2": q}


def _group_by_pattern(missing):
    """The distinct rows of the mask (P, D) and, for each, the indices of the rows that have it.

    The mask rows are packed into bits and, up to 64 features, into one integer key each, so
    the grouping is one integer sort.
    """
    n = missing.shape[0]
    if n == 0:
        return missing[:0], []
    packed = np.packbits(missing, axis=1)  # (n, ceil(D / 8)) bytes
    if packed.shape[1] <= 8:
        key = np.zeros((n, 8), dtype=np.uint8)
        key[:, : packed.shape[1]] = packed
        _, first, inverse = np.unique(key.view(np.uint64)[:, 0], return_index=True,
                                      return_inverse=True)
    else:
        _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    inverse = np.reshape(inverse, -1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(first)))])
    return missing[first], [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _padded(x, missing, has_inf, sigma, means, log_w, shift, tied: bool, want_stats: bool):
    """Full and tied structures for rows of any patterns at once, with padded matrices.

    With ``O = diag(observed)``, ``Sigma~ = O Sigma O + (I - O)`` is ``Sigma_oo`` on the observed
    block and the identity on the missing one, so ``Sigma~ = L L^T`` (one factor per row and
    component, per row when tied) and ``L [z | W] = [O (x - mu) | O Sigma (I - O)]`` give
    ``|z|^2 = (x_o - mu_o)^T Sigma_oo^{-1} (x_o - mu_o)``, ``log det Sigma~ = log det Sigma_oo``,
    ``W^T z`` = the conditional-mean correction on the missing coordinates (0 elsewhere) and
    ``W^T W = Sigma_mo Sigma_oo^{-1} Sigma_om`` on the missing block. Returns ``resp``,
    ``log_norm``, ``bad`` and ``(nk, s1, S2)`` with ``S2`` unpacked (K, D, D), or None.
    """
    n, d = x.shape
    k = means.shape[0]
    obs = (~missing).astype(np.float64)
    mis = 1.0 - obs
    diag = np.arange(d)
    dtil = obs[:, None, :] * (x[:, None, :] - means[None])  # (n, K, D): O (x - mu_k)
    sig = sigma[:1] if tied else sigma
    padded = obs[:, None, :, None] * sig[None] * obs[:, None, None, :]
    padded[..., diag, diag] += mis[:, None, :]
    cross = obs[:, None, :, None] * sig[None] * mis[:, None, None, :]  # O Sigma (I - O)
    chol = np.linalg.cholesky(padded)  # (n, K or 1, D, D)
    if tied:  # one factor per row; the K components are columns of its right-hand side
        rhs = np.concatenate([dtil.transpose(0, 2, 1)[:, None], cross], axis=3)
        sol = np.linalg.solve(chol, rhs)[:, 0]  # (n, D, K + D)
        z = sol[:, :, :k].transpose(0, 2, 1)  # (n, K, D)
        w = sol[:, None, :, k:]  # (n, 1, D, D)
    else:
        sol = np.linalg.solve(chol, np.concatenate([dtil[..., None], cross], axis=3))
        z, w = sol[..., 0], sol[..., 1:]  # (n, K, D), (n, K, D, D)
    log_det = 2.0 * np.sum(np.log(np.diagonal(chol, axis1=2, axis2=3)), axis=2)
    maha = np.einsum("nkd,nkd->nk", z, z)
    logp = -0.5 * (np.sum(obs, axis=1)[:, None] * _LOG_2PI + log_det + maha)
    r, ln, b = _normalize(logp + log_w, has_inf)
    if not want_stats:
        return r, ln, b, None
    r[b] = 0.0
    # y = xhat - c = O (x - c) + (I - O) (mu_k - c) + W^T z
    y = (obs * (x - shift))[:, None, :] + mis[:, None, :] * (means - shift)[None]
    y += np.einsum("nkd,nkde->nke", z, np.broadcast_to(w, (n, k, d, d)))
    # C = (I - O) Sigma (I - O) - W^T W
    cond = mis[:, None, :, None] * sig[None] * mis[:, None, None, :]
    cond -= np.matmul(w.transpose(0, 1, 3, 2), w)
    rt = np.ascontiguousarray(r.T)  # (K, n)
    yt = y.transpose(1, 0, 2)  # (K, n, D)
    s2 = np.matmul((yt * rt[:, :, None]).transpose(0, 2, 1), yt)
    if tied:
        s2 += np.matmul(rt, cond[:, 0].reshape(n, d * d)).reshape(k, d, d)
    else:
        s2 += np.matmul(rt[:, None, :], cond.transpose(1, 0, 2, 3).reshape(k, n, d * d)
                        ).reshape(k, d, d)
    return r, ln, b, (np.sum(rt, axis=1), np.matmul(rt[:, None, :], yt)[:, 0], s2)


def _full(family, params, x, missing, has_inf, want_stats: bool):
    """Full and tied structures, one Cholesky factor per missing pattern (and component)."""
    cov = family.covariance
    means = params["means"]
    k, d = means.shape
    n = x.shape[0]
    tied = cov.tied
    sigma = cov.dense(params["covariances"], k, d)  # (K, D, D)
    log_w = np.log(params["weights"])
    shift = _shift(params)
    resp = np.empty((n, k))
    log_norm = np.empty(n)
    bad = np.zeros(n, dtype=bool)
    nk = np.zeros(k)
    s1 = np.zeros((k, d))
    s2 = np.zeros((k, d, d))
    patterns, groups = _group_by_pattern(missing)
    small = [rows for rows in groups if len(rows) < SMALL_PATTERN_ROWS]
    if small:  # rows of rare patterns: batched over rows, no per-pattern Python work
        small = np.sort(np.concatenate(small))
        step = max(1, _PADDED_ELEMENTS // (k * d * (d + 1)))
        for start in range(0, len(small), step):
            rows = small[start : start + step]
            r, ln, b, part = _padded(x[rows], missing[rows], has_inf[rows], sigma, means,
                                     log_w, shift, tied, want_stats)
            resp[rows], log_norm[rows], bad[rows] = r, ln, b
            if want_stats:
                nk += part[0]
                s1 += part[1]
                s2 += part[2]
    for mis, rows in zip(patterns, groups, strict=True):
        if len(rows) < SMALL_PATTERN_ROWS:
            continue
        o, m = np.flatnonzero(~mis), np.flatnonzero(mis)
        n_p, d_o = len(rows), len(o)
        xo = x[np.ix_(rows, o)]  # (n_p, d_o)
        diff = xo[None, :, :] - means[:, None, o]  # (K, n_p, d_o): x_o - mu_ko
        if d_o == 0:  # nothing observed: p(x_o | k) = 1, xhat = mu, C = Sigma
            logp = np.zeros((n_p, k))
            z = np.zeros((k, 0, n_p))
            w_om = np.zeros((k, 0, len(m)))
        else:
            sig_o = sigma[:, o]
            sig_oo, sig_om = sig_o[:, :, o], sig_o[:, :, m]
            if tied:  # one factor; the K components' rows are columns of one right-hand side
                chol = np.linalg.cholesky(sig_oo[0])
                rhs = np.concatenate([diff.transpose(2, 0, 1).reshape(d_o, k * n_p), sig_om[0]],
                                     axis=1)
                sol = solve_triangular(chol, rhs, lower=True, check_finite=False)
                z = sol[:, : k * n_p].reshape(d_o, k, n_p).transpose(1, 0, 2)
                w_om = np.broadcast_to(sol[:, k * n_p :], (k, d_o, len(m)))
                log_det = np.broadcast_to(2.0 * np.sum(np.log(np.diagonal(chol))), (k,))
            else:
                chol = np.linalg.cholesky(sig_oo)  # Sigma_oo = L L^T per component
                rhs = np.concatenate([diff.transpose(0, 2, 1), sig_om], axis=2)
                # L [Z | W] = [(x_o - mu_o)^T | Sigma_om], batched over components in one call
                # (np.linalg.solve: scipy's solve_triangular loops over the batch in Python)
                sol = np.linalg.solve(chol, rhs)
                z, w_om = sol[:, :, :n_p], sol[:, :, n_p:]
                log_det = 2.0 * np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
            # log N(x_o; mu_o, Sigma_oo) = -1/2 (d_o log 2 pi + log det Sigma_oo + |Z|^2)
            maha = np.einsum("kon,kon->nk", z, z)
            logp = -0.5 * (d_o * _LOG_2PI + log_det[None, :] + maha)
        r, ln, b = _normalize(logp + log_w, has_inf[rows])
        resp[rows], log_norm[rows], bad[rows] = r, ln, b
        if not want_stats:
            continue
        r[b] = 0.0
        # y = xhat - c: x_o - c_o observed; mu_m + Sigma_mo Sigma_oo^{-1} (x_o - mu_o) - c_m
        #   = (mu_m - c_m) + W^T Z missing.
        y = np.empty((k, n_p, d))
        y[:, :, o] = (xo - shift[o])[None]
        y[:, :, m] = (means[:, None, m] - shift[m]) + np.matmul(z.transpose(0, 2, 1), w_om)
        rt = np.ascontiguousarray(r.T)  # (K, n_p)
        nk_p = np.sum(rt, axis=1)
        nk += nk_p
        s1 += np.matmul(rt[:, None, :], y)[:, 0]
        s2 += np.matmul((y * rt[:, :, None]).transpose(0, 2, 1), y)  # sum_i r_ik y y^T
        if len(m):  # + sum_i r_ik C_k, C_mm = Sigma_mm - W^T W
            c_mm = sigma[np.ix_(range(k), m, m)] - np.matmul(w_om.transpose(0, 2, 1), w_om)
            s2[np.ix_(range(k), m, m)] += nk_p[:, None, None] * c_mm
    if not want_stats:
        return resp, log_norm, bad, None
    iu, ju = np.triu_indices(d)  # P(S): the upper triangle in quadratic_features order
    return resp, log_norm, bad, {"nk": nk, "s1": s1, "s2": s2[:, iu, ju]}


def _evaluate(family, params, x, want: str):
    """``want`` = "stats" (the statistics), "log_density" (n,) or "proba" (n, K), on the host.

    Rows without NaN go through the family's own method (bit for bit what ``Gaussian.estep``
    gives them, and its fast expanded form); the others through the marginal computation.
    """
    x = np.asarray(to_host(x), dtype=np.float64)
    k, d = params["means"].shape
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"Expected rows of {d} features; got an array of shape {x.shape}.")
    incomplete = np.isnan(x).any(axis=1)
    full_rows = x[~incomplete]
    part, missing, has_inf = _prepare(x[incomplete])
    impl = _full if isinstance(family.covariance, Full) else _diagonal
    if want == "stats":
        m_q = family.covariance.n_quadratic(d)
        total = {"n": float(x.shape[0]), "loglik": 0.0, "n_nonfinite": 0.0,
                 **_zero_stats(k, d, m_q)}
        if len(full_rows):
            complete = family.estep(params, full_rows, np)
            total = tree_add(total, {**complete, "n": 0.0})
        if len(part):
            _, log_norm, bad, stats = impl(family, params, part, missing, has_inf, True)
            total = tree_add(total, {
                "n": 0.0,
                "loglik": float(np.sum(np.where(bad, 0.0, log_norm))),
                "n_nonfinite": float(np.count_nonzero(bad)),
                **stats,
            })
        return total
    if want == "log_density":
        out = np.empty(x.shape[0])
        method = family.log_density
    else:
        out = np.empty((x.shape[0], k))
        method = family.predict_proba
    if len(full_rows):
        out[~incomplete] = to_host(method(params, full_rows, np))
    if len(part):
        resp, log_norm, _, _ = impl(family, params, part, missing, has_inf, False)
        # Rows with an infinite entry were evaluated with 0 in its place; report them as nan.
        resp[has_inf] = np.nan
        log_norm[has_inf] = np.nan
        out[incomplete] = log_norm if want == "log_density" else resp
    return out


def estep_missing(family, params, x, xp=np) -> dict:
    """E-step statistics of rows with missing (NaN) entries, marginalising the missing features.

    Parameters
    ----------
    family : Gaussian
        The family (its covariance structure decides the computation).
    params : dict
        Parameters as from ``family.make_params``.
    x : array of shape (n, D)
        Rows, some entries NaN; complete rows are allowed. NumPy or CuPy; computed in float64.
    xp : module, default numpy
        Namespace of ``x`` (the statistics are NumPy float64 arrays either way).

    Returns
    -------
    dict
        ``n``, ``loglik`` (observed-data log-likelihood), ``n_nonfinite``, ``nk`` (K,), ``s1``
        (K, D) and ``s2`` (K, m) about ``c = sum_k w_k mu_k``: the keys, shapes and meaning of
        ``family.estep``, with the expected statistics of the module docstring. Equal to
        ``family.estep`` on rows without NaN.
    """
    return _evaluate(family, params, x, "stats")


def log_density_missing(family, params, x, xp=np):
    """Observed-data log-density ``log sum_k w_k N(x_o; mu_ko, Sigma_k,oo)`` per row.

    Parameters
    ----------
    family, params, x, xp
        As for :func:`estep_missing`.

    Returns
    -------
    array of shape (n,)
        In namespace ``xp``; 0 for a row with every feature missing, ``nan`` for a row with an
        infinite entry (non-finite, for the caller to report).
    """
    return xp.asarray(_evaluate(family, params, x, "log_density"))


def predict_proba_missing(family, params, x, xp=np):
    """Posterior component probabilities given the observed features of each row.

    Parameters
    ----------
    family, params, x, xp
        As for :func:`estep_missing`.

    Returns
    -------
    array of shape (n, K)
        In namespace ``xp``; the normalised weights for a row with every feature missing,
        ``nan`` for a row with an infinite entry.
    """
    return xp.ascontiguousarray(xp.asarray(_evaluate(family, params, x, "proba")))
