"""Every input becomes a Dask array chunked along rows only, with all features in each block.

Accepted: NumPy arrays (and array-likes), Dask arrays, Zarr arrays, and a path or fsspec URL of
a Zarr array, or of a group plus the name of an array in it. Data stay float32 or float64 as
stored (integers and booleans become float64); statistics are always float64.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import zarr
from dask.highlevelgraph import HighLevelGraph
from zarr.codecs import BytesCodec

from dmix.errors import DataError

__all__ = ["DEFAULT_BLOCK_BYTES", "Source", "as_source", "check_visible_to_workers",
           "direct_reads"]

#: Target bytes of one row block when the caller gives no ``chunk_size``.
DEFAULT_BLOCK_BYTES = 32 * 2**20
#: Name of the data array that ``dmix make-data`` writes and that a group opens by default.
DEFAULT_ARRAY_NAME = "X"


@dataclass(frozen=True)
class Source:
    """A validated input: the row-chunked Dask array and where it came from."""

    array: da.Array
    description: str
    in_memory: bool
    #: The NumPy array itself for in-memory input (validated, never modified), else None.
    local: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1
    ):
        raise DataError(f"chunk_size must be a positive int or None. Got {chunk_size!r} instead.")


def _default_rows(shape: tuple[int, int], itemsize: int, multiple: int = 1,
                  block_bytes: int = DEFAULT_BLOCK_BYTES, slots: int = 1) -> int:
    """Rows per block: whole units of ``multiple`` rows (a Zarr chunk or shard; 1 in memory),
    at most ``block_bytes`` per block (one unit if a unit is larger), in as many blocks as
    that needs rounded up to a multiple of ``slots`` (the cluster's worker threads), spread
    evenly, so that every thread gets the same work in each pass."""
    n_rows, n_features = shape
    n_units = math.ceil(n_rows / multiple)
    per_block = max(1, block_bytes // max(1, multiple * n_features * itemsize))
    n_blocks = math.ceil(n_units / per_block)
    n_blocks = min(n_units, math.ceil(n_blocks / slots) * slots)
    return math.ceil(n_units / n_blocks) * multiple


def _check_dtype(dtype: np.dtype, description: str) -> np.dtype:
    """float32 and float64 stay; other real numeric types become float64; the rest fail."""
    if dtype in (np.float32, np.float64):
        return dtype
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_):
        return np.dtype(np.float64)
    if np.issubdtype(dtype, np.floating):  # float16, longdouble
        return np.dtype(np.float64)
    raise DataError(
        f"Expected numeric data of a real dtype in {description}, got dtype {dtype}. "
        "Convert the data to float32 or float64."
    )


def _check_shape(shape: tuple, description: str) -> None:
    if len(shape) == 1:
        raise DataError(
            f"Expected 2D array, got 1D array instead: {description} has shape {shape}. "
            "Reshape your data either using array.reshape(-1, 1) if your data has a single "
            "feature or array.reshape(1, -1) if it contains a single sample."
        )
    if len(shape) != 2:
        raise DataError(
            f"Expected 2D array (n_samples, n_features), got {len(shape)}D array instead: "
            f"{description} has shape {shape}."
        )
    if shape[0] < 1:
        raise DataError(
            f"Found array with 0 sample(s) (shape={shape}) while a minimum of 1 is required: "
            f"{description}."
        )
    if shape[1] < 1:
        raise DataError(
            f"Found array with 0 feature(s) (shape={shape}) while a minimum of 1 is required: "
            f"{description}."
        )


def _rows_only(x: da.Array, chunk_size, block_bytes: int, slots: int) -> da.Array:
    rows = chunk_size if chunk_size is not None else "auto" if x.numblocks[0] == 1 else None
    if rows is None:
        return x.rechunk({1: -1}) if x.numblocks[1] > 1 else x
    if rows == "auto":
        rows = _default_rows(x.shape, x.dtype.itemsize, block_bytes=block_bytes, slots=slots)
    return x.rechunk({0: rows, 1: -1})


@dataclass(frozen=True)
class _RawRows:
    """Reads rows of an uncompressed, unsharded local Zarr v3 array straight from its chunk
    files, one ``readinto`` per chunk into the block's array.

    Zarr's own read makes two intermediate copies, each a fresh allocation; on Dask workers the
    Nanny's ``MALLOC_TRIM_THRESHOLD_`` makes every one of them an ``mmap`` with page faults
    (see :class:`dmix.xp.Workspace`). Measured on the benchmark machine for 32 MB blocks in a
    worker: 1.2-1.6 GB/s through zarr, 4.3-5.4 GB/s this way. Only layouts where a chunk file
    is the chunk's raw little-endian bytes in C order qualify (:func:`_raw_rows`).
    """

    directory: str
    key_encoding: object  # the array's ChunkKeyEncoding: chunk coordinates -> file name
    chunk_rows: int
    n_features: int
    dtype: str
    fill_value: float

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, self.n_features), dtype=self.dtype)
        row_bytes = self.n_features * out.itemsize
        for c in range(lo // self.chunk_rows, (hi - 1) // self.chunk_rows + 1):
            first = c * self.chunk_rows
            r0, r1 = max(lo, first) - first, min(hi, first + self.chunk_rows) - first
            dest = out[first + r0 - lo : first + r1 - lo]
            path = os.path.join(self.directory, self.key_encoding.encode_chunk_key((c, 0)))
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(r0 * row_bytes)
                    got = f.readinto(memoryview(dest).cast("B"))
            except FileNotFoundError:  # a chunk never written holds the fill value, as in zarr
                dest[...] = self.fill_value
                continue
            if got != dest.nbytes:
                raise DataError(
                    f"Zarr chunk file {path} is shorter than its chunk: expected "
                    f"{(r0 + len(dest)) * row_bytes} bytes, read {r0 * row_bytes + got}. "
                    "The store is damaged or still being written."
                )
        return out


def _raw_rows(z: zarr.Array) -> _RawRows | None:
    """A :class:`_RawRows` reader for ``z`` if its chunk files are plain C-order arrays."""
    meta = z.metadata
    if meta.zarr_format != 3 or not isinstance(z.store, zarr.storage.LocalStore):
        return None
    dtype = np.dtype(z.dtype)
    codecs = meta.codecs
    plain = len(codecs) == 1 and isinstance(codecs[0], BytesCodec)  # no compression, transpose
    little = plain and (dtype.itemsize == 1 or getattr(codecs[0].endian, "value", "") == "little")
    if not (little and sys.byteorder == "little" and dtype.kind in "fiub"):
        return None
    chunk_rows, chunk_cols = z.chunks
    if chunk_cols != z.shape[1]:
        return None
    return _RawRows(
        directory=os.path.join(os.path.abspath(str(z.store.root)), z.path),
        key_encoding=meta.chunk_key_encoding,
        chunk_rows=chunk_rows, n_features=z.shape[1], dtype=dtype.str,
        fill_value=float(z.fill_value),
    )


def _from_zarr(z: zarr.Array, rows: int) -> da.Array:
    """``z`` as a Dask array of ``rows``-row blocks: tasks ``dmix-read`` through
    :class:`_RawRows` where the layout allows it, else Dask's ``from_zarr``."""
    reader = _raw_rows(z)
    if reader is None:
        # Pass chunks explicitly: from_zarr would otherwise use the inner chunks of a shard.
        return da.from_zarr(z, chunks=(rows, z.shape[1]))
    n = z.shape[0]
    name = f"dmix-read-{uuid.uuid4().hex}"
    bounds = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
    graph = {(name, i, 0): (reader, lo, hi) for i, (lo, hi) in enumerate(bounds)}
    chunks = (tuple(hi - lo for lo, hi in bounds), (z.shape[1],))
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name,
                    chunks=chunks, dtype=np.dtype(z.dtype), meta=np.empty((0, 0), z.dtype))


