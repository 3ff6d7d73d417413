"""Initialisation on the cluster: k-means||, k-means++, random and random_from_data.

Every method is a few passes over the data, each a map-reduce whose per-block results merge
exactly (sums, Chan's merge of means and variances, top-``m`` sets of keyed rows). No pass pulls
the data to the driver, and every random choice is keyed by ``(seed, restart, global row)``
(:mod:`dmix.rng`), so the result is the same whatever the chunking.

``kmeans`` (scikit-learn's default, here streamed)
    1. Summary pass: row count, mean and variance, and a uniformly drawn first candidate.
    2. k-means|| (Bahmani et al., PVLDB 2012), ``KMEANS_PARALLEL_ROUNDS`` rounds with
       oversampling ``l = 2K``: each row joins the candidates with probability
       ``min(1, l d^2(x, C) / phi(C))``. One pass per round: row ``i`` is chosen iff
       ``d_i^2 / u_i >= phi / l`` with ``u_i`` its keyed uniform, so a pass accumulates ``phi``
       and keeps the top rows by ``d_i^2 / u_i``; the threshold is applied after the reduction.
    3. A pass counting the rows nearest to each candidate; weighted k-means++ and weighted
       Lloyd on the candidates in memory give K centres.
    4. Lloyd iterations on the full data (counts and sums per pass) until the centres move by
       less than scikit-learn's ``tol = 1e-4`` times the mean feature variance.
    5. The family's statistics with hard assignments to the nearest centre, then its M-step:
       scikit-learn's ``init_params='kmeans'``.

``k-means++``, ``random_from_data``
    Seeds drawn by D^2 sampling (one pass per seed, weighted reservoir keys) or uniformly;
    as in scikit-learn, each seed alone has responsibility 1 for its component.

``random``
    Responsibilities uniform per row and component, normalised per row.
"""

from __future__ import annotations

import numpy as np

from dmix.engine.reduce import map_reduce
from dmix.errors import DataError
from dmix.families.base import tree_add
from dmix.rng import keyed_uniform

__all__ = ["initial_params", "kmeans_centers", "summarize"]

KMEANS_PARALLEL_ROUNDS = 5
LLOYD_MAX_ITER = 30
LLOYD_TOL = 1e-4
#: Rows per sub-batch is chosen so a (rows, n_centers) distance matrix stays near this size.
_DIST_BYTES = 4 * 2**20

# Stream numbers separating the uses of one seed (restart r uses stream 16 * r + purpose).
_UNIFORM, _ROUND, _PLUSPLUS, _RANDOM_RESP = 0, 1, 8, 9


def _stream(restart: int, purpose: int, step: int = 0) -> int:
    return (restart * 16 + purpose) * 4096 + step


# -- mergeable summaries ---------------------------------------------------------------------


def _top(keys: np.ndarray, rows: np.ndarray, m: int, largest: bool):
    """The ``m`` entries with the largest (or smallest) keys, sorted by key."""
    order = np.argsort(-keys if largest else keys, kind="stable")[:m]
    return keys[order], rows[order]


def _merge_top(m: int, largest: bool):
    def merge(a, b):
        keys, rows = _top(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), m, largest)
        return keys, rows

    return merge


def _chan_merge(a: dict, b: dict) -> dict:
    """Merge counts, means and sums of squared deviations (Chan, Golub and LeVeque 1979)."""
    n = a["n"] + b["n"]
    if n == 0:
        return a
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * (b["n"] / n)
    m2 = a["m2"] + b["m2"] + delta**2 * (a["n"] * b["n"] / n)
    return {"n": n, "mean": mean, "m2": m2}


def _check_finite(x, start: int, index: int, source: str) -> None:
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"Input X contains NaN or infinity: chunk {index} (rows {start}-"
            f"{start + x.shape[0] - 1}) of {source} has {bad.size} row(s) with non-finite "
            f"values, the first at row {start + int(bad[0])}. Remove or impute those rows."
        )


def _summary_block(x, start, index, seed, stream, m, source):
    x = np.asarray(x, dtype=np.float64)
    _check_finite(x, start, index, source)
    n = x.shape[0]
    mean = x.mean(axis=0) if n else np.zeros(x.shape[1])
    moments = {"n": float(n), "mean": mean, "m2": ((x - mean) ** 2).sum(axis=0)}
    keys = keyed_uniform(seed, stream, np.arange(start, start + n))
    return moments, _top(keys, x, m, largest=False)


