"""Synthetic Gaussian mixtures, generated block by block.

A dataset is defined by ``(n_samples, n_features, n_components, seed)`` and a few shape options.
Row ``i`` depends only on the seed and on ``i``: its component label and its Gaussian noise come
from counter-based uniforms keyed by ``(seed, stream, i)`` (:func:`dmix.rng.keyed_uniform`),
the noise through a Box--Muller transform, and the affine map ``mu_k + L_k z`` is evaluated
element by element in a fixed order (no BLAS call whose summation order could depend on the
block shape). Any block ``[start, stop)`` can therefore be generated on its own, on any machine,
and the dataset is bit-for-bit the same whatever the block size used to write it.

The true parameters are drawn once from ``numpy.random.default_rng(seed)``:

* weights ``w_k = floor / K + (1 - floor) * Dirichlet(1, ..., 1)``, so every component holds
  at least ``floor / K`` of the rows;
* covariances ``Q_k diag(lambda_k) Q_k^T`` with ``Q_k`` a random rotation and eigenvalues
  ``lambda`` uniform in ``variance_range`` (full, shape (K, D, D), symmetric positive definite);
* means at least ``separation * sqrt(max(variance_range))`` apart: every pair of components is
  ``separation`` standard deviations apart along any direction.

Examples
--------
>>> from dmix.datasets import make_mixture
>>> data = make_mixture(10_000, 3, 4, seed=0)
>>> data.rows(0, 5).shape
(5, 3)
>>> bool((data.rows(2, 4) == data.rows(0, 5)[2:4]).all())
True
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from dmix._shapes import SHAPES, ShapeDataset, make_shape, shape_rows
from dmix.errors import InvalidParameterError
from dmix.rng import keyed_uniform

__all__ = [
    "SHAPES",
    "MixtureDataset",
    "ShapeDataset",
    "make_blobs",
    "make_mixture",
    "match_components",
    "mixture_params",
    "mixture_rows",
    "make_shape",
    "shape_rows",
]

# Stream numbers of the keyed uniforms, far from the small numbers the engine uses for its own
# random choices (dmix.engine.init), so that a dataset seed equal to a fitting seed does not
# correlate the data with the initialisation.
_LABEL_STREAM = 0x6D6978_00000001
_NOISE_STREAM = 0x6D6978_00000002


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidParameterError(
            f"{name} must be an int >= {low}. Got {value!r} instead."
        )
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidParameterError(f"seed must be an int >= 0. Got {seed!r} instead.")
    return int(seed)


def _check_dtype(dtype) -> np.dtype:
    try:
        out = np.dtype(dtype)
    except TypeError:
        out = None
    if out not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InvalidParameterError(
            f"dtype must be float32 or float64. Got {dtype!r} instead."
        )
    return out


def mixture_params(
    n_features: int,
    n_components: int,
    seed: int = 0,
    *,
    separation: float = 6.0,
    variance_range: tuple[float, float] = (0.5, 2.0),
    weight_floor: float = 0.5,
) -> dict[str, np.ndarray]:
    """The true parameters of a synthetic Gaussian mixture with full covariances.

    Parameters
    ----------
    n_features : int
        Dimension ``D`` of the data.
    n_components : int
        Number of components ``K``.
    seed : int, default=0
        Seed of the parameters (and, in :func:`mixture_rows`, of the rows).
    separation : float, default=6.0
        Minimum distance between two means, in units of the largest standard deviation any
        component can have along any direction, ``sqrt(max(variance_range))``.
    variance_range : (float, float), default=(0.5, 2.0)
        Range of the eigenvalues of the covariances.
    weight_floor : float in [0, 1], default=0.5
        Every weight is at least ``weight_floor / K``; ``1`` gives equal weights.

    Returns
    -------
    dict
        ``weights`` (K,), ``means`` (K, D) and ``covariances`` (K, D, D), float64.
    """
    d = _check_int("n_features", n_features, 1)
    k = _check_int("n_components", n_components, 1)
    seed = _check_seed(seed)
    if not (isinstance(separation, numbers.Real) and math.isfinite(separation)
            and separation > 0):
        raise InvalidParameterError(
            f"separation must be a finite float > 0. Got {separation!r} instead."
        )
    lo, hi = (float(v) for v in variance_range)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise InvalidParameterError(
            f"variance_range must be (low, high) with 0 < low <= high. Got {variance_range!r} "
            "instead."
        )
    if not (isinstance(weight_floor, numbers.Real) and 0 <= weight_floor <= 1):
        raise InvalidParameterError(
            f"weight_floor must be a float in [0, 1]. Got {weight_floor!r} instead."
        )
    rng = np.random.default_rng(seed)

    weights = weight_floor / k + (1 - weight_floor) * rng.dirichlet(np.ones(k))
    weights = weights / weights.sum()

    covariances = np.empty((k, d, d))
    for j in range(k):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))  # a uniformly distributed rotation (Haar measure)
        eig = rng.uniform(lo, hi, size=d)
        cov = (q * eig) @ q.T
        covariances[j] = 0.5 * (cov + cov.T)

    # Means by rejection: candidates from an isotropic Gaussian whose scale grows until K
    # points at pairwise distance >= min_dist have been accepted.
    min_dist = separation * math.sqrt(hi)
    scale = min_dist * max(1.0, k ** (1.0 / d))
    means: list[np.ndarray] = []
    rejected = 0
    while len(means) < k:
        candidate = rng.standard_normal(d) * scale
        if all(np.linalg.norm(candidate - m) >= min_dist for m in means):
            means.append(candidate)
            rejected = 0
        else:
            rejected += 1
            if rejected >= 50:
                scale *= 1.1
                rejected = 0
    return {"weights": weights, "means": np.array(means), "covariances": covariances}


def _check_params(params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        weights = np.asarray(params["weights"], dtype=np.float64)
        means = np.asarray(params["means"], dtype=np.float64)
        covariances = np.asarray(params["covariances"], dtype=np.float64)
    except KeyError as exc:
        raise InvalidParameterError(
            f"params must hold 'weights', 'means' and 'covariances'; {exc} is missing."
        ) from None
    if means.ndim != 2 or weights.shape != means.shape[:1] or covariances.shape != (
        means.shape[0], means.shape[1], means.shape[1]
    ):
        raise InvalidParameterError(
            "params must hold weights (K,), means (K, D) and full covariances (K, D, D). Got "
            f"shapes {weights.shape}, {means.shape} and {covariances.shape}."
        )
    return weights, means, covariances


def _cholesky(covariances: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError:
        raise InvalidParameterError(
            "params['covariances'] must be symmetric positive definite."
        ) from None


def _rows(weights, means, chol, seed, start, stop, dtype, return_labels):
    k, d = means.shape
    rows = np.arange(start, stop, dtype=np.uint64)
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    labels = np.searchsorted(cumulative, keyed_uniform(seed, _LABEL_STREAM, rows), side="right")
    labels = np.minimum(labels, k - 1)

    # Box--Muller: each pair of uniforms (u1, u2) gives two independent standard normals.
    half = (d + 1) // 2
    u = keyed_uniform(seed, _NOISE_STREAM, rows, 2 * half)
    radius = np.sqrt(-2.0 * np.log(u[:, :half]))
    angle = (2.0 * np.pi) * u[:, half:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :d]

    # x = mu_k + L_k z, accumulated over j in a fixed order with elementwise operations only.
    x = means[labels]
    for j in range(d):
        x += z[:, j : j + 1] * chol[labels, :, j]
    x = x.astype(dtype, copy=False)
    return (x, labels) if return_labels else x


def mixture_rows(
    params: dict,
    seed: int,
    start: int,
    stop: int,
    *,
    dtype=np.float64,
    return_labels: bool = False,
):
    """Rows ``[start, stop)`` of the synthetic dataset with parameters ``params`` and ``seed``.

    The result depends only on ``params``, ``seed`` and the global row indices: generating
    ``[0, n)`` at once or in blocks of any size gives bit-identical arrays.

    Parameters
    ----------
    params : dict
        ``weights`` (K,), ``means`` (K, D) and full ``covariances`` (K, D, D), as returned by
        :func:`mixture_params`.
    seed : int
        Seed of the rows (the same seed as the parameters, by convention).
    start, stop : int
        Global indices of the first row and one past the last row.
    dtype : {float32, float64}, default=float64
        dtype of the returned rows (generated in float64, then cast).
    return_labels : bool, default=False
        Also return the component of every row.

    Returns
    -------
    X : ndarray of shape (stop - start, D)
    labels : ndarray of shape (stop - start,)
        Only when ``return_labels`` is true.
    """
    weights, means, covariances = _check_params(params)
    seed = _check_seed(seed)
    start = _check_int("start", start, 0)
    stop = _check_int("stop", stop, start)
    return _rows(weights, means, _cholesky(covariances), seed, start, stop,
                 _check_dtype(dtype), return_labels)


@dataclass(frozen=True)
class MixtureDataset:
    """A synthetic Gaussian-mixture dataset that is generated block by block.

    Build it with :func:`make_mixture`. The instance is small and picklable; ``rows(start,
    stop)`` generates any block of the data independently of every other block.

    Attributes
    ----------
    n_samples, n_features, n_components : int
    seed : int
    dtype : numpy.dtype
    params : dict
        The true ``weights`` (K,), ``means`` (K, D) and ``covariances`` (K, D, D).
    """

    n_samples: int
    n_features: int
    n_components: int
    seed: int
    dtype: np.dtype
    params: dict = field(repr=False)
    _chol: np.ndarray = field(repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_samples, n_features)``."""
        return (self.n_samples, self.n_features)

    def _range(self, start, stop) -> tuple[int, int]:
        start = _check_int("start", start, 0)
        stop = _check_int("stop", stop, start)
        if stop > self.n_samples:
            raise InvalidParameterError(
                f"stop must be <= n_samples = {self.n_samples}. Got {stop!r} instead."
            )
        return start, stop

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``, shape (stop - start, n_features), of dtype :attr:`dtype`."""
        start, stop = self._range(start, stop)
        p = self.params
        return _rows(p["weights"], p["means"], self._chol, self.seed, start, stop, self.dtype,
                     False)

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """True component of rows ``[start, stop)`` (all rows by default)."""
        start, stop = self._range(start, self.n_samples if stop is None else stop)
        p = self.params
        return _rows(p["weights"], p["means"], self._chol, self.seed, start, stop, self.dtype,
                     True)[1]

    __call__ = rows


def make_mixture(
    n_samples: int,
    n_features: int,
    n_components: int,
    seed: int = 0,
    *,
    dtype=np.float64,
    separation: float = 6.0,
    variance_range: tuple[float, float] = (0.5, 2.0),
    weight_floor: float = 0.5,
) -> MixtureDataset:
    """A synthetic Gaussian mixture of ``n_samples`` rows, generated lazily block by block.

    Parameters
    ----------
    n_samples : int
        Number of rows ``N``.
    n_features : int
        Number of features ``D``.
    n_components : int
        Number of components ``K``.
    seed : int, default=0
        Seed of the parameters and of the rows.
    dtype : {float32, float64}, default=float64
        dtype of the generated rows.
    separation, variance_range, weight_floor
        Shape of the true parameters; see :func:`mixture_params`.

    Returns
    -------
    MixtureDataset
        ``dataset.params`` are the true parameters; ``dataset.rows(start, stop)`` generates a
        block (pass ``dataset.rows`` to :func:`dmix.io.store.write_blocks`).

    See Also
    --------
    make_blobs : the whole dataset in memory, with labels.
    """
    n_samples = _check_int("n_samples", n_samples, 1)
    params = mixture_params(n_features, n_components, seed, separation=separation,
                            variance_range=variance_range, weight_floor=weight_floor)
    return MixtureDataset(
        n_samples=n_samples, n_features=int(n_features), n_components=int(n_components),
        seed=int(seed), dtype=_check_dtype(dtype), params=params,
        _chol=_cholesky(params["covariances"]),
    )


def make_blobs(
    n_samples: int = 1000,
    n_features: int = 2,
    n_components: int = 3,
    seed: int = 0,
    *,
    dtype=np.float64,
    separation: float = 6.0,
    variance_range: tuple[float, float] = (0.5, 2.0),
    weight_floor: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A small synthetic Gaussian mixture in memory, for tests and examples.

    The rows are those of ``make_mixture(n_samples, n_features, n_components, seed)``.

    Parameters
    ----------
    n_samples : int, default=1000
    n_features : int, default=2
    n_components : int, default=3
    seed : int, default=0
    dtype : {float32, float64}, default=float64
    separation, variance_range, weight_floor
        See :func:`mixture_params`.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    labels : ndarray of shape (n_samples,)
        The component each row was drawn from.
    params : dict
        The true ``weights``, ``means`` and ``covariances`` (full).

    Examples
    --------
    >>> from dmix.datasets import make_blobs
    >>> X, labels, params = make_blobs(500, 2, 3, seed=1)
    >>> X.shape, labels.shape, params["covariances"].shape
    ((500, 2), (500,), (3, 2, 2))
    """
    data = make_mixture(n_samples, n_features, n_components, seed, dtype=dtype,
                        separation=separation, variance_range=variance_range,
                        weight_floor=weight_floor)
    p = data.params
    x, labels = _rows(p["weights"], p["means"], data._chol, data.seed, 0, data.n_samples,
                      data.dtype, True)
    return x, labels, data.params


