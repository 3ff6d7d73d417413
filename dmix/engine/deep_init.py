"""Initialisation of deep Gaussian mixtures and mixture networks on the cluster.

Layer by layer, as the ``deepgmm`` R package does (shared/notes/model-math.md section 3.2,
step 5), with every pass over the data a map-reduce:

1. cluster the layer's input into ``k_l`` groups: k-means (k-means|| seeding and Lloyd passes
   of :mod:`dmix.engine.init`), or uniformly random labels keyed by ``(seed, global row)``;
2. one pass: each cluster's row count, mean and covariance (Chan's merge, per cluster);
3. on the driver, a factor analyser with ``r_l`` factors per cluster
   (:func:`dmix.families._layers.fit_layer`);
4. the next layer's input is every row's factor scores ``E[z | x]`` under its own cluster's
   analyser: a lazy blockwise map of the previous input, never gathered.

The result does not depend on the chunking beyond rounding: labels are nearest centres or
keyed uniforms, and the moments merge exactly.
"""

from __future__ import annotations

import numpy as np

from dmix.engine.init import _check_finite, _sq_distances, kmeans_centers, summarize
from dmix.engine.reduce import map_blocks, map_reduce
from dmix.families import _layers
from dmix.rng import keyed_uniform

__all__ = ["deep_initial_params"]

_METHODS = ("kmeans", "random")


def _layer_seed(seed: int, restart: int, layer: int) -> int:
    """An independent seed per (seed, restart, layer)."""
    return int(np.random.SeedSequence([seed % 2**63, restart, layer]).generate_state(
        1, dtype=np.uint64)[0] % 2**63)


def _labels(x, start, labeler):
    """Cluster of each row: the nearest centre, or a keyed uniform draw."""
    kind, value, seed = labeler
    if kind == "nearest":
        shift = value.mean(axis=0)
        return _sq_distances(x - shift, value - shift).argmin(axis=1)
    u = keyed_uniform(seed, 0, np.arange(start, start + x.shape[0]))
    return np.minimum((u * value).astype(np.intp), value - 1)


def _cluster_moments_block(x, start, index, labeler, k, check_source):
    """Per cluster: rows ``n`` (k,), mean (k, d) and scatter about it ``m2`` (k, d, d)."""
    x = np.asarray(x, dtype=np.float64)
    if check_source is not None:
        _check_finite(x, start, index, check_source)
    labels = _labels(x, start, labeler)
    d = x.shape[1]
    n, mean, m2 = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    for j in range(k):  # k small: one masked mean and scatter per cluster
        rows = x[labels == j]
        if rows.shape[0]:
            n[j] = rows.shape[0]
            mean[j] = rows.mean(axis=0)
            xc = rows - mean[j]
            m2[j] = xc.T @ xc
    return {"n": n, "mean": mean, "m2": m2}


def _merge_cluster_moments(a: dict, b: dict) -> dict:
    """Chan, Golub and LeVeque's merge per cluster: ``M2 = M2a + M2b + d d^T na nb / n``."""
    n = a["n"] + b["n"]
    safe = np.where(n > 0, n, 1.0)
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * (b["n"] / safe)[:, None]
    m2 = a["m2"] + b["m2"] + (delta[:, :, None] * delta[:, None, :]
                              * (a["n"] * b["n"] / safe)[:, None, None])
    return {"n": n, "mean": mean, "m2": m2}


def _scores_block(x, labeler, layer, *, start, index):
    """Factor scores of each row under its own cluster's factor analyser, (n, r)."""
    x = np.asarray(x, dtype=np.float64)
    labels = _labels(x, start, labeler)
    out = np.zeros((x.shape[0], layer["loadings"].shape[2]))
    for j in range(layer["loadings"].shape[0]):
        rows = labels == j
        if rows.any():
            out[rows] = _layers.factor_scores(x[rows], layer["intercepts"][j],
                                              layer["loadings"][j], layer["noise_variances"][j])
    return out


def deep_initial_params(family, data, method: str = "kmeans", *, seed: int, restart: int = 0,
                        source: str = "the data", split_every=None, client=None):
    """Initial parameters of a deep family, layer by layer from passes over ``data``.

    Parameters
    ----------
    family : DeepGaussian or GaussianNetwork
        Gives ``layer_sizes`` and ``layer_dims``.
    data : dask.array.Array of shape (N, D)
        Chunked along rows only.
    method : {'kmeans', 'random'}
        How each layer's input is clustered: k-means (k-means|| seeding, then Lloyd), or
        uniformly random labels keyed by ``(seed, restart, layer, global row)``.
    seed : int
        Seed of every random choice.
    restart : int, default=0
        Which restart this is (independent draws for each).
    source : str
        How errors name the data.
    split_every : int, optional
        Fan-in of the reduction trees.
    client : distributed.Client, optional
        Where the passes run (Dask's current scheduler by default).

    Returns
    -------
    dict
        The family's parameters: per layer, the cluster proportions as weights (the
        network's conditional weights have them in every column), the cluster means as
        intercepts, and each cluster's factor analyser.
    """
    if method not in _METHODS:
        raise ValueError(f"Unknown init method {method!r} for {type(family).__name__}; valid "
                         f"options are {', '.join(repr(m) for m in _METHODS)}.")
    family.check_n_features(data.shape[1])
    passes = dict(split_every=split_every, client=client)
    x, layers = data, []
    for i, (k, r) in enumerate(zip(family.layer_sizes, family.layer_dims, strict=True)):
        name = source if i == 0 else f"the layer-{i} factor scores of {source}"
        layer_seed = _layer_seed(seed, restart, i)
        if method == "kmeans":
            summary = summarize(x, seed=layer_seed, restart=0, m=k, source=name, **passes)
            centers = kmeans_centers(x, k, seed=layer_seed, restart=0, summary=summary,
                                     source=name, **passes)
            labeler = ("nearest", centers, None)
        else:
            labeler = ("random", k, layer_seed)
        moments = map_reduce(x, _cluster_moments_block, labeler, k,
                             source if i == 0 and method == "random" else None,
                             combine=_merge_cluster_moments, label="deepinit-moments", **passes)
        safe = np.where(moments["n"] > 0, moments["n"], 1.0)[:, None, None]
        layer = _layers.fit_layer(moments["n"], moments["mean"], moments["m2"] / safe, r)
        layers.append(layer)
        if i + 1 < family.n_layers:
            x = map_blocks(x, _scores_block, labeler, layer, out_columns=r, dtype=np.float64,
                           label="deepinit-scores")
    return family.params_from_layers(layers)
