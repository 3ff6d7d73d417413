"""A bounded sample of the rows of any input, for plots: a few contiguous windows spread
over the rows, so that only the chunks under them are read (never the whole store)."""

from __future__ import annotations

import dask.array as da
import numpy as np

from dmix.io.source import as_source

__all__ = ["preview_rows"]

#: Windows the sample is read from: evenly spaced, so sorted or drifting data are covered.
N_WINDOWS = 8


def preview_rows(X, max_rows: int = 5000) -> np.ndarray:
    """At most ``max_rows`` rows of ``X`` (NumPy, Dask, Zarr, or a Zarr path/URL) as float64.

    All rows if there are no more than ``max_rows``; else ``N_WINDOWS`` contiguous windows of
    about ``max_rows / N_WINDOWS`` rows, evenly spaced from the first row to the last. Rows
    with a non-finite value are dropped.
    """
    source = as_source(X)
    n = source.shape[0]
    if source.local is not None:
        x = source.local
        take = (np.arange(n) if n <= max_rows else
                np.concatenate([np.arange(lo, lo + size) for lo, size in _windows(n, max_rows)]))
        rows = np.asarray(x[take], dtype=np.float64)
    elif n <= max_rows:
        rows = np.asarray(source.array.compute(), dtype=np.float64)
    else:
        parts = [source.array[lo:lo + size] for lo, size in _windows(n, max_rows)]
        rows = np.asarray(da.concatenate(parts).compute(), dtype=np.float64)
    return rows[np.isfinite(rows).all(axis=1)]


def _windows(n: int, max_rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of each window: ``max_rows`` rows in all, none past row ``n``."""
    size = max(1, max_rows // N_WINDOWS)
    k = max_rows // size
    starts = np.linspace(0, n - size, k).astype(int)
    return [(int(lo), size) for lo in starts]
