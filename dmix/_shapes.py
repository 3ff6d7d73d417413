"""Two-dimensional shapes for demonstrations (exported by :mod:`dmix.datasets`): a ring, a
donut (a thick ring), a banana, a cosine, Neal's funnel and a spiral, generated block by block.

Every row depends only on the shape, the seed and its global index (keyed uniforms of
:mod:`dmix.rng`), so a dataset of any size is written in blocks of any size with the same
result, as :func:`dmix.datasets.mixture_rows` does for Gaussian mixtures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmix.errors import InvalidParameterError
from dmix.rng import keyed_uniform

__all__ = ["SHAPES", "ShapeDataset", "make_shape", "shape_rows"]

_STREAM = 7  # separates these draws from make_mixture's streams of the same seed


def _normals(u: np.ndarray) -> np.ndarray:
    """Two standard normals per row from two uniforms (Box-Muller), shape (n, 2)."""
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2.0 * np.pi * u[:, 1]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _ring(u, z, width=0.25):
    # radius ~ N(3, width^2), angle uniform
    radius = 3.0 + width * z[:, 0]
    angle = 2.0 * np.pi * u[:, 2]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _donut(u, z):
    # A thick ring (radius ~ N(3, 0.5^2)), as wide as its hole's edge is from the middle: a
    # 3-component squared mixture with a negative weight fits it, a 3-component Gaussian
    # mixture cannot (issue 8; tests/test_squared_mixture.py has the numbers).
    return _ring(u, z, width=0.5)


def _banana(u, z):
    # x1 ~ N(0, 2^2), x2 = x1^2 / 4 - 1 + N(0, 0.5^2)
    x1 = 2.0 * z[:, 0]
    return np.stack([x1, 0.25 * x1 * x1 - 1.0 + 0.5 * z[:, 1]], axis=1)


def _cosine(u, z):
    # x1 ~ U(-2 pi, 2 pi), x2 = cos(x1) + N(0, 0.2^2)
    x1 = 4.0 * np.pi * (u[:, 2] - 0.5)
    return np.stack([x1, np.cos(x1) + 0.2 * z[:, 1]], axis=1)


def _funnel(u, z):
    # Neal's funnel: v ~ N(0, 1.5^2), x | v ~ N(0, exp(v)); columns (x, v)
    v = 1.5 * z[:, 1]
    return np.stack([np.exp(0.5 * v) * z[:, 0], v], axis=1)


def _spiral(u, z):
    # t = 3 pi sqrt(U) (uniform along the arm's length), radius t / pi, noise N(0, 0.1^2)
    t = 3.0 * np.pi * np.sqrt(u[:, 2])
    r = t / np.pi
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1) + 0.1 * z


#: The shapes, by name.
SHAPES = {"ring": _ring, "donut": _donut, "banana": _banana, "cosine": _cosine,
          "funnel": _funnel, "spiral": _spiral}


def _check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise InvalidParameterError(
            f"Unknown shape {shape!r}; the shapes are {sorted(SHAPES)}.")
    return shape


def shape_rows(shape: str, seed: int, start: int, stop: int, *, dtype=np.float64) -> np.ndarray:
    """Rows ``[start, stop)`` (shape (stop - start, 2)) of the 2-D ``shape`` with ``seed``.

    Parameters
    ----------
    shape : {'ring', 'donut', 'banana', 'cosine', 'funnel', 'spiral'}
    seed : int
    start, stop : int
        Global indices of the first row and one past the last.
    dtype : {float32, float64}, default=float64
        Generated in float64, then cast.
    """
    fn = SHAPES[_check_shape(shape)]
    if not (0 <= int(start) <= int(stop)):
        raise InvalidParameterError(f"Expected 0 <= start <= stop. Got {start!r}, {stop!r}.")
    rows = np.arange(int(start), int(stop), dtype=np.uint64)
    u = keyed_uniform(int(seed), _STREAM, rows, 3)
    return fn(u, _normals(u[:, :2])).astype(dtype, copy=False)


@dataclass(frozen=True)
class ShapeDataset:
    """A 2-D shape of ``n_samples`` rows, generated block by block (:func:`make_shape`)."""

    shape_name: str
    n_samples: int
    seed: int
    dtype: np.dtype
    n_features: int = 2

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_samples, 2)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``."""
        if stop > self.n_samples:
            raise InvalidParameterError(
                f"stop must be <= n_samples = {self.n_samples}. Got {stop!r} instead.")
        return shape_rows(self.shape_name, self.seed, start, stop, dtype=self.dtype)

    __call__ = rows


def make_shape(shape: str, n_samples: int, seed: int = 0, *, dtype=np.float64) -> ShapeDataset:
    """The 2-D ``shape`` as a dataset of ``n_samples`` rows generated lazily.

    Parameters
    ----------
    shape : {'ring', 'donut', 'banana', 'cosine', 'funnel', 'spiral'}
    n_samples : int
    seed : int, default=0
    dtype : {float32, float64}, default=float64

    Returns
    -------
    ShapeDataset
        ``rows(start, stop)`` gives any block; ``rows(0, n_samples)`` the whole dataset.
    """
    n_samples = int(n_samples)
    if n_samples < 1:
        raise InvalidParameterError(f"n_samples must be >= 1. Got {n_samples!r} instead.")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise InvalidParameterError(f"dtype must be float32 or float64. Got {dtype!r}.")
    return ShapeDataset(_check_shape(shape), n_samples, int(seed), dtype)