def _summary_combine(m):
    merge = _merge_top(m, largest=False)

    def combine(a, b):
        return _chan_merge(a[0], b[0]), merge(a[1], b[1])

    return combine


def summarize(data, *, seed: int, restart: int, m: int, source, split_every, client):
    """One pass: ``n``, mean, variance per feature, and ``m`` uniformly drawn distinct rows."""
    moments, (_, rows) = map_reduce(
        data, _summary_block, seed, _stream(restart, _UNIFORM), m, source,
        combine=_summary_combine(m), split_every=split_every, label="summary", client=client,
    )
    variance = moments["m2"] / moments["n"]
    return moments["n"], moments["mean"], variance, rows


def _moments_block(x, start, index, column_range):
    x = np.asarray(x, dtype=np.float64)[:, column_range[0] : column_range[1]]
    x = x[np.isfinite(x).all(axis=1)]  # complete rows only
    n = x.shape[0]
    mean = x.mean(axis=0) if n else np.zeros(x.shape[1])
    xc = x - mean
    return {"n": float(n), "mean": mean, "m2": xc.T @ xc}


def _outer_chan_merge(a: dict, b: dict) -> dict:
    """:func:`_chan_merge` for scatter matrices: ``M2 = M2a + M2b + d d^T n_a n_b / n``."""
    n = a["n"] + b["n"]
    if n == 0:
        return a
    delta = b["mean"] - a["mean"]
    return {"n": n, "mean": a["mean"] + delta * (b["n"] / n),
            "m2": a["m2"] + b["m2"] + np.outer(delta, delta) * (a["n"] * b["n"] / n)}


def data_moments(data, *, n_features: int | None = None, split_every=None, client=None):
    """One pass: the number of complete rows, their mean (D,) and covariance (D, D) (rows with
    a missing value are left out; ``n_features`` first columns only, if given)."""
    d = data.shape[1] if n_features is None else n_features
    moments = map_reduce(data, _moments_block, (0, d), combine=_outer_chan_merge,
                         split_every=split_every, label="moments", client=client)
    if moments["n"] == 0:
        raise DataError("No row of the data is complete: the data mean and covariance (for "
                        "the default prior) cannot be estimated. Set the priors explicitly.")
    return moments["n"], moments["mean"], moments["m2"] / moments["n"]


def _nanmean_block(x, start, index):
    x = np.asarray(x, dtype=np.float64)
    seen = ~np.isnan(x)
    return {"count": seen.sum(axis=0).astype(np.float64), "sum": np.where(seen, x, 0.0).sum(0)}


def _fill_missing(x, means):
    return np.where(np.isnan(x), means.astype(x.dtype), x)


def impute_missing(data, *, split_every=None, client=None):
    """``data`` with every missing value (NaN) replaced by its column's mean (lazy; one pass
    for the means). Initialisation runs on it when missing values are marginalised."""
    total = map_reduce(data, _nanmean_block, combine=tree_add, split_every=split_every,
                       label="nanmean", client=client)
    empty = np.flatnonzero(total["count"] == 0)
    if empty.size:
        raise DataError(f"Feature {int(empty[0])} of the data has no observed value: remove it.")
    means = total["sum"] / total["count"]
    return data.map_blocks(_fill_missing, means, dtype=data.dtype)


# -- distances to a set of centres --------------------------------------------------------


def _sq_distances(xc, centers_c):
    """Squared distances (n, C) of centred rows to centred centres, clipped at zero."""
    d2 = (xc * xc).sum(1)[:, None] - 2.0 * (xc @ centers_c.T) + (centers_c * centers_c).sum(1)
    return np.maximum(d2, 0.0)


