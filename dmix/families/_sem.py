"""The stochastic EM of deep Gaussian mixtures and Gaussian mixture networks, streamed.

shared/notes/model-math.md section 3.2 (the paper's SEM, as in the R package ``deepgmm``),
in the variant that is a proper stochastic EM (Celeux and Diebolt 1985): the whole missing
data ``(s, z^(1), ..., z^(h))`` of every row is simulated from its exact posterior at the
current parameters ``theta_t``, and the M-step maximises the complete-data likelihood of the
simulated data. For row ``i``:

1. a path ``s_i ~ p(s | y_i)`` (the path responsibilities, tempered while annealing);
2. the latents jointly, ``(z^(1), ..., z^(h)) | y_i, s_i ~ N(m + G (y_i - mu_s), P_s)``:
   given the path everything is jointly Gaussian (section 3.3), ``G_l = Cov(z^(l), y)
   Sigma_s^{-1}`` and ``P_s = C - G K`` with ``C`` the prior covariance of the stacked
   latents (``Cov(z^(a), z^(b)) = Lambda_{a+1} ... Lambda_b V_b`` for ``a <= b``) and
   ``K = Cov(y, z)``; ``z = mean + L_s eps``, ``L_s`` the Cholesky factor of ``P_s``.

``deepgmm`` instead weights expectations by the per-layer path marginals (a product-of-
marginals approximation of ``p(s_1, s_2 | y)``) and draws only the latents; that is not the
stochastic version of any EM, so it is not used here. Every uniform comes from
:func:`dmix.rng.keyed_uniform` keyed by ``(seed, iteration, global row index, layer)``
(``layer = 0`` for the path, ``l`` for the normals ``eps^(l)``, Box-Muller from two uniform
columns per coordinate), so a pass gives the same draws whatever the chunking or the cluster.

Statistics of a block (additive; per layer ``l = 1..h``, key prefix ``sem{l-1}/``, sums over
the rows whose drawn path goes through component ``j`` of layer ``l``, ``a = z^(l-1)``,
``b = z^(l)``, ``z^(0) = y``, both shifted by constants of ``theta_t`` so the second moments
do not cancel: ``c_a = eta^(l)_j``, ``c_b`` the mean of layer ``l + 1``'s intercepts, 0 for
the deepest)::

    n, loglik, n_nonfinite            as every family
    path_counts       (P,)            rows drawn on each path (the weights' M-step)
    sem{l}/w0         (k_l,)          rows
    sem{l}/sa, sb     (k_l, r)        sum (a - c_a), sum (b - c_b)
    sem{l}/saa, sab, sbb (k_l, r, r)  sums of the outer products of the shifted a, b

With row weights ``w_i`` every sum counts row ``i``'s one draw ``w_i`` times ("rows" are then
their total weight).

Their expectation over the draws is the exact E-step's posterior sums
(:func:`expected_statistics`), so the SEM M-step (:func:`regression_from_sums`, the joint
regression with intercept of section 3.3 on the drawn data) is the exact one's, with noise.
"""

from __future__ import annotations

import math

import numpy as np

from dmix.families import _layers
from dmix.rng import keyed_uniform
from dmix.xp import Workspace, to_host

__all__ = ["draw_streams", "expected_statistics", "regression_from_sums", "sem_estep"]

#: Tag of the SEM streams of :func:`dmix.rng.keyed_uniform` (apart from initialisation's).
_SEM_TAG = 0x5E3 << 48
#: Streams per iteration: the path (0) and one per layer (1..h), so ``h < 1024``.
_STREAMS_PER_ITERATION = 1024


def draw_streams(iteration: int, n_layers: int) -> list[int]:
    """The ``keyed_uniform`` streams of an iteration: the path's, then each layer's."""
    base = _SEM_TAG + int(iteration) * _STREAMS_PER_ITERATION
    return [base + code for code in range(n_layers + 1)]


