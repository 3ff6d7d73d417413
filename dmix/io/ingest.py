"""Converting .npy, .csv and Parquet files into a Zarr array, out of core, block by block.

Each file is read in blocks of whole stored chunks (a ``.npy`` through a memory map, a CSV a
block of lines at a time, a Parquet file by record batches through pyarrow), so memory holds
one block whatever the file's size; the files are concatenated in order into the array ``X``
of a Zarr group. Every write covers whole stored chunks (see :mod:`dmix.io.store`): rows are
buffered until a block is full.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from dmix.errors import DataError, InvalidParameterError
from dmix.io.store import DEFAULT_WRITE_BYTES, create_group

__all__ = ["FORMATS", "INGEST_ATTR", "expand_files", "ingest", "ingest_signature", "read_attr",
           "write_attr"]

#: Attribute of an ingested group: the files (with their sizes) and the options.
INGEST_ATTR = "dmix_ingest"
#: File suffixes that :func:`ingest` reads.
FORMATS = (".npy", ".csv", ".parquet")


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Paths from a path, a glob pattern, or a list of them (globs sorted); all must exist
    and share one of :data:`FORMATS`."""
    out = []
    for item in [files] if isinstance(files, str | os.PathLike) else list(files):
        item = os.fspath(item)
        found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not found or not all(os.path.isfile(f) for f in found):
            raise DataError(f"No file matches {item!r}.")
        out.extend(found)
    if not out:
        raise DataError("Nothing to ingest: no files given.")
    suffixes = {os.path.splitext(f)[1].lower() for f in out}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FORMATS:
        raise DataError(f"Can ingest files of one of the formats {', '.join(FORMATS)} at a "
                        f"time; got {sorted(suffixes)}.")
    return out


# -- readers: (n_rows, n_features) and an iterator of row blocks -----------------------------


def _npy(path: str, rows: int, columns, delimiter):
    if columns is not None:
        raise InvalidParameterError(f"{path}: .npy files have no column names; drop columns.")
    x = np.load(path, mmap_mode="r")  # the OS pages in one block at a time
    if x.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array (n_samples, n_features), got shape "
                        f"{x.shape}.")

    def blocks():
        for start in range(0, x.shape[0], rows):
            yield np.asarray(x[start:start + rows])

    return x.shape, blocks()


def _is_header(line: str, delimiter: str) -> bool:
    try:
        [float(v) for v in line.split(delimiter)]
    except ValueError:
        return True
    return False


def _csv(path: str, rows: int, columns, delimiter):
    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n")
        n_lines = sum(1 for line in f if line.strip()) + bool(first.strip())
    header = _is_header(first, delimiter)
    names = [v.strip().strip('"') for v in first.split(delimiter)]
    if columns is not None:
        if not header:
            raise InvalidParameterError(f"{path} has no header line: columns cannot be chosen "
                                        "by name.")
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r}; its columns are {names}.")
        usecols = [names.index(c) for c in columns]
    else:
        usecols = None
    n_features = len(usecols) if usecols else len(names)

    def blocks():
        with open(path, encoding="utf-8") as f:
            lines = (line for line in f if line.strip())
            if header:
                next(lines)
            while True:
                chunk = list(itertools.islice(lines, rows))
                if not chunk:
                    return
                try:
                    block = np.loadtxt(io.StringIO("".join(chunk)), delimiter=delimiter,
                                       usecols=usecols, ndmin=2, dtype=np.float64)
                except ValueError as exc:
                    raise DataError(f"{path}: {exc}") from None
                yield block

    return (n_lines - header, n_features), blocks()


def _parquet(path: str, rows: int, columns, delimiter):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("Reading Parquet files needs pyarrow: pip install pyarrow") from None
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r}; its columns are {names}.")
    n_features = len(columns) if columns is not None else len(names)

    def blocks():
        for batch in f.iter_batches(batch_size=rows, columns=columns):
            yield np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns])

    return (f.metadata.num_rows, n_features), blocks()


_READERS = {".npy": _npy, ".csv": _csv, ".parquet": _parquet}


