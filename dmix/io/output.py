"""Writing per-row results to Zarr on the cluster: row-chunked Dask arrays and generated rows.

:func:`write_rows` and :func:`write_arrays` stream row-chunked Dask arrays (log-densities,
labels, responsibilities) into Zarr arrays; :func:`write_generated` fills arrays from a
function of a row range (samples), like :func:`dmix.io.store.write_blocks` but on the workers.
Each row block is one task that computes (or receives) its rows, writes them and returns only
an optional small summary (a sum, counts), so a worker holds a few blocks at a time and
nothing but the summaries reaches the driver.

Every write covers whole stored chunks: the stored chunks hold ``chunk_rows`` rows (default:
the rows of the first block) and every block but the last must be a multiple of it, which is
checked before anything is created. In Zarr 3 two writes that share a chunk or shard
read-modify-write it and can lose each other's data without any error
(zarr-developers/zarr-python#3682); see :mod:`dmix.io.store`.

The workers open the targets themselves: a local path must be on a file system every worker
sees (always true of a ``LocalCluster``). In-memory stores (``memory://`` URLs, ``MemoryStore``)
are refused on a cluster of worker processes, each of which would write to its own copy; they
work with Dask's local schedulers and in-process clusters.

The targets of the commands' outputs are checked by :mod:`dmix.io.targets`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import zarr

from dmix.engine.reduce import resolve_client
from dmix.errors import DataError, InvalidParameterError
from dmix.io.store import (
    _open_group,
    _positive_int,
    check_target,
)
from dmix.xp import to_host

__all__ = ["Written", "write_arrays", "write_generated", "write_predictions", "write_rows"]

_calls = itertools.count()


@dataclass
class Written:
    """What :func:`write_arrays` and :func:`write_generated` wrote.

    Attributes
    ----------
    arrays : dict of str to zarr.Array
        The written arrays, by name.
    summaries : dict of str to numpy.ndarray
        For each name given a summary function, the sum over blocks of its values.
    chunk_rows : int
        Rows per stored chunk.
    n_blocks : int
        Number of blocks (write tasks).
    """

    arrays: dict[str, zarr.Array]
    summaries: dict[str, np.ndarray] = field(default_factory=dict)
    chunk_rows: int = 0
    n_blocks: int = 0


# -- validation ------------------------------------------------------------------------------


def _row_arrays(arrays: Mapping[str, da.Array]) -> tuple[dict[str, da.Array], tuple[int, ...]]:
    """The arrays chunked along rows only, and their common row chunks."""
    if not arrays:
        raise InvalidParameterError("Nothing to write: pass at least one array.")
    out = {}
    row_chunks = None
    for name, array in arrays.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidParameterError(
                f"Array names must be non-empty strings without '/'. Got {name!r} instead.")
        if not isinstance(array, da.Array):
            raise InvalidParameterError(
                f"Expected a dask.array.Array for {name!r}. Got {type(array).__name__} instead."
            )
        if array.ndim < 1:
            raise InvalidParameterError(f"Array {name!r} is 0-d; there are no rows to write.")
        if any(math.isnan(c) for chunks in array.chunks for c in chunks):
            raise DataError(
                f"Array {name!r} has unknown chunk sizes; call compute_chunk_sizes() first.")
        if any(n > 1 for n in array.numblocks[1:]):  # whole rows in every block
            array = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
        if row_chunks is None:
            row_chunks = array.chunks[0]
        elif array.chunks[0] != row_chunks:
            first = next(iter(out))
            raise InvalidParameterError(
                f"Arrays {first!r} and {name!r} have different row blocks "
                f"({len(row_chunks)} and {array.numblocks[0]} blocks, {sum(row_chunks)} and "
                f"{array.shape[0]} rows); rechunk them alike.")
        out[name] = array
    if sum(row_chunks) < 1:
        raise DataError("Nothing to write: the arrays have 0 rows.")
    return out, tuple(int(c) for c in row_chunks)


def _chunk_rows(row_chunks: Sequence[int], chunk_rows) -> int:
    """Rows per stored chunk: ``chunk_rows``, default the first block; checked for alignment."""
    if chunk_rows is None:
        chunk_rows = row_chunks[0]
    chunk_rows = _positive_int("chunk_rows", chunk_rows)
    start = 0
    for i, n in enumerate(row_chunks[:-1]):
        if n % chunk_rows:
            raise InvalidParameterError(
                f"The row blocks of the array to write are not aligned with stored chunks of "
                f"{chunk_rows} rows: block {i} (rows {start}-{start + n - 1}) has {n} rows, "
                f"not a multiple of {chunk_rows}. In Zarr 3 two writes that share a chunk can "
                "silently lose data; rechunk to blocks of a multiple of the chunk rows, or "
                "pass chunk_rows dividing every block but the last.")
        start += n
    return chunk_rows


def _dtype(name: str, value) -> np.dtype:
    try:
        return np.dtype(value)
    except TypeError:
        raise InvalidParameterError(f"dtype {value!r} of {name!r} is not a numpy dtype.") from None


def _create(group, name: str | None, shape, chunk_rows, dtype, *, overwrite, compressors,
            attributes, storage_options) -> zarr.Array:
    spec = {"shape": tuple(int(s) for s in shape),
            "chunks": (min(chunk_rows, int(shape[0])), *(int(s) for s in shape[1:])),
            "dtype": dtype, "compressors": compressors, "attributes": attributes,
            "overwrite": overwrite}
    if name is None:  # ``group`` is the array's own path or URL
        path = os.fspath(group)
        check_target(path, overwrite, storage_options, "an array")
        return zarr.create_array(store=path, storage_options=storage_options, **spec)
    if name in group and not overwrite:
        raise DataError(
            f"Cannot write array {name!r} to {group.store_path}: it already exists. Pass "
            "overwrite=True to replace it."
        )
    return group.create_array(name, **spec)


def _group(group, storage_options):
    if isinstance(group, zarr.Group):
        return group
    return _open_group(group, "a", storage_options)


def _check_summaries(summaries, names) -> dict[str, Callable]:
    summaries = dict(summaries or {})
    for name, fn in summaries.items():
        if name not in names:
            raise InvalidParameterError(
                f"summaries names {name!r}, which is not an array being written "
                f"({sorted(names)}).")
        if not callable(fn):
            raise InvalidParameterError(f"summaries[{name!r}] is not callable.")
    return summaries


# -- the tasks -------------------------------------------------------------------------------


def _put(targets, summaries, unit, start, stop, blocks):
    """Write ``blocks`` (one per target) to rows ``[start, stop)``; return their summaries."""
    n = targets[0].shape[0]
    if start % unit or (stop % unit and stop != n):  # the invariant, kept explicit
        raise AssertionError(f"write [{start}, {stop}) is not aligned with {unit} rows")
    out = []
    for target, fn, block in zip(targets, summaries, blocks):
        block = np.asarray(to_host(block), dtype=target.dtype)
        expected = (stop - start, *target.shape[1:])
        if block.shape != expected:
            raise DataError(
                f"Rows [{start}, {stop}) of {target.name!r} have shape {block.shape}; "
                f"expected {expected}.")
        target[start:stop] = block
        out.append(None if fn is None else np.asarray(fn(block)))
    return out


def _write_block(spec, start, *blocks):
    targets, summaries, unit = spec
    stop = start + int(blocks[0].shape[0])
    return _put(targets, summaries, unit, start, stop, blocks)


def _generate_block(spec, start, stop):
    targets, summaries, unit, block_fn = spec
    blocks = block_fn(start, stop)
    if isinstance(blocks, np.ndarray) or not isinstance(blocks, tuple | list):
        blocks = (blocks,)
    if len(blocks) != len(targets):
        raise DataError(
            f"block_fn({start}, {stop}) returned {len(blocks)} array(s); expected "
            f"{len(targets)}.")
    return _put(targets, summaries, unit, start, stop, blocks)


def _in_memory(store) -> bool:
    if isinstance(store, zarr.storage.MemoryStore):
        return True
    protocol = getattr(getattr(store, "fs", None), "protocol", None)
    return "memory" in ((protocol,) if isinstance(protocol, str) else tuple(protocol or ()))


def _check_reachable(where, client) -> None:
    """Refuse an in-memory target that worker processes would write copies of.

    ``where`` is a ``zarr.Group`` or a path or URL; ``client`` a resolved client or None.
    """
    processes = dask.config.get("scheduler", None) in ("processes", "multiprocessing")
    if client is None and not processes:
        return
    if isinstance(where, zarr.Group | zarr.Array):
        in_memory = _in_memory(where.store)
    else:
        in_memory = os.fspath(where).startswith("memory://")
    if not in_memory:
        return
    if client is not None:
        workers = client.scheduler_info().get("workers", {})
        if all(address.startswith("inproc://") for address in workers):
            return
    raise InvalidParameterError(
        "Cannot write to an in-memory Zarr store (memory:// or MemoryStore) on a cluster of "
        "worker processes: each worker would write to its own copy and the data would be "
        "lost. Write to a path or URL that the workers share, or use an in-process "
        "scheduler.")


def _run(tasks, client) -> list:
    """Compute the write tasks on ``client`` (resolved; None: Dask's current scheduler)."""
    if client is None:
        return list(dask.compute(*tasks))
    futures = client.compute(tasks)
    try:
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def _reduce(names, summaries, results) -> dict[str, np.ndarray]:
    out = {}
    for j, name in enumerate(names):
        if summaries[j] is not None:
            out[name] = functools.reduce(np.add, (r[j] for r in results))
    return out


def _tag() -> str:
    return f"{next(_calls)}-{uuid.uuid4().hex[:8]}"


# -- public ----------------------------------------------------------------------------------


def write_arrays(
    group,
    arrays: Mapping[str, da.Array],
    *,
    chunk_rows: int | None = None,
    dtypes: Mapping[str, object] | None = None,
    summaries: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    overwrite: bool = False,
    compressors=None,
    attributes: Mapping[str, dict] | None = None,
    storage_options: dict | None = None,
    client=None,
) -> Written:
    """Stream row-chunked Dask arrays into arrays of a Zarr group, in one pass.

    One task per row block writes the block of every array (so arrays computed from the same
    intermediate, e.g. labels and responsibilities, share it) and returns its summaries.

    Parameters
    ----------
    group : zarr.Group, str or os.PathLike
        The group, or its path or URL (created if missing).
    arrays : mapping of str to dask.array.Array
        Name -> array; all have the same number of rows and the same row blocks (blocks split
        along other axes are merged).
    chunk_rows : int, optional
        Rows per stored chunk; must divide every block but the last. Default: the rows of the
        first block.
    dtypes : mapping of str to dtype, optional
        Stored dtype per name (default: the array's); blocks are cast on the workers.
    summaries : mapping of str to callable, optional
        ``fn(block) -> ndarray`` of a fixed shape, per name (e.g. ``np.sum``); the values of
        all blocks are added and returned in :attr:`Written.summaries`. Must pickle (a module
        function or a ``functools.partial`` of one).
    overwrite : bool, default=False
        Replace arrays of these names that exist in the group.
    compressors : optional
        Passed to Zarr. Default: none.
    attributes : mapping of str to dict, optional
        Attributes per array name.
    storage_options : dict, optional
        Passed to fsspec when ``group`` is a URL.
    client : distributed.Client, optional
        Where to run; default the current client, else Dask's current scheduler.

    Returns
    -------
    Written

    Raises
    ------
    InvalidParameterError
        If the blocks are not aligned with ``chunk_rows`` (nothing is created then).
    DataError
        If an array exists and ``overwrite`` is false.
    """
    arrays, row_chunks = _row_arrays(arrays)
    rows = _chunk_rows(row_chunks, chunk_rows)
    names = list(arrays)
    dtypes = {name: _dtype(name, (dtypes or {}).get(name, arrays[name].dtype)) for name in names}
    summaries = _check_summaries(summaries, names)
    client = resolve_client(client)
    _check_reachable(group, client)
    parent = _group(group, storage_options)
    targets = [
        _create(parent, name, arrays[name].shape, rows, dtypes[name], overwrite=overwrite,
                compressors=compressors, attributes=(attributes or {}).get(name),
                storage_options=storage_options)
        for name in names
    ]
    return _write(arrays, names, targets, summaries, rows, row_chunks, client)


def write_predictions(group, estimator, data, *, proba: bool = False, client=None) -> Written:
    """Write the ``labels`` (and with ``proba`` the ``proba``) of a fitted estimator on
    ``data`` into ``group``, streamed; the ``labels`` summary counts the rows per component.

    With ``proba`` the labels are the argmax of the same blocks' probabilities, as ``predict``
    computes them."""
    if proba:
        probabilities = estimator.predict_proba(data)
        arrays = {"labels": probabilities.argmax(axis=1), "proba": probabilities}
    else:
        arrays = {"labels": estimator.predict(data)}
    counts = functools.partial(np.bincount, minlength=estimator.n_components)
    return write_arrays(group, arrays, client=client,
                        dtypes={"labels": np.int64, "proba": np.float64},
                        summaries={"labels": counts})


def _write(arrays, names, targets, summaries, rows, row_chunks, client) -> Written:
    tag = _tag()
    fns = [summaries.get(name) for name in names]
    spec = dask.delayed((targets, fns, rows), name=f"dmix-targets-{tag}", traverse=False)
    blocks = [arrays[name].to_delayed(optimize_graph=False).ravel() for name in names]
    starts = np.concatenate([[0], np.cumsum(row_chunks)]).tolist()
    tasks = [
        dask.delayed(_write_block, pure=True)(
            spec, int(starts[i]), *(b[i] for b in blocks), dask_key_name=f"dmix-write-{tag}-{i}")
        for i in range(len(row_chunks))
    ]
    results = _run(tasks, client)
    return Written(dict(zip(names, targets)), _reduce(names, fns, results), rows, len(tasks))


def write_rows(
    array: da.Array,
    path_or_url,
    name: str | None = None,
    *,
    chunk_rows: int | None = None,
    dtype=None,
    overwrite: bool = False,
    compressors=None,
    attributes: dict | None = None,
    storage_options: dict | None = None,
    client=None,
) -> zarr.Array:
    """Stream a row-chunked Dask array into a Zarr array, block by block on the cluster.

    Parameters
    ----------
    array : dask.array.Array
        Shape (n, ...); blocks split along other axes are merged (each block holds whole rows).
    path_or_url : str, os.PathLike or zarr.Group
        Where the array goes: its own path or URL, or (with ``name``) a group, given as a
        ``zarr.Group`` or as a path or URL (created if missing).
    name : str, optional
        Name of the array inside the group ``path_or_url``.
    chunk_rows : int, optional
        Rows per stored chunk; every block but the last must hold a multiple of it, so that
        every write covers whole chunks. Default: the rows of the first block.
    dtype : optional
        Stored dtype (default: the array's).
    overwrite : bool, default=False
        Replace an existing array (or, without ``name``, any Zarr node at the path; never
        non-Zarr data).
    compressors : optional
        Passed to Zarr. Default: none.
    attributes : dict, optional
        Attributes of the array.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    client : distributed.Client, optional
        Where to run; default the current client, else Dask's current scheduler.

    Returns
    -------
    zarr.Array

    Raises
    ------
    InvalidParameterError
        If the blocks are not aligned with ``chunk_rows`` (checked before anything is created).
    DataError
        If something is at the target and ``overwrite`` is false.
    """
    key = name or "array"
    arrays, row_chunks = _row_arrays({key: array})
    rows = _chunk_rows(row_chunks, chunk_rows)
    dtype = _dtype(key, arrays[key].dtype if dtype is None else dtype)
    client = resolve_client(client)
    _check_reachable(path_or_url, client)
    if name is None:
        if isinstance(path_or_url, zarr.Group):
            raise InvalidParameterError("Pass name=... to write an array into a zarr.Group.")
        target = _create(path_or_url, None, arrays[key].shape, rows, dtype,
                         overwrite=overwrite, compressors=compressors, attributes=attributes,
                         storage_options=storage_options)
    else:
        target = _create(_group(path_or_url, storage_options), name, arrays[key].shape, rows,
                         dtype, overwrite=overwrite, compressors=compressors,
                         attributes=attributes, storage_options=storage_options)
    _write(arrays, [key], [target], {}, rows, row_chunks, client)
    return target


def write_generated(
    group,
    n_rows: int,
    block_fn: Callable[[int, int], tuple],
    columns: Mapping[str, tuple[tuple[int, ...], object]],
    chunk_rows: int,
    *,
    summaries: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    overwrite: bool = False,
    compressors=None,
    storage_options: dict | None = None,
    client=None,
) -> Written:
    """Fill arrays of a Zarr group from ``block_fn(start, stop)``, one task per block.

    The cluster counterpart of :func:`dmix.io.store.write_blocks`: each task generates rows
    ``[start, stop)`` of every array on a worker and writes them there.

    Parameters
    ----------
    group : zarr.Group, str or os.PathLike
        The group, or its path or URL (created if missing).
    n_rows : int
        Rows of every array.
    block_fn : callable
        ``block_fn(start, stop)`` returns one array per entry of ``columns``, in order, each
        of shape ``(stop - start, *shape)`` (cast to the dtype). Must pickle.
    columns : mapping of str to (shape, dtype)
        Name -> trailing shape (``()`` for a vector) and dtype of each array.
    chunk_rows : int
        Rows per block and per stored chunk.
    summaries, overwrite, compressors, storage_options, client
        As in :func:`write_arrays`.

    Returns
    -------
    Written
    """
    n_rows = _positive_int("n_rows", n_rows)
    rows = _positive_int("chunk_rows", chunk_rows)
    if not columns:
        raise InvalidParameterError("Nothing to write: pass at least one column.")
    names = list(columns)
    summaries = _check_summaries(summaries, names)
    client = resolve_client(client)
    _check_reachable(group, client)
    parent = _group(group, storage_options)
    targets = []
    for name in names:
        shape, dtype = columns[name]
        targets.append(_create(parent, name, (n_rows, *tuple(shape)), rows, _dtype(name, dtype),
                               overwrite=overwrite, compressors=compressors, attributes=None,
                               storage_options=storage_options))
    tag = _tag()
    fns = [summaries.get(name) for name in names]
    spec = dask.delayed((targets, fns, rows, block_fn), name=f"dmix-targets-{tag}",
                        traverse=False)
    tasks = [
        dask.delayed(_generate_block, pure=True)(
            spec, start, min(start + rows, n_rows), dask_key_name=f"dmix-generate-{tag}-{i}")
        for i, start in enumerate(range(0, n_rows, rows))
    ]
    results = _run(tasks, client)
    return Written(dict(zip(names, targets)), _reduce(names, fns, results), rows, len(tasks))