def _layer_shifts(family, params) -> tuple[list, list]:
    """``c_a`` (k_l, r_{l-1}) and ``c_b`` (r_l,) per layer (see the module docstring)."""
    intercepts = family.layer_params(params)[0]
    h = len(intercepts)
    c_a = [np.asarray(e, dtype=np.float64) for e in intercepts]
    c_b = [np.mean(c_a[i + 1], axis=0) for i in range(h - 1)]
    c_b.append(np.zeros(family.layer_dims[-1]))
    return c_a, c_b


def _posterior_factors(family, params):
    """Per path: the means ``m_l`` (P, r_l), gains ``G_l`` (P, r_l, D) and the lower
    Cholesky factor ``L`` (P, R, R) of the joint posterior covariance of the stacked latents
    ``(z^(1), ..., z^(h))`` (``R = sum r_l``) given ``y``."""
    comp = _layers.path_components(family.layer_sizes)
    structure = _layers.path_structure(*family.layer_params(params), comp)
    cov_y, gains = _layers.path_gains(structure)
    h = family.n_layers
    dims = family.layer_dims
    offsets = np.concatenate([[0], np.cumsum(dims)])
    n_paths, big_r = comp.shape[0], int(offsets[-1])
    post = np.empty((n_paths, big_r, big_r))
    for a in range(1, h + 1):
        # prior Cov(z^(a), z^(b)) = Lambda_{a+1} ... Lambda_b V_b for b >= a
        chain = np.broadcast_to(np.eye(dims[a - 1]), (n_paths, dims[a - 1], dims[a - 1]))
        for b in range(a, h + 1):
            if b > a:
                chain = chain @ structure.loadings[b - 1]
            block = chain @ structure.covariances[b] - gains[a] @ cov_y[b]
            sa, sb = slice(offsets[a - 1], offsets[a]), slice(offsets[b - 1], offsets[b])
            post[:, sa, sb] = block
            post[:, sb, sa] = np.swapaxes(block, 1, 2)
    post = 0.5 * (post + np.swapaxes(post, 1, 2))
    try:
        factor = np.linalg.cholesky(post)
    except np.linalg.LinAlgError:  # numerically singular: a symmetric square root
        evals, evecs = np.linalg.eigh(post)
        factor = evecs * np.sqrt(np.maximum(evals, 0.0))[:, None, :]
    return {"components": comp, "means": structure.means, "gains": gains,
            "path_means": structure.means[0], "factor": factor, "offsets": offsets}


def _normals(seed: int, stream: int, rows: np.ndarray, n: int) -> np.ndarray:
    """Standard normals (len(rows), n) keyed by row: Box-Muller from 2 n uniform columns."""
    u = keyed_uniform(seed, stream, rows, 2 * n)
    return np.sqrt(-2.0 * np.log(u[:, :n])) * np.cos(2.0 * math.pi * u[:, n:])


