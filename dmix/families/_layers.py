"""Layer maths shared by the deep Gaussian mixture and the Gaussian mixture network.

Notation of shared/notes/model-math.md section 3. Layers ``l = 1..h`` (index ``l - 1`` in code
and in parameter keys) have ``k_l`` components and latent dimensions ``r_0 = D >= r_1 >= ... >=
r_h >= 1``; component ``j`` of layer ``l`` is a factor analyser

    z^(l-1) = eta_j + Lambda_j z^(l) + u,   u ~ N(0, diag(psi_j)),   z^(h) ~ N(0, I),

with intercepts ``eta`` (k_l, r_{l-1}), loadings ``Lambda`` (k_l, r_{l-1}, r_l) and noise
variances ``psi`` (k_l, r_{l-1}). A *path* ``s = (s_1, ..., s_h)`` picks one component per
layer; paths are numbered in C order over ``layer_sizes`` (``s_1`` varies slowest), so the
paths through component ``j`` of the first layer are the ``j``-th run of ``P / k_1``.

Given a path, ``(y, z^(1), ..., z^(h))`` is jointly Gaussian (section 3.3), so the posterior of
every latent given ``y`` is an affine function of ``y`` and EM needs only the path statistics
``T0, T1, T2`` (responsibility sums, first and second moments about the path mean). The
functions here turn them into the sums of posterior moments that each layer's regression needs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_PATHS",
    "PSI_FLOOR",
    "PathStructure",
    "factor_analysis",
    "factor_scores",
    "fit_layer",
    "layer_sums",
    "params_from_clusters",
    "path_components",
    "path_gains",
    "path_structure",
    "regression_update",
]

#: The largest number of paths ``prod(layer_sizes)``. Statistics take ``P D (D + 3) / 2``
#: floats, the E-step ``P`` log-densities per row and the M-step ``P`` Cholesky factors.
MAX_PATHS = 512

#: Noise variances are floored at ``PSI_FLOOR`` times the mean variance of the layer's input
#: (the data for the first layer, the posterior moments of ``z^(l-1)`` for deeper ones), which
#: keeps path covariances positive definite when a factor analyser fits a coordinate exactly
#: (a Heywood case). A floor on a maximisation is still an M-step: EM stays monotone.
PSI_FLOOR = 1e-6


def check_layers(layer_sizes, layer_dims, owner: str) -> tuple[tuple, tuple]:
    """Validated ``(layer_sizes, layer_dims)`` as tuples of ints; raises ValueError."""
    from dmix.errors import InvalidParameterError

    def ints(value, name):
        try:
            items = tuple(value)
        except TypeError:
            items = None
        if not items or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                and v >= 1 for v in items):
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be a non-empty tuple of ints >= 1. "
                f"Got {value!r} instead.")
        return tuple(int(v) for v in items)

    sizes, dims = ints(layer_sizes, "layer_sizes"), ints(layer_dims, "layer_dims")
    if len(sizes) != len(dims):
        raise InvalidParameterError(
            f"layer_sizes {sizes} and layer_dims {dims} of {owner} must have one entry per "
            f"layer; got {len(sizes)} and {len(dims)}.")
    if any(b > a for a, b in itertools.pairwise(dims)):
        raise InvalidParameterError(
            f"The 'layer_dims' parameter of {owner} must be non-increasing (r_1 >= r_2 >= ... "
            f">= 1). Got {dims} instead.")
    n_paths = math.prod(sizes)
    if n_paths > MAX_PATHS:
        raise InvalidParameterError(
            f"layer_sizes {sizes} give {n_paths} paths (the product of the layer sizes), more "
            f"than the limit of {MAX_PATHS} (dmix.families._layers.MAX_PATHS): use fewer "
            "layers or fewer components per layer.")
    return sizes, dims


def path_components(layer_sizes) -> np.ndarray:
    """The component of each layer on every path, shape (P, h), paths in C order."""
    layer_sizes = tuple(layer_sizes)
    return np.stack(np.unravel_index(np.arange(math.prod(layer_sizes)), layer_sizes), axis=1)


def group_sum(values: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """``out[j]``: the sum of ``values[p]`` over the paths ``p`` with ``labels[p] == j``."""
    out = np.zeros((n_groups, *values.shape[1:]))
    np.add.at(out, labels, values)
    return out


@dataclass(frozen=True)
class PathStructure:
    """Prior moments along every path, computed top-down (section 3.1).

    ``means[l]`` (P, r_l) and ``covariances[l]`` (P, r_l, r_l) are those of ``z^(l)`` given the
    path, ``l = 0..h`` (``z^(0) = y``: the path Gaussians); ``loadings[l]`` (P, r_l, r_{l+1})
    is the path's ``Lambda`` of layer ``l + 1``.
    """

    components: np.ndarray
    means: list
    covariances: list
    loadings: list


def path_structure(intercepts, loadings, noise_variances, components) -> PathStructure:
    """Top-down moments: ``m_h = 0, V_h = I``; ``m_{l-1} = eta + Lambda m_l``,
    ``V_{l-1} = Lambda V_l Lambda^T + Psi`` with the path's component of layer ``l``.

    Parameters
    ----------
    intercepts, loadings, noise_variances : list of ndarray
        Per layer, shapes (k_l, r_{l-1}), (k_l, r_{l-1}, r_l) and (k_l, r_{l-1}).
    components : ndarray of shape (P, h)
        :func:`path_components`.
    """
    h = len(loadings)
    n_paths = components.shape[0]
    lam = [np.asarray(loadings[i], dtype=np.float64)[components[:, i]] for i in range(h)]
    r_h = lam[-1].shape[2]
    means = [None] * h + [np.zeros((n_paths, r_h))]
    covs = [None] * h + [np.broadcast_to(np.eye(r_h), (n_paths, r_h, r_h))]
    for i in reversed(range(h)):
        eta = np.asarray(intercepts[i], dtype=np.float64)[components[:, i]]
        psi = np.asarray(noise_variances[i], dtype=np.float64)[components[:, i]]
        means[i] = eta + np.einsum("pab,pb->pa", lam[i], means[i + 1])
        v = lam[i] @ covs[i + 1] @ np.swapaxes(lam[i], 1, 2)
        v = 0.5 * (v + np.swapaxes(v, 1, 2))
        idx = np.arange(psi.shape[1])
        v[:, idx, idx] += psi
        covs[i] = v
    return PathStructure(components, means, covs, lam)


def path_gains(structure: PathStructure):
    """``K_l = Cov(y, z^(l)) = A_{0,l} V_l`` (P, D, r_l) and ``G_l = K_l^T Sigma^{-1}``
    (P, r_l, D) for ``l = 1..h`` (index ``l``; entry 0 unused: ``G_0 = I``), with
    ``A_{0,l} = Lambda_1 ... Lambda_l``; one batched solve with the path covariances."""
    h = len(structure.loadings)
    cov_y = [None]
    a = None
    for i in range(1, h + 1):
        a = structure.loadings[0] if a is None else a @ structure.loadings[i - 1]
        cov_y.append(a @ structure.covariances[i])
    stacked = np.linalg.solve(structure.covariances[0], np.concatenate(cov_y[1:], axis=2))
    splits = np.cumsum([c.shape[2] for c in cov_y[1:]])[:-1]
    gains = [None] + [np.swapaxes(g, 1, 2) for g in np.split(stacked, splits, axis=2)]
    return cov_y, gains


def _mean_sums(structure: PathStructure, t0, t1, gains, level: int):
    """``sum_i gamma_is E[z^(level) | y_i, s] = T0 m + G T1`` per path, (P, r_level)."""
    if level == 0:
        return t0[:, None] * structure.means[0] + t1
    return t0[:, None] * structure.means[level] + np.einsum("prd,pd->pr", gains[1][level], t1)


def layer_sums(structure: PathStructure, t0, t1, t2, shift_a=None, shift_b=None, *,
               layer: int, gains=None) -> dict:
    """Posterior moment sums of layer ``layer``'s pair ``a = z^(l-1)``, ``b = z^(l)`` per path.

    With ``gamma_is`` the path responsibilities, ``T0 = sum_i gamma_is``,
    ``T1 = sum_i gamma_is (y_i - mu_s)`` and ``T2 = sum_i gamma_is (y_i - mu_s)(y_i - mu_s)^T``,
    section 3.3 gives ``E[z^(l) | y, s] = m_l + G_l (y - mu_s)`` and

        sum_i gamma_is E[(a - c_a)(b - c_b)^T | y_i, s] = T0 (P_ab + d_a d_b^T)
            + d_a (G_b T1)^T + (G_a T1) d_b^T + G_a T2 G_b^T,      d = m - c,

    with ``P_ab = C_ab - G_a K_b`` the posterior cross-covariance (``C_ab = Lambda V_l`` for
    the pair, ``V`` on the diagonal; all zero for ``a = y``, where ``G_0 = I``).

    Parameters
    ----------
    structure : PathStructure
    t0, t1, t2 : ndarray of shapes (P,), (P, D), (P, D, D)
        Path statistics about the path means.
    shift_a, shift_b : ndarray of shapes (P, r_{l-1}) and (P, r_l), optional
        Points ``c_a``, ``c_b`` the second moments are taken about (default 0).
    layer : int
        ``l`` in ``1..h``.
    gains : optional
        ``path_gains(structure)``, if already computed.

    Returns
    -------
    dict
        ``a``, ``b`` (first-moment sums ``sum_i gamma_is E[z | y_i, s]``, not shifted) and
        ``aa``, ``ab``, ``bb`` (shifted second-moment sums), one entry per path.
    """
    cov_y, g = gains if gains is not None else path_gains(structure)
    l = layer
    m_a, m_b = structure.means[l - 1], structure.means[l]
    v_b = structure.covariances[l]
    g_b = g[l]
    gt1_b = np.einsum("prd,pd->pr", g_b, t1)
    p_bb = v_b - g_b @ cov_y[l]
    if l == 1:  # a = y is observed: G_0 = I and no posterior covariance
        gt1_a, g2_a = t1, t2
        p_aa = np.zeros_like(structure.covariances[0])
        p_ab = np.zeros((t0.shape[0], m_a.shape[1], m_b.shape[1]))
        g2_b = t2 @ np.swapaxes(g_b, 1, 2)  # T2 G_b^T
    else:
        g_a = g[l - 1]
        gt1_a = np.einsum("prd,pd->pr", g_a, t1)
        g2_a = g_a @ t2 @ np.swapaxes(g_a, 1, 2)
        p_aa = structure.covariances[l - 1] - g_a @ cov_y[l - 1]
        p_ab = structure.loadings[l - 1] @ v_b - g_a @ cov_y[l]
        g2_b = g_a @ t2 @ np.swapaxes(g_b, 1, 2)
    d_a = m_a if shift_a is None else m_a - shift_a
    d_b = m_b if shift_b is None else m_b - shift_b
    w = t0[:, None, None]

    def cross(p, da, db, ga, gb, gtg):
        return (w * (p + da[:, :, None] * db[:, None, :]) + da[:, :, None] * gb[:, None, :]
                + ga[:, :, None] * db[:, None, :] + gtg)

    return {
        "a": t0[:, None] * m_a + gt1_a,  # sum_i gamma_is E[z | y_i, s] = T0 m + G T1
        "b": t0[:, None] * m_b + gt1_b,
        "aa": cross(p_aa, d_a, d_a, gt1_a, gt1_a, g2_a),
        "ab": cross(p_ab, d_a, d_b, gt1_a, gt1_b, g2_b),
        "bb": cross(p_bb, d_b, d_b, gt1_b, gt1_b, g_b @ t2 @ np.swapaxes(g_b, 1, 2)),
    }


def regression_update(structure: PathStructure, t0, t1, t2, layer: int, n_components: int,
                      gains=None, empty_fraction: float = 1e-12):
    """The exact M-step of layer ``layer``'s factor analysers (section 3.3).

    For component ``j``, the posterior sums over the paths through it give ``W0``, the
    weighted means ``c_a = S_a / W0``, ``c_b = S_b / W0`` and the second moments about them;
    the joint regression with intercept is then ``Lambda = S_ab S_bb^{-1}``,
    ``eta = c_a - Lambda c_b`` and ``psi = diag(S_aa - Lambda S_ab^T) / W0`` (moments about the
    component's own means, so nothing cancels for latents far from the origin).

    Parameters
    ----------
    structure : PathStructure
        At the parameters of the E-step.
    t0, t1, t2 : ndarray of shapes (P,), (P, D), (P, D, D)
        Path statistics about the path means.
    layer : int
        ``l`` in ``1..h``.
    n_components : int
        ``k_l``.
    gains : optional
        ``path_gains(structure)``, if already computed.
    empty_fraction : float
        A component with ``W0 <= empty_fraction * sum(T0)`` is *empty*: its estimates are
        meaningless (zeros here) and the caller keeps its previous ones.

    Returns
    -------
    dict
        ``resp_sum`` (k,), ``empty`` (k,) bool, ``intercepts``, ``loadings``, unfloored
        ``noise_variances`` and the mean variance of the layer's input, ``input_variance``
        (within-component scatter plus between-component; the scale of the floor).
    """
    comp = structure.components[:, layer - 1]
    gains = gains if gains is not None else path_gains(structure)
    resp_sum = np.bincount(comp, weights=t0, minlength=n_components)
    total = np.sum(resp_sum)
    empty = resp_sum <= empty_fraction * total
    safe = np.where(empty, 1.0, resp_sum)[:, None]
    c_a = group_sum(_mean_sums(structure, t0, t1, gains, layer - 1), comp, n_components) / safe
    c_b = group_sum(_mean_sums(structure, t0, t1, gains, layer), comp, n_components) / safe
    sums = layer_sums(structure, t0, t1, t2, c_a[comp], c_b[comp], layer=layer, gains=gains)
    s_aa = group_sum(sums["aa"], comp, n_components)
    s_ab = group_sum(sums["ab"], comp, n_components)
    s_bb = group_sum(sums["bb"], comp, n_components)
    s_bb = 0.5 * (s_bb + np.swapaxes(s_bb, 1, 2))
    s_bb[empty], s_ab[empty], s_aa[empty] = np.eye(s_bb.shape[1]), 0.0, 0.0  # solvable
    loadings = np.swapaxes(np.linalg.solve(s_bb, np.swapaxes(s_ab, 1, 2)), 1, 2)
    residual = np.diagonal(s_aa, axis1=1, axis2=2) - np.sum(loadings * s_ab, axis=2)
    grand = resp_sum @ c_a / total
    scatter = np.sum(np.diagonal(s_aa, axis1=1, axis2=2), axis=0)
    scatter += resp_sum @ (c_a - grand) ** 2
    return {
        "resp_sum": resp_sum,
        "empty": empty,
        "intercepts": c_a - np.einsum("kab,kb->ka", loadings, c_b),
        "loadings": loadings,
        "noise_variances": residual / safe,
        "input_variance": float(np.mean(scatter) / total),
    }


# -- factor analysis (initialisation) ----------------------------------------------------------


def factor_analysis(covariance, n_factors: int, *, noise_floor: float = 0.0,
                    max_iter: int = 1000, tol: float = 1e-12):
    """Maximum-likelihood factor analysis of a covariance matrix, by EM.

    Fits ``S ~ Lambda Lambda^T + diag(psi)`` by the EM of Rubin and Thayer (1982) on the
    ``D x D`` matrix alone (the likelihood depends on the rows only through ``S``). Start:
    probabilistic PCA (the top ``r`` eigenvectors scaled by ``sqrt(lambda - sigma^2)``).
    One iteration, with ``beta = Lambda^T Sigma^{-1} = (I + Lambda^T Psi^{-1} Lambda)^{-1}
    Lambda^T Psi^{-1}`` (Woodbury: ``r x r`` solves only)::

        E[zz^T] = I - beta Lambda + beta S beta^T,  Lambda <- S beta^T E[zz^T]^{-1},
        psi <- max(diag(S - Lambda beta S), noise_floor).

    Parameters
    ----------
    covariance : ndarray of shape (D, D)
        Symmetric positive semi-definite.
    n_factors : int
        ``r``, at most ``D``.
    noise_floor : float
        Lower bound of ``psi``.
    max_iter : int
        EM iterations at most.
    tol : float
        Stop when the log-likelihood per row changes by less than ``tol`` times its size.

    Returns
    -------
    loadings : ndarray of shape (D, r)
    noise_variances : ndarray of shape (D,)
    """
    s = np.asarray(covariance, dtype=np.float64)
    s = 0.5 * (s + s.T)
    d, r = s.shape[0], int(n_factors)
    floor = max(float(noise_floor), np.finfo(np.float64).tiny)
    evals, evecs = np.linalg.eigh(s)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma2 = float(np.mean(evals[r:])) if r < d else 0.0
    lam = evecs[:, :r] * np.sqrt(np.maximum(evals[:r] - sigma2, 0.0))
    psi = np.maximum(np.diag(s) - np.sum(lam**2, axis=1), max(sigma2, floor))
    previous = -np.inf
    for _ in range(max_iter):
        lp = lam / psi[:, None]  # Psi^{-1} Lambda
        m = np.eye(r) + lam.T @ lp
        beta = np.linalg.solve(m, lp.T)
        # log-likelihood per row (up to a constant): -(log det Sigma + tr(Sigma^{-1} S)) / 2
        logdet = np.sum(np.log(psi)) + np.linalg.slogdet(m)[1]
        trace = np.sum(np.diag(s) / psi) - np.sum(beta * (lp.T @ s))
        loglik = -0.5 * (logdet + trace)
        if abs(loglik - previous) <= tol * max(1.0, abs(loglik)):
            break
        previous = loglik
        sb = s @ beta.T
        ezz = np.eye(r) - beta @ lam + beta @ sb
        lam = np.linalg.solve(ezz, sb.T).T
        psi = np.maximum(np.diag(s) - np.sum(lam * sb, axis=1), floor)
    return lam, psi


def factor_scores(x, mean, loadings, noise_variances):
    """Posterior means ``E[z | x] = beta (x - mean)`` of a factor analyser, rows (n, r)."""
    lp = loadings / noise_variances[:, None]
    beta = np.linalg.solve(np.eye(loadings.shape[1]) + loadings.T @ lp, lp.T)
    return (np.asarray(x, dtype=np.float64) - mean) @ beta.T


def fit_layer(counts, means, covariances, n_factors: int, *, floor_scale: float = PSI_FLOOR):
    """One layer's factor analysers from clusters of its input (a driver-side initialisation).

    Parameters
    ----------
    counts : ndarray of shape (k,)
        Rows per cluster.
    means : ndarray of shape (k, r_in)
    covariances : ndarray of shape (k, r_in, r_in)
        Per-cluster mean and (maximum-likelihood) covariance of the layer's input.
    n_factors : int
        The layer's latent dimension.
    floor_scale : float
        Noise variances are at least ``floor_scale`` times the mean variance of all the input.

    Returns
    -------
    dict
        ``weights`` (k,), ``intercepts`` (k, r_in), ``loadings`` (k, r_in, r),
        ``noise_variances`` (k, r_in). A cluster of fewer than two rows (no scatter) takes
        the pooled covariance of all the input, and an empty one the pooled mean too.
    """
    counts = np.asarray(counts, dtype=np.float64)
    means = np.array(means, dtype=np.float64)
    covs = np.array(covariances, dtype=np.float64)
    n = np.sum(counts)
    grand = counts @ means / n
    pooled = (np.tensordot(counts, covs, axes=1)
              + np.einsum("k,ka,kb->ab", counts, means - grand, means - grand)) / n
    floor = floor_scale * float(np.mean(np.diag(pooled)))
    thin = counts < 2
    covs[thin] = pooled
    means[counts == 0] = grand
    fits = [factor_analysis(c, n_factors, noise_floor=floor) for c in covs]
    return {
        "weights": (counts + 10 * np.finfo(np.float64).eps) / (n + counts.size * 10
                                                              * np.finfo(np.float64).eps),
        "intercepts": means,
        "loadings": np.stack([f[0] for f in fits]),
        "noise_variances": np.stack([f[1] for f in fits]),
    }


def params_from_clusters(family, counts, means, covariances):
    """A deep family's parameters from clusters of every layer's input (driver side).

    Parameters
    ----------
    family : DeepGaussian or GaussianNetwork
    counts, means, covariances : list of ndarray
        Per layer ``l``: rows (k_l,), means (k_l, r_{l-1}) and covariances
        (k_l, r_{l-1}, r_{l-1}) of the ``k_l`` clusters of the layer's input (the data for the
        first layer, the factor scores of the layer above for the others).

    Returns
    -------
    dict
        The parameters: a factor analyser with ``r_l`` factors per cluster
        (:func:`fit_layer`), cluster proportions as weights (in every column of the
        network's conditional weights).
    """
    layers = [fit_layer(c, m, v, r) for c, m, v, r in
              zip(counts, means, covariances, family.layer_dims, strict=True)]
    return family.params_from_layers(layers)