def direct_reads(array: da.Array) -> list[tuple] | None:
    """``[(read, lo, hi), ...]``, one per block, if ``array`` is exactly a direct read of Zarr
    chunk files (as :func:`as_source` makes it), else None. ``read(lo, hi)`` returns the
    block: a pass can then read each block inside the task that uses it."""
    if not array.name.startswith("dmix-read-") or len(array.dask.layers) != 1:
        return None
    layer = array.dask.layers[array.name]
    tasks = [layer[(array.name, i, 0)] for i in range(array.numblocks[0])]
    # Persisted, the same keys hold the blocks themselves (futures): nothing to read then.
    if all(isinstance(t, tuple) and isinstance(t[0], _RawRows) for t in tasks):
        return tasks
    return None


def _open_zarr(path, component: str | None, storage_options: dict | None):
    """Open a path or URL as a Zarr array; a group needs ``component`` or one obvious array.

    A relative local path is made absolute first: workers on a cluster resolve paths against
    their own working directory, where zarr would find no store and read fill values (zeros).
    """
    if "://" not in str(path):
        path = os.path.abspath(os.fspath(path))
    desc = str(path)
    try:
        node = zarr.open(store=path, mode="r", path=component or "",
                         storage_options=storage_options)
    except FileNotFoundError:
        raise DataError(f"No Zarr array or group found at {desc!r}.") from None
    if isinstance(node, zarr.Array):
        return node, desc + (f" (array {component!r})" if component else "")
    names = sorted(name for name, _ in node.arrays())
    if DEFAULT_ARRAY_NAME in names:
        name = DEFAULT_ARRAY_NAME
    elif len(names) == 1:
        name = names[0]
    else:
        raise DataError(
            f"{desc!r} is a Zarr group with arrays {names}; name the one to fit "
            f"(component=..., or the path {desc}/NAME)."
        )
    return node[name], f"{desc} (array {name!r})"