def _grouped(onehot: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_i onehot[i, j] a_i b_i^T`` per group ``j``, (k, r_a, r_b)."""
    outer = (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], a.shape[1] * b.shape[1])
    return (onehot.T @ outer).reshape(onehot.shape[1], a.shape[1], b.shape[1])


def sem_estep(family, params, x, xp, ws: Workspace, start: int) -> dict:
    """The stochastic E-step of a block (statistics in the module docstring).

    Runs on the host in float64 (a CUDA block is copied back). ``start`` is the global index
    of ``x``'s first row; ``family.iteration`` and ``family.random_state`` key the draws.
    With ``family.weighted`` the last column holds the rows' weights ``w_i``: each row still
    draws once, and its draw counts ``w_i`` times in every sum (``n`` is ``sum_i w_i``), so the
    expected statistics are the weighted exact ones.
    """
    x = np.asarray(to_host(x), dtype=np.float64)
    weights = None
    if family.weighted:
        x, weights = x[:, :-1], x[:, -1]
    n, d = x.shape
    paths = family._paths(params, ws)
    with np.errstate(all="ignore"):  # non-finite rows are counted and reported
        _, wlp = family._gaussian._weighted_log_prob(paths, x, np, ws)
        wlp = np.array(wlp.T, dtype=np.float64)  # (n, P)
        top = np.max(wlp, axis=1, keepdims=True)
        log_norm = np.log(np.sum(np.exp(wlp - top), axis=1)) + top[:, 0]
        ok = np.isfinite(log_norm)
        nu = family.inverse_temperature
        resp = np.exp(nu * (wlp - top))
    resp[~ok] = 0.0
    h, sizes, dims = family.n_layers, family.layer_sizes, family.layer_dims
    factors = ws.memo("sem-factors", params, lambda: _posterior_factors(family, params))
    comp = factors["components"]
    rows = np.arange(start, start + n, dtype=np.int64)
    streams = draw_streams(family.iteration, h)
    # 1. paths: inverse CDF of the (tempered) responsibilities at one uniform per row
    cum = np.cumsum(resp, axis=1)
    u = keyed_uniform(family.random_state, streams[0], rows) * cum[:, -1] if n else np.zeros(0)
    path = np.minimum(np.sum(cum < u[:, None], axis=1), comp.shape[0] - 1)
    path, y, rows = path[ok], x[ok], rows[ok]
    w = np.ones(path.size) if weights is None else weights[ok]
    # 2. latents: z = m_s + G_s (y - mu_s) + L_s eps, eps^(l) keyed by layer l
    eps = np.concatenate([_normals(family.random_state, streams[l], rows, dims[l - 1])
                          for l in range(1, h + 1)], axis=1)
    noise = np.einsum("nab,nb->na", factors["factor"][path], eps)
    centred = y - factors["path_means"][path]
    latents = [y]
    off = factors["offsets"]
    for l in range(1, h + 1):
        z = factors["means"][l][path] + np.einsum("nrd,nd->nr", factors["gains"][l][path],
                                                  centred)
        latents.append(z + noise[:, off[l - 1]:off[l]])
    c_a, c_b = _layer_shifts(family, params)
    stats = {"n": float(n) if weights is None else float(np.sum(weights)),
             "loglik": float(np.sum(w * log_norm[ok])),
             "n_nonfinite": float(n - np.count_nonzero(ok)),
             "path_counts": np.bincount(path, weights=w, minlength=comp.shape[0])}
    for i, k in enumerate(sizes):
        j = comp[path, i]
        onehot = np.zeros((j.size, k))  # each row's weight in the column of its component
        onehot[np.arange(j.size), j] = w
        a = latents[i] - c_a[i][j]
        b = latents[i + 1] - c_b[i]
        stats.update({f"sem{i}/w0": onehot.sum(axis=0), f"sem{i}/sa": onehot.T @ a,
                      f"sem{i}/sb": onehot.T @ b, f"sem{i}/saa": _grouped(onehot, a, a),
                      f"sem{i}/sab": _grouped(onehot, a, b),
                      f"sem{i}/sbb": _grouped(onehot, b, b)})
    return stats


def expected_statistics(family, params, exact_stats) -> dict:
    """The expectation over the draws of :func:`sem_estep`'s statistics (untempered), from
    the exact E-step's statistics at the same parameters (section 3.3's posterior sums with
    the SEM shifts); for tests and as the definition of what SEM estimates."""
    comp = _layers.path_components(family.layer_sizes)
    intercepts, loadings, noise = family.layer_params(params)
    structure = _layers.path_structure(intercepts, loadings, noise, comp)
    paths = {"weights": np.exp(family.path_log_weights(params)), "means": structure.means[0]}
    t0, t1, t2 = family._path_moments(exact_stats, paths)
    gains = _layers.path_gains(structure)
    c_a, c_b = _layer_shifts(family, params)
    out = {"n": exact_stats["n"], "loglik": exact_stats["loglik"],
           "n_nonfinite": exact_stats["n_nonfinite"], "path_counts": t0}
    for i, k in enumerate(family.layer_sizes):
        j = comp[:, i]
        shift_b = np.broadcast_to(c_b[i], (comp.shape[0], c_b[i].size))
        sums = _layers.layer_sums(structure, t0, t1, t2, c_a[i][j], shift_b, layer=i + 1,
                                  gains=gains)
        group = lambda v: _layers.group_sum(v, j, k)  # noqa: E731
        out.update({f"sem{i}/w0": group(t0), f"sem{i}/sa": group(sums["a"] - t0[:, None]
                                                                  * c_a[i][j]),
                    f"sem{i}/sb": group(sums["b"] - t0[:, None] * c_b[i]),
                    f"sem{i}/saa": group(sums["aa"]), f"sem{i}/sab": group(sums["ab"]),
                    f"sem{i}/sbb": group(sums["bb"])})
    return out


def regression_from_sums(stats, c_a, c_b, layer: int, min_rows: float):
    """The M-step of layer ``layer``'s factor analysers from the SEM sums (0-based ``layer``).

    With ``W0`` rows, means ``abar = S_a / W0`` and centred moments ``C_ab = S_ab - W0 abar
    bbar^T`` (all of the shifted draws): ``Lambda = C_ab C_bb^{-1}``, ``eta = (abar + c_a) -
    Lambda (bbar + c_b)``, ``psi = diag(C_aa - Lambda C_ab^T) / W0`` -- section 3.3's joint
    regression with intercept on the simulated data. A component with fewer than
    ``min_rows`` rows (``C_bb`` may be singular) is *empty*: its estimates are zeros here and
    the caller keeps the previous ones.

    Returns
    -------
    dict
        As :func:`dmix.families._layers.regression_update`: ``resp_sum``, ``empty``,
        ``intercepts``, ``loadings``, unfloored ``noise_variances``, ``input_variance``.
    """
    p = f"sem{layer}/"
    w0 = np.asarray(stats[p + "w0"], dtype=np.float64)
    total = float(np.sum(w0))
    empty = w0 < min_rows
    safe = np.where(empty, 1.0, w0)
    abar = np.asarray(stats[p + "sa"]) / safe[:, None]
    bbar = np.asarray(stats[p + "sb"]) / safe[:, None]
    wt = w0[:, None, None]
    c_aa = np.asarray(stats[p + "saa"]) - wt * abar[:, :, None] * abar[:, None, :]
    c_ab = np.asarray(stats[p + "sab"]) - wt * abar[:, :, None] * bbar[:, None, :]
    c_bb = np.asarray(stats[p + "sbb"]) - wt * bbar[:, :, None] * bbar[:, None, :]
    c_bb = 0.5 * (c_bb + np.swapaxes(c_bb, 1, 2))
    c_bb[empty], c_ab[empty], c_aa[empty] = np.eye(c_bb.shape[1]), 0.0, 0.0  # solvable
    loadings = np.swapaxes(np.linalg.solve(c_bb, np.swapaxes(c_ab, 1, 2)), 1, 2)
    residual = np.diagonal(c_aa, axis1=1, axis2=2) - np.sum(loadings * c_ab, axis=2)
    mean_a = abar + c_a
    grand = w0 @ mean_a / max(total, 1.0)
    scatter = np.sum(np.diagonal(c_aa, axis1=1, axis2=2), axis=0)
    scatter += w0 @ (mean_a - grand) ** 2
    return {
        "resp_sum": w0,
        "empty": empty,
        "intercepts": mean_a - np.einsum("kab,kb->ka", loadings, bbar + c_b),
        "loadings": loadings,
        "noise_variances": residual / safe[:, None],
        "input_variance": float(np.mean(scatter) / max(total, 1.0)),
    }