def _batches(n: int, n_centers: int):
    step = max(256, _DIST_BYTES // (8 * max(1, n_centers)))
    return range(0, max(1, n), step), step


def _candidates_block(x, start, index, centers_c, shift, seed, stream, m):
    """phi = sum of squared distances to the candidates, and the top-m rows by d^2 / u."""
    x = np.asarray(x, dtype=np.float64)
    u = keyed_uniform(seed, stream, np.arange(start, start + x.shape[0]))
    phi, keys = 0.0, np.empty(x.shape[0])
    starts, step = _batches(x.shape[0], centers_c.shape[0])
    for lo in starts:
        d2 = _sq_distances(x[lo : lo + step] - shift, centers_c).min(axis=1)
        phi += float(d2.sum())
        keys[lo : lo + step] = d2 / u[lo : lo + step]
    return {"phi": phi}, _top(keys, x, m, largest=True)


def _nearest_block(x, start, index, centers_c, shift):
    """Counts, sums about ``shift`` and inertia of the rows nearest to each centre."""
    x = np.asarray(x, dtype=np.float64)
    k = centers_c.shape[0]
    counts, sums, inertia = np.zeros(k), np.zeros((k, x.shape[1])), 0.0
    starts, step = _batches(x.shape[0], k)
    for lo in starts:
        xc = x[lo : lo + step] - shift
        d2 = _sq_distances(xc, centers_c)
        labels = d2.argmin(axis=1)
        inertia += float(d2[np.arange(labels.size), labels].sum())
        counts += np.bincount(labels, minlength=k)
        np.add.at(sums, labels, xc)
    return {"counts": counts, "sums": sums, "inertia": inertia}


def _weighted_plusplus(points, weights, k, rng):
    """Weighted k-means++ seeding of ``k`` centres among ``points`` (in memory)."""
    chosen = [rng.choice(len(points), p=weights / weights.sum())]
    d2 = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        p = weights * d2
        total = p.sum()
        j = rng.choice(len(points), p=p / total) if total > 0 else rng.integers(len(points))
        chosen.append(j)
        d2 = np.minimum(d2, ((points - points[j]) ** 2).sum(1))
    return points[chosen].copy()


def _weighted_lloyd(points, weights, centers, tol, max_iter=100):
    for _ in range(max_iter):
        labels = _sq_distances(points, centers).argmin(1)
        new = centers.copy()
        for j in range(len(centers)):  # K small in-memory means
            w = weights[labels == j]
            if w.sum() > 0:
                new[j] = (w[:, None] * points[labels == j]).sum(0) / w.sum()
        moved = ((new - centers) ** 2).sum()
        centers = new
        if moved <= tol:
            break
    return centers


def kmeans_centers(data, n_components, *, seed, restart, summary, source, split_every, client):
    """K centres by k-means|| seeding and Lloyd iterations, all passes on the cluster.

    Returns the centres (K, D), in the data's coordinates.
    """
    passes = dict(split_every=split_every, client=client)
    n, shift, variance, first = summary
    tol = LLOYD_TOL * float(variance.mean())
    ell = 2 * n_components
    m = int(ell + 8 * np.sqrt(ell) + 16)
    candidates = first[:1] - shift
    for r in range(KMEANS_PARALLEL_ROUNDS):
        while True:
            (phi,), (keys, rows) = _candidate_round(data, candidates, shift, seed,
                                                    _stream(restart, _ROUND, r), m, passes)
            chosen = rows[keys >= phi / ell] if phi > 0 else rows[:0]
            if len(chosen) < m or m >= n:
                break
            m *= 2  # every kept row passed the threshold: more may have; redo with room
        candidates = np.concatenate([candidates, chosen - shift])
        if phi == 0:
            break
    counts = map_reduce(data, _nearest_block, candidates, shift, combine=tree_add,
                        label="kmeans", **passes)["counts"]
    rng = np.random.default_rng([seed, restart])
    weights = np.maximum(counts, 0.0)
    if np.count_nonzero(weights) < n_components:  # too few distinct rows carry weight
        weights = weights + 1e-12
    centers = _weighted_plusplus(candidates, weights, min(n_components, len(candidates)), rng)
    centers = _weighted_lloyd(candidates, weights, centers, tol)
    if len(centers) < n_components:
        raise DataError(
            f"Found only {len(centers)} distinct candidate centres for n_components = "
            f"{n_components} in {source}; the data have too few distinct rows."
        )
    for _ in range(LLOYD_MAX_ITER):
        stats = map_reduce(data, _nearest_block, centers, shift, combine=tree_add,
                           label="lloyd", **passes)
        filled = stats["counts"] > 0  # an empty cluster keeps its centre
        new = centers.copy()
        new[filled] = stats["sums"][filled] / stats["counts"][filled, None]
        moved = float(((new - centers) ** 2).sum())
        centers = new
        if moved <= tol:
            break
    return centers + shift


def _candidate_round(data, candidates, shift, seed, stream, m, passes):
    merge = _merge_top(m, largest=True)

    def combine(a, b):
        return {"phi": a[0]["phi"] + b[0]["phi"]}, merge(a[1], b[1])

    out = map_reduce(data, _candidates_block, candidates, shift, seed, stream, m,
                     combine=combine, label="kmeansparallel", **passes)
    return (out[0]["phi"],), out[1]


def _plusplus_block(x, start, index, centers_c, shift, seed, stream):
    """The row drawn with probability proportional to d^2 (weighted reservoir key log(u)/d^2)."""
    x = np.asarray(x, dtype=np.float64)
    u = keyed_uniform(seed, stream, np.arange(start, start + x.shape[0]))
    d2 = _sq_distances(x - shift, centers_c).min(axis=1)
    with np.errstate(divide="ignore"):
        keys = np.where(d2 > 0, np.log(u) / d2, -np.inf)
    return _top(keys, x, 1, largest=True)


def plusplus_seeds(data, n_components, *, seed, restart, summary, split_every, client):
    """k-means++ seeds: a uniform first row, then one D^2-weighted draw per pass."""
    _, shift, _, first = summary
    seeds = first[:1]
    for j in range(1, n_components):
        keys, rows = map_reduce(
            data, _plusplus_block, seeds - shift, shift, seed, _stream(restart, _PLUSPLUS, j),
            combine=_merge_top(1, largest=True), split_every=split_every, label="kmeansplusplus",
            client=client)
        pick = rows[:1] if np.isfinite(keys[0]) else first[j % len(first) : j % len(first) + 1]
        seeds = np.concatenate([seeds, pick])
    return seeds


# -- from responsibilities to parameters -----------------------------------------------------


def _hard_stats_block(x, start, index, family, centers_c, shift):
    xc = np.asarray(x, dtype=np.float64) - shift
    labels = _sq_distances(xc, centers_c).argmin(axis=1)
    resp = np.zeros((x.shape[0], centers_c.shape[0]))
    resp[np.arange(x.shape[0]), labels] = 1.0
    return family.stats_from_resp(resp, x, shift, np)


def _random_stats_block(x, start, index, family, k, shift, seed, stream):
    resp = keyed_uniform(seed, stream, np.arange(start, start + x.shape[0]), k)
    resp /= resp.sum(axis=1, keepdims=True)
    return family.stats_from_resp(resp, x, shift, np)


def _seed_params(family, seeds, n):
    """scikit-learn's init from seed rows: each seed alone has responsibility 1 for its component."""
    return family.params_from_points(seeds, n)


def initial_params(family, data, n_components: int, method: str, *, seed: int, restart: int = 0,
                   source: str = "the data", split_every=None, client=None):
    """Initial parameters of ``family`` by ``method``, from passes over ``data``."""
    passes = dict(split_every=split_every, client=client)
    summary = summarize(data, seed=seed, restart=restart, m=n_components, source=source,
                        **passes)
    n, shift = summary[0], summary[1]
    if method == "kmeans":
        centers = kmeans_centers(data, n_components, seed=seed, restart=restart,
                                 summary=summary, source=source, **passes)
        stats = map_reduce(data, _hard_stats_block, family, centers - shift, shift,
                           combine=family.combine, label="initstats", **passes)
        return family.params_from_stats(stats, shift)
    if method == "random":
        stats = map_reduce(data, _random_stats_block, family, n_components, shift, seed,
                           _stream(restart, _RANDOM_RESP), combine=family.combine,
                           label="initstats", **passes)
        return family.params_from_stats(stats, shift)
    if method == "k-means++":
        seeds = plusplus_seeds(data, n_components, seed=seed, restart=restart, summary=summary,
                               **passes)
        return _seed_params(family, seeds, n)
    if method == "random_from_data":
        return _seed_params(family, summary[3][:n_components], n)
    raise ValueError(
        f"Unknown init method {method!r}; valid options are 'kmeans', 'k-means++', 'random', "
        "'random_from_data'."
    )