def _rebatch(blocks: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Blocks of exactly ``rows`` rows (the last may be shorter) from blocks of any size."""
    pending, held = [], 0
    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        while held >= rows:
            joined = np.concatenate(pending)
            yield joined[:rows]
            pending, held = [joined[rows:]], held - rows
    if held:
        yield np.concatenate(pending)


def ingest_signature(files: Sequence[str], columns, dtype) -> dict:
    """What identifies an ingestion: the files, their sizes and times, and the options."""
    return {"files": [os.path.abspath(f) for f in files],
            "sizes": [os.path.getsize(f) for f in files],
            "mtimes": [os.path.getmtime(f) for f in files],
            "columns": None if columns is None else list(columns),
            "dtype": np.dtype(dtype).name}


def ingest(files, out, *, chunk_size: int | None = None, dtype=np.float64,
           columns: Sequence[str] | None = None, delimiter: str = ",",
           overwrite: bool = False):
    """Convert .npy, .csv or .parquet files into the array ``X`` of the Zarr group ``out``.

    Parameters
    ----------
    files : str or sequence of str
        Paths or glob patterns, all of one format; their rows are concatenated in order.
    out : str or os.PathLike
        The Zarr group to create (local path or fsspec URL).
    chunk_size : int, optional
        Rows per stored chunk (default: about 16 MiB of rows).
    dtype : {float32, float64}, default=float64
    columns : sequence of str, optional
        Columns to keep, by name (CSV files with a header line, Parquet files).
    delimiter : str, default=','
        CSV field separator. A CSV file's first line is a header when it does not parse as
        numbers.
    overwrite : bool, default=False
        Replace a Zarr group or array at ``out``.

    Returns
    -------
    zarr.Array
        ``X``, shape (total rows, n_features); the group's attribute :data:`INGEST_ATTR`
        records :func:`ingest_signature`.

    Raises
    ------
    DataError
        For a missing file, mixed formats, files with different numbers of columns, a
        malformed CSV line, or Parquet files without pyarrow installed.
    """
    files = expand_files(files)
    dtype = np.dtype(dtype)
    reader = _READERS[os.path.splitext(files[0])[1].lower()]
    # A first look at every file: the shapes, before anything is written.
    shapes = [reader(f, 1, columns, delimiter)[0] for f in files]
    widths = {d for _, d in shapes}
    if len(widths) != 1:
        raise DataError(f"The files have different numbers of columns: "
                        f"{dict(zip(files, (d for _, d in shapes)))}.")
    n_samples, n_features = sum(n for n, _ in shapes), widths.pop()
    if n_samples == 0:
        raise DataError(f"{files[0]}: no rows to ingest.")
    if chunk_size is None:
        chunk_size = max(1, min(n_samples, 16 * 2**20 // (n_features * dtype.itemsize)))
    rows = chunk_size * max(1, DEFAULT_WRITE_BYTES // (chunk_size * n_features * dtype.itemsize))
    group = create_group(out, overwrite=overwrite, what="ingested data")
    x = group.create_array("X", shape=(n_samples, n_features), chunks=(chunk_size, n_features),
                           dtype=dtype, compressors=None)
    tic = time.perf_counter()
    blocks = itertools.chain.from_iterable(reader(f, rows, columns, delimiter)[1] for f in files)
    start = 0
    for block in _rebatch(blocks, rows):
        stop = start + block.shape[0]
        if block.shape[1] != n_features or stop > n_samples:
            raise DataError(f"The files changed while they were read (rows {start}-{stop}).")
        x[start:stop] = block.astype(dtype, copy=False)  # whole chunks: rows % chunk_size == 0
        start = stop
    if start != n_samples:
        raise DataError(f"Read {start} rows, expected {n_samples}: did the files change?")
    group.attrs[INGEST_ATTR] = {**ingest_signature(files, columns, dtype),
                                "n_samples": n_samples, "n_features": n_features,
                                "seconds": round(time.perf_counter() - tic, 3)}
    return x


def read_attr(path, name: str):
    """The attribute ``name`` of the Zarr group at ``path``; None if there is no group or no
    such attribute."""
    import zarr

    try:
        return zarr.open_group(store=os.fspath(path), mode="r").attrs.get(name)
    except (FileNotFoundError, zarr.errors.ContainsArrayError, ValueError):
        return None


def write_attr(path, name: str, value) -> None:
    """Set the attribute ``name`` of the Zarr group at ``path``."""
    import zarr

    zarr.open_group(store=os.fspath(path), mode="r+").attrs[name] = value