def as_source(
    X,
    *,
    chunk_size: int | None = None,
    component: str | None = None,
    storage_options: dict | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    slots: int = 1,
) -> Source:
    """Validate ``X`` and return it as a row-chunked Dask array.

    Parameters
    ----------
    X : array-like, dask.array.Array, zarr.Array, str or os.PathLike
        The data, shape (n_samples, n_features). A string is a path or fsspec URL of a Zarr
        array or group.
    chunk_size : int, optional
        Rows per block. Default: the Dask array's own row chunks; for a Zarr array whole stored
        chunks (or shards), for in-memory data any rows, in equal blocks of at most
        ``block_bytes``, as many as a multiple of ``slots``.
    component : str, optional
        Name of the array inside a Zarr group.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    block_bytes : int, default=DEFAULT_BLOCK_BYTES
        Target bytes per block when ``chunk_size`` is not given (see
        :func:`dmix.engine.reduce.block_bytes_for`).
    slots : int, default=1
        Worker threads that will process the blocks: default blocks come in a multiple of it.

    Returns
    -------
    Source
    """
    _check_chunk_size(chunk_size)
    if isinstance(X, str | os.PathLike):
        X, desc = _open_zarr(os.fspath(X), component, storage_options)
    elif isinstance(X, zarr.Array):
        desc = f"Zarr array {X.store_path}"
    elif isinstance(X, da.Array):
        desc = "the Dask array"
    else:
        desc = "the input array"

    if isinstance(X, zarr.Array):
        _check_shape(X.shape, desc)
        dtype = _check_dtype(np.dtype(X.dtype), desc)
        stored = (X.shards or X.chunks)[0]
        rows = chunk_size or _default_rows(X.shape, np.dtype(X.dtype).itemsize, stored,
                                           block_bytes, slots)
        arr = _from_zarr(X, rows)
        return Source(arr if arr.dtype == dtype else arr.astype(dtype), desc, in_memory=False)

    if isinstance(X, da.Array):
        _check_shape(X.shape, desc)
        if any(np.isnan(c).any() for c in X.chunks):
            raise DataError(f"{desc} has unknown chunk sizes; call compute_chunk_sizes() first.")
        dtype = _check_dtype(X.dtype, desc)
        arr = _rows_only(X if X.dtype == dtype else X.astype(dtype), chunk_size, block_bytes,
                         slots)
        return Source(arr, desc, in_memory=False)

    if type(X).__module__.split(".")[0] == "cupy":
        # Copied to host memory once: the graph holds NumPy blocks (the scheduler and the
        # client need no CUDA); with device="cuda" the E-steps copy them back to the GPUs.
        X = X.get()
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Could not convert the input to a numeric array: {exc}") from None
    _check_shape(arr.shape, desc)
    dtype = _check_dtype(arr.dtype, desc)
    arr = arr.astype(dtype, copy=False)  # no copy for float32/float64; the input is never modified
    rows = chunk_size or _default_rows(arr.shape, arr.dtype.itemsize, block_bytes=block_bytes,
                                       slots=slots)
    # name=False: no hashing of the whole array to build a key.
    blocks = da.from_array(arr, chunks=(rows, arr.shape[1]), name=False)
    return Source(blocks, desc, in_memory=True, local=arr)