def match_components(true_means, fitted_means) -> np.ndarray:
    """The fitted component matching each true component (minimum total distance).

    Parameters
    ----------
    true_means, fitted_means : array-like of shape (K, D)

    Returns
    -------
    ndarray of int, shape (K,)
        ``order`` such that ``fitted_means[order[k]]`` is the match of ``true_means[k]``; a
        permutation of ``range(K)``.
    """
    a = np.asarray(true_means, dtype=np.float64)
    b = np.asarray(fitted_means, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InvalidParameterError(
            f"true_means and fitted_means must have the same shape (K, D). Got {a.shape} and "
            f"{b.shape}."
        )
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    k = a.shape[0]
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is a dev dependency
        linear_sum_assignment = None
    if linear_sum_assignment is not None:
        rows, cols = linear_sum_assignment(cost)
        return cols[np.argsort(rows)]
    if k <= 8:  # pragma: no cover
        best = min(itertools.permutations(range(k)),
                   key=lambda p: sum(cost[i, p[i]] for i in range(k)))
        return np.array(best)
    order = np.full(k, -1)  # pragma: no cover - greedy fallback
    for flat in np.argsort(cost, axis=None):  # pragma: no cover
        i, j = divmod(int(flat), k)
        if order[i] < 0 and j not in order:
            order[i] = j
    return order  # pragma: no cover
