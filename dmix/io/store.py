"""Writing to Zarr: datasets block by block, parameter sets, and fitted models.

Every function takes a local path or an fsspec URL (``memory://``, ``s3://``...), opened with
``zarr.open_group(store=path_or_url, ...)``; ``storage_options`` go to fsspec.

:func:`write_blocks` never holds more than a few blocks in memory, and every write covers whole
stored chunks (whole shards for a sharded array): in Zarr 3, two writes that share a shard
read-modify-write it and can lose each other's data without any error
(zarr-developers/zarr-python#3682), so a misaligned block is refused before anything is
written.

Fitted models are written and checked by :mod:`dmix.io.model`; this module keeps the schema
name, the target check and a raw reader.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from dmix.errors import DataError, InvalidParameterError

__all__ = [
    "MODEL_SCHEMA",
    "block_ranges",
    "check_alignment",
    "check_model_target",
    "check_target",
    "create_group",
    "read_model",
    "read_params",
    "write_blocks",
    "write_params",
]

#: The ``schema`` attribute of a saved model; :func:`read_model` refuses any other.
MODEL_SCHEMA = "dmix-model/1"
#: Target bytes of one write of :func:`write_blocks` when ``block_rows`` is not given.
DEFAULT_WRITE_BYTES = 32 * 2**20
_PARAMS = "params"


# -- targets ---------------------------------------------------------------------------------


def _node_kind(path: str, storage_options: dict | None) -> str:
    """What is at ``path``: 'missing' (or an empty directory), 'array', 'group' or 'other'."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(root) or (fs.isdir(root) and not fs.ls(root, detail=False)):
        return "missing"
    try:
        node = zarr.open(store=path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        return "other"
    return "array" if isinstance(node, zarr.Array) else "group"


def check_target(path: str, overwrite: bool, storage_options: dict | None,
                 what: str, replaceable: Callable[[str], bool] | None = None) -> None:
    """Refuse to write ``what`` over existing data unless ``overwrite``; never over other data.

    Parameters
    ----------
    path : str
        Local path or fsspec URL.
    overwrite : bool
        Whether an existing Zarr node at ``path`` may be replaced.
    storage_options : dict or None
        Passed to fsspec for URLs.
    what : str
        What is about to be written, for the messages ("a model", "a dataset").
    replaceable : callable, optional
        ``replaceable(kind)`` says whether the existing Zarr node (``kind`` is 'array' or
        'group') may be replaced; default: any Zarr node may.

    Raises
    ------
    DataError
        If something is in the way, naming it.
    """
    kind = _node_kind(path, storage_options)
    if kind == "missing":
        return
    if kind == "other":
        raise DataError(
            f"Cannot write {what} to {path!r}: it exists and is not a Zarr array or group. "
            "Choose another path."
        )
    if not overwrite:
        raise DataError(
            f"Cannot write {what} to {path!r}: a Zarr {kind} already exists there. Choose "
            "another path or pass overwrite=True (--overwrite on the command line)."
        )
    if replaceable is not None and not replaceable(kind):
        raise DataError(
            f"Refusing to overwrite {path!r}: it holds a Zarr {kind} that is not {what}. "
            "Choose another path."
        )


def create_group(path, *, overwrite: bool = False, storage_options: dict | None = None,
                 what: str = "a group", replaceable: Callable[[str], bool] | None = None,
                 attributes: dict | None = None) -> zarr.Group:
    """Create an empty Zarr group at ``path`` after :func:`check_target` allowed it."""
    path = os.fspath(path)
    check_target(path, overwrite, storage_options, what, replaceable)
    return zarr.open_group(store=path, mode="w", storage_options=storage_options,
                           attributes=attributes)


def _open_group(group, mode: str, storage_options: dict | None) -> zarr.Group:
    if isinstance(group, zarr.Group):
        return group
    if not isinstance(group, str | os.PathLike):
        raise InvalidParameterError(
            f"Expected a zarr.Group, a path or a URL. Got {type(group).__name__} instead."
        )
    path = os.fspath(group)
    try:
        return zarr.open_group(store=path, mode=mode, storage_options=storage_options)
    except FileNotFoundError:  # also zarr's GroupNotFoundError
        raise DataError(f"No Zarr group found at {path!r}.") from None
    except zarr.errors.ContainsArrayError:
        raise DataError(f"{path!r} is a Zarr array, not a group.") from None


# -- writing a dataset block by block --------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidParameterError(f"{name} must be a positive int. Got {value!r} instead.")
    return int(value)


def _row_count(name: str, value) -> int:
    """Rows from an int or a (rows, n_features) tuple as zarr spells chunk shapes."""
    if isinstance(value, tuple | list) and len(value) >= 1:
        value = value[0]
    return _positive_int(name, value)


def check_alignment(row_chunks: Sequence[int], unit: int, *, what: str = "the blocks") -> None:
    """Check that blocks of ``row_chunks`` rows each start and end on a multiple of ``unit``.

    Only the last block may be shorter. Use it before writing a Dask array (``x.chunks[0]``)
    into a Zarr array whose shards (or chunks, when unsharded) hold ``unit`` rows.

    Parameters
    ----------
    row_chunks : sequence of int
        Rows per block, in order.
    unit : int
        Rows per shard (or per chunk for an unsharded array).
    what : str
        How to call the blocks in the error message.

    Raises
    ------
    InvalidParameterError
        Naming the first misaligned block.
    """
    unit = _positive_int("unit", unit)
    start = 0
    rows = list(row_chunks)
    for i, n in enumerate(rows):
        if n % unit and i != len(rows) - 1:
            raise InvalidParameterError(
                f"{what} are not aligned with the stored shards of {unit} rows: block {i} "
                f"(rows {start}-{start + n - 1}) has {n} rows, not a multiple of {unit}. "
                "In Zarr 3 two writes that share a shard can silently lose data; use blocks "
                f"of a multiple of {unit} rows."
            )
        start += n


def block_ranges(n_samples: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``block_rows`` rows covering ``n_samples``."""
    for start in range(0, n_samples, block_rows):
        yield start, min(start + block_rows, n_samples)


def write_blocks(
    path_or_url,
    n_samples: int,
    n_features: int,
    block_fn: Callable[[int, int], np.ndarray],
    chunk_size: int,
    dtype=np.float64,
    shards: int | None = None,
    *,
    name: str | None = None,
    block_rows: int | None = None,
    compressors=None,
    attributes: dict | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    max_workers: int = 1,
) -> zarr.Array:
    """Create a (n_samples, n_features) Zarr v3 array and fill it block by block.

    ``block_fn(start, stop)`` returns rows ``[start, stop)``; it is called once per block and
    only ``max_workers`` blocks are in memory at a time. Every block covers whole shards (whole
    chunks when unsharded), which is checked before anything is written.

    Parameters
    ----------
    path_or_url : str, os.PathLike or zarr.Group
        Where the array goes: its own path or URL, or (with ``name``) a group, given as a
        ``zarr.Group`` or as a path or URL (created if missing).
    n_samples, n_features : int
        Shape of the array.
    block_fn : callable
        ``block_fn(start, stop) -> ndarray of shape (stop - start, n_features)``, cast to
        ``dtype``.
    chunk_size : int
        Rows per stored chunk (every chunk holds all features).
    dtype : {float32, float64} or numpy dtype, default=float64
        dtype of the stored array.
    shards : int, optional
        Rows per shard, a multiple of ``chunk_size``. Default: no sharding.
    name : str, optional
        Name of the array inside the group ``path_or_url``.
    block_rows : int, optional
        Rows per write; must be a multiple of the shard (or chunk) rows. Default: that unit
        times the largest factor that keeps a block near 32 MiB.
    compressors : optional
        Passed to Zarr. Default: none (float features compress about 1.1x, and decompression
        costs more read bandwidth than it saves).
    attributes : dict, optional
        JSON-serialisable attributes of the array.
    overwrite : bool, default=False
        Replace an existing Zarr array or group at the target (never non-Zarr data).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    max_workers : int, default=1
        Blocks generated and written concurrently (threads; each writes its own shards).

    Returns
    -------
    zarr.Array
        The written array.

    Raises
    ------
    InvalidParameterError
        If ``shards`` is not a multiple of ``chunk_size`` or ``block_rows`` not a multiple of
        the shard (or chunk) rows.
    DataError
        If the target exists (without ``overwrite``) or a block has the wrong shape.
    """
    n_samples = _positive_int("n_samples", n_samples)
    n_features = _positive_int("n_features", n_features)
    chunk_rows = _row_count("chunk_size", chunk_size)
    max_workers = _positive_int("max_workers", max_workers)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise InvalidParameterError(f"dtype {dtype!r} is not a numpy dtype.") from None
    unit = chunk_rows
    shard_shape = None
    if shards is not None:
        shard_rows = _row_count("shards", shards)
        if shard_rows % chunk_rows:
            raise InvalidParameterError(
                f"shards must be a multiple of chunk_size: {shard_rows} rows per shard is not "
                f"a multiple of {chunk_rows} rows per chunk."
            )
        unit, shard_shape = shard_rows, (shard_rows, n_features)
    if block_rows is None:
        per_unit = unit * n_features * dtype.itemsize
        block_rows = unit * max(1, DEFAULT_WRITE_BYTES // per_unit)
    block_rows = _positive_int("block_rows", block_rows)
    if block_rows % unit:
        stored = "shard" if shard_shape else "chunk"
        raise InvalidParameterError(
            f"block_rows={block_rows} is not a multiple of the {unit} rows of a stored "
            f"{stored}: writes would cover part of a {stored}, and in Zarr 3 writes that share "
            f"a shard can silently lose data. Use a multiple of {unit}."
        )

    spec = dict(shape=(n_samples, n_features), chunks=(chunk_rows, n_features),
                shards=shard_shape, dtype=dtype, compressors=compressors,
                attributes=attributes, overwrite=overwrite)
    if name is None:
        if isinstance(path_or_url, zarr.Group):
            raise InvalidParameterError("Pass name=... to write an array into a zarr.Group.")
        path = os.fspath(path_or_url)
        check_target(path, overwrite, storage_options, "an array")
        array = zarr.create_array(store=path, storage_options=storage_options, **spec)
    else:
        group = _open_group(path_or_url, "a", storage_options)
        if name in group and not overwrite:
            raise DataError(
                f"Cannot write array {name!r} to {group.store_path}: it already exists. Pass "
                "overwrite=True to replace it."
            )
        array = group.create_array(name, **spec)

    def write(bounds: tuple[int, int]) -> None:
        start, stop = bounds
        if start % unit or (stop % unit and stop != n_samples):  # the invariant, kept explicit
            raise AssertionError(f"write [{start}, {stop}) is not aligned with {unit} rows")
        block = np.asarray(block_fn(start, stop))
        if block.shape != (stop - start, n_features):
            raise DataError(
                f"block_fn({start}, {stop}) returned shape {block.shape}; expected "
                f"{(stop - start, n_features)}."
            )
        array[start:stop] = block.astype(dtype, copy=False)

    bounds = block_ranges(n_samples, block_rows)
    if max_workers == 1:
        for b in bounds:
            write(b)
    else:
        with ThreadPoolExecutor(max_workers) as pool:
            for _ in pool.map(write, bounds):
                pass
    return array


# -- parameter sets --------------------------------------------------------------------------


def write_params(group, name: str, params: Mapping, *, storage_options: dict | None = None):
    """Write a flat dict of arrays and scalars as the subgroup ``name`` of ``group``.

    Parameters
    ----------
    group : zarr.Group, str or os.PathLike
        The parent group, or its path or URL (created if missing).
    name : str
        Name of the subgroup (replaced if it exists).
    params : mapping of str to array-like
        Each value becomes one uncompressed single-chunk array (scalars as 0-d arrays).
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Returns
    -------
    zarr.Group
        The subgroup.
    """
    parent = _open_group(group, "a", storage_options)
    sub = parent.create_group(name, overwrite=True)
    for key, value in params.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise InvalidParameterError(
                f"Parameter names must be non-empty strings without '/'. Got {key!r} instead."
            )
        data = np.asarray(value)
        if data.dtype == object:
            raise InvalidParameterError(
                f"Parameter {key!r} is not a numeric array (dtype object); cannot store it."
            )
        chunks = data.shape if data.ndim and all(data.shape) else "auto"
        sub.create_array(key, data=data, chunks=chunks, compressors=None)
    return sub


def read_params(group, name: str, *, storage_options: dict | None = None) -> dict:
    """Read the subgroup ``name`` of ``group`` written by :func:`write_params`.

    Returns
    -------
    dict of str to numpy.ndarray
        One array per parameter, sorted by name (0-d arrays for scalars).
    """
    parent = _open_group(group, "r", storage_options)
    try:
        sub = parent[name]
    except KeyError:
        raise DataError(f"No parameter group {name!r} in {parent.store_path}.") from None
    if not isinstance(sub, zarr.Group):
        raise DataError(f"{sub.store_path} is an array, not a parameter group.")
    return {key: np.asarray(arr[...]) for key, arr in sorted(sub.arrays())}


# -- models ----------------------------------------------------------------------------------


def _jsonable(value, where: str):
    """``value`` with NumPy scalars and arrays turned into Python ones, or a clear error."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidParameterError(
                    f"Attribute keys must be strings; {where} has {k!r}.")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InvalidParameterError(
        f"{where} = {value!r} ({type(value).__name__}) cannot be stored as a JSON attribute."
    )


def _is_model(path: str, storage_options: dict | None) -> bool:
    try:
        group = zarr.open_group(store=path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        return False
    return group.attrs.get("schema") == MODEL_SCHEMA


def check_model_target(path, overwrite: bool = False,
                       storage_options: dict | None = None) -> None:
    """Check that :func:`dmix.io.model.save_model` may write to ``path``, before spending time
    on a fit.

    Raises
    ------
    DataError
        If something is at ``path`` and ``overwrite`` is false, or if it is not a dmix model.
    """
    path = os.fspath(path)
    check_target(path, overwrite, storage_options, "a dmix model",
                 replaceable=lambda kind: _is_model(path, storage_options))


def read_model(path, *, storage_options: dict | None = None) -> tuple[dict, dict, dict]:
    """The raw contents of a model written by :func:`dmix.io.model.save_model` (which checks
    them; this reader is for ``dmix info``).

    Parameters
    ----------
    path : str or os.PathLike
        Local path or fsspec URL of the model group.
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Returns
    -------
    family_spec : dict
    params : dict of str to numpy.ndarray
    attrs : dict
        Everything else that was saved, including ``dmix_version``.

    Raises
    ------
    DataError
        If there is no model at ``path``.
    """
    path = os.fspath(path)
    try:
        group = zarr.open_group(store=path, mode="r", storage_options=storage_options)
    except FileNotFoundError:
        raise DataError(f"No dmix model found at {path!r}: the path does not exist.") from None
    except zarr.errors.ContainsArrayError:
        raise DataError(f"No dmix model found at {path!r}: it is a Zarr array.") from None
    attrs = dict(group.attrs)
    schema = attrs.pop("schema", None)
    if schema != MODEL_SCHEMA:
        raise DataError(
            f"No dmix model found at {path!r}: it is a Zarr group whose 'schema' attribute is "
            f"{schema!r}, not {MODEL_SCHEMA!r}."
        )
    family = attrs.pop("family")
    params = read_params(group, _PARAMS)
    return family, params, attrs