def check_visible_to_workers(X, client) -> None:
    """Raise :class:`~dmix.errors.DataError` if a local data path does not exist on every
    worker of ``client``: zarr would read fill values (zeros) there instead of failing."""
    if client is None or not isinstance(X, str | os.PathLike) or "://" in str(X):
        return
    path = os.path.abspath(os.fspath(X))
    seen = client.run(os.path.exists, path)
    missing = sorted(worker for worker, ok in seen.items() if not ok)
    if missing:
        raise DataError(
            f"The data path {path!r} does not exist on {len(missing)} of {len(seen)} Dask "
            f"worker(s) ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). Put the "
            "data on a filesystem every worker mounts at the same path, or use a URL."
        )


def with_weights(source: Source, sample_weight, *, client=None) -> da.Array:
    """The data of ``source`` with the rows' weights appended as a last column, in the same
    row blocks (so each block carries its own weights to the E-step).

    ``sample_weight`` is an array-like, Dask or Zarr array, or a path/URL of a Zarr array, of
    shape (n_samples,). Raises :class:`~dmix.errors.DataError` unless every weight is finite
    and non-negative and their sum is positive (one pass over the weights).
    """
    if isinstance(sample_weight, str | os.PathLike):
        sample_weight, desc = _open_zarr(os.fspath(sample_weight), None, None)
    else:
        desc = "sample_weight"
    if isinstance(sample_weight, zarr.Array):
        w = da.from_zarr(sample_weight)
    elif isinstance(sample_weight, da.Array):
        w = sample_weight
    else:
        if type(sample_weight).__module__.split(".")[0] == "cupy":
            sample_weight = sample_weight.get()
        w = da.from_array(np.asarray(sample_weight), name=False)
    n = source.shape[0]
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.shape != (n,):
        raise DataError(f"{desc} must have shape ({n},), one weight per row of "
                        f"{source.description}. Got shape {w.shape}.")
    if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
        raise DataError(f"{desc} must be real numbers. Got dtype {w.dtype}.")
    w = w.astype(source.dtype).rechunk((source.array.chunks[0],))
    checks = [da.isfinite(w).all(), w.min(), w.sum()]
    finite, low, total = (dask.compute(*checks) if client is None
                          else client.gather(client.compute(checks)))
    if not finite or low < 0 or not total > 0:
        raise DataError(
            f"{desc} must be finite and non-negative with a positive sum; it has "
            + ("non-finite values." if not finite else f"minimum {low!r} and sum {total!r}."))
    return da.concatenate([source.array, w[:, None]], axis=1).rechunk({1: -1})
