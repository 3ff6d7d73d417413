"""The Dask side of the engine: per-block work, the reduction tree, and data placement.

Each pass over the data is one graph and one ``compute``::

    dmix-params-<call>      one node holding the parameters (not scattered: see DESIGN.md),
                            or none: small arguments travel inside every block's task
    dmix-<label>-<call>-i   chunk_fn(block_i, first_row_i, i, *args)   on the workers
    dmix-reduce-<call>-l-j  combine of at most ``split_every`` inputs, level l

and the caller combines the at most ``split_every`` parts of the top level. The tree has
``ceil(log_split_every(n_blocks)) - 1`` levels of tasks. Keys start with alphabetic words and
continue with numbers, so the dashboard groups them as ``dmix-estep`` and ``dmix-reduce``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import numbers
import os
import uuid

import dask
import dask.array as da
import numpy as np

from dmix.errors import DeviceError
from dmix.io.source import direct_reads
from dmix.xp import Compute, check_device, device_problem, to_device

__all__ = [
    "DEFAULT_SPLIT_EVERY",
    "block_bytes_for",
    "check_device_everywhere",
    "iteration_span",
    "map_blocks",
    "map_reduce",
    "place_data",
    "place_on_device",
    "resolve_client",
    "span",
    "tree_depth",
    "worker_slots",
]

DEFAULT_SPLIT_EVERY = 16

#: Arguments whose arrays total at most this many bytes over all blocks' tasks are copied into
#: every task instead of one shared node. A shared node is one more task per pass and a
#: transfer to every other worker before its first block starts: 5-20 ms per iteration on the
#: 2-core benchmark machine, 10-15% of a 0.15 s diagonal-covariance pass.
EMBED_BYTES = 2 * 2**20
_LOCAL_SCHEDULERS = {"sync", "synchronous", "single-threaded", "threads", "threading",
                     "processes", "multiprocessing"}
_calls = itertools.count()


def _run_chunk(chunk_fn, args, block, start, index):
    """``block`` is the block, or a function that reads it: then it is read here."""
    return chunk_fn(block() if callable(block) else block, start, index, *args)


def _array_bytes(obj) -> int:
    """Bytes of the NumPy arrays in nested dicts, lists and tuples (other leaves count 0)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_array_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_array_bytes(v) for v in obj)
    return 0


def _shared_args(args, n_tasks: int, tag: str):
    """``args`` as one graph node if copying them into ``n_tasks`` tasks would cost more than
    :data:`EMBED_BYTES`, else as they are (then each task carries its own copy)."""
    if _array_bytes(args) * n_tasks <= EMBED_BYTES:
        return args
    return dask.delayed(args, name=f"dmix-params-{tag}", traverse=False)


def _combine_many(combine, *parts):
    return functools.reduce(combine, parts)


def tree_depth(n_blocks: int, split_every: int) -> int:
    """Levels of combining above ``n_blocks`` leaves with fan-in ``split_every`` (the last
    one is done by :func:`map_reduce`'s caller, the others are tasks)."""
    depth = 0
    while n_blocks > 1:
        n_blocks = -(-n_blocks // split_every)
        depth += 1
    return depth


def _check_split_every(split_every) -> int:
    if split_every is None:
        return DEFAULT_SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, numbers.Integral) or (
        split_every < 2
    ):
        raise ValueError(f"split_every must be an int >= 2. Got {split_every!r} instead.")
    return int(split_every)


def map_reduce(
    data: da.Array,
    chunk_fn,
    *args,
    combine,
    split_every: int | None = None,
    label: str = "estep",
    client=None,
    blocks=None,
    progress=None,
):
    """Apply ``chunk_fn(block, first_row, block_index, *args)`` to every row block of ``data``
    (or to the blocks whose indices ``blocks`` lists) and reduce the results with ``combine``
    over a tree of fan-in ``split_every``.

    Returns the reduced value, computed on ``client`` if given, else on Dask's current
    scheduler (synchronous, threaded, or a default ``distributed.Client``). ``progress``, if
    given, gets ``pass_started(n_rows, n_blocks)`` before the pass and ``block_done(rows)``
    on this thread as each block's task finishes (:func:`_compute_counting`); the graph and
    the result are the same with or without it.
    """
    split_every = _check_split_every(split_every)
    if progress is not None:
        client = resolve_client(client)  # a default client's tasks are counted as futures
    if client is None:
        return _map_reduce(data, chunk_fn, args, combine, split_every, label, None, blocks,
                           progress)
    # The span is open while the graph is built: layers take the annotations current when
    # they are made (inside a fit's iteration span, a span opened only around the compute
    # would be ignored).
    with _dmix_span(label):  # groups the pass in the dashboard's Fine Performance Metrics
        return _map_reduce(data, chunk_fn, args, combine, split_every, label, client, blocks,
                           progress)


def _map_reduce(data, chunk_fn, args, combine, split_every, label, client, blocks, progress):
    tag = f"{next(_calls)}-{uuid.uuid4().hex[:8]}"
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])]).tolist()
    chosen = range(data.numblocks[0]) if blocks is None else [int(i) for i in blocks]
    if not chosen:
        raise ValueError("map_reduce needs at least one block.")
    shared = _shared_args(args, len(chosen), tag)
    # Uncompressed local Zarr blocks are read inside the task that uses them (one task per
    # block; no block waits in worker memory). Not with a shared parameters node: a task whose
    # only input is that node would be placed where it is, and every block would run there.
    reads = direct_reads(data) if shared is args else None
    if reads is not None:
        every = [functools.partial(read, lo, hi) for read, lo, hi in reads]
    else:
        every = data.to_delayed(optimize_graph=False).ravel()
    if shared is args:  # embedded: inside the callable, where Dask does not traverse them
        run, extra = dask.delayed(functools.partial(_run_chunk, chunk_fn, args), pure=True), ()
    else:
        run, extra = dask.delayed(functools.partial(_run_chunk, chunk_fn), pure=True), (shared,)
    parts = leaves = [
        run(*extra, every[i], starts[i], i, dask_key_name=f"dmix-{label}-{tag}-{i}")
        for i in chosen
    ]
    level = 0
    while len(parts) > split_every:
        parts = [
            dask.delayed(_combine_many, pure=True)(
                combine,
                *parts[j : j + split_every],
                dask_key_name=f"dmix-reduce-{tag}-{level}-{j // split_every}",
            )
            for j in range(0, len(parts), split_every)
        ]
        level += 1
    # The last combine runs here: fetching the top parts directly saves the round trip of one
    # more task (about 6 ms per pass measured on the 2-core benchmark machine).
    if progress is not None:
        rows = {leaf.key: int(data.chunks[0][i]) for leaf, i in zip(leaves, chosen, strict=True)}
        progress.pass_started(sum(rows.values()), len(rows))
        return functools.reduce(combine, _compute_counting(parts, leaves, rows, progress,
                                                           client))
    if client is None:
        return functools.reduce(combine, dask.compute(*parts))
    return functools.reduce(combine, client.gather(client.compute(parts)))


def _compute_counting(parts, leaves, rows: dict, progress, client) -> list:
    """The values of ``parts`` (the top of the tree over ``leaves``), with
    ``progress.block_done(rows[key])`` called here as each leaf's task finishes.

    With a client, the leaves are computed as futures of the same graph and counted with
    ``distributed.as_completed``; each is dropped once counted, so the scheduler frees a
    block's statistics as soon as its reduce task holds them. Otherwise a Dask callback counts
    finished tasks: the local schedulers call ``posttask`` in this thread.
    """
    if client is None:
        from dask.callbacks import Callback

        def posttask(key, result, dsk, state, worker_id):
            if key in rows:
                progress.block_done(rows[key])

        with Callback(posttask=posttask):
            return list(dask.compute(*parts))
    from distributed import as_completed

    if parts is leaves:  # no reduce tasks: the leaves are the top
        top = futures = client.compute(parts)
    else:  # one graph, as without progress; the leaves' futures come with it
        futures = client.compute([*parts, *leaves])
        top, futures = futures[: len(parts)], futures[len(parts):]
    done = as_completed(futures)
    del futures
    for future in done:
        progress.block_done(rows[future.key])
    return client.gather(top)


def span(*tags):
    """``distributed.span(*tags)``: the tasks computed inside are grouped under ``tags``
    (nested spans append their tags) in the dashboard's Fine Performance Metrics."""
    try:
        from distributed import span as _distributed_span
    except ImportError:  # pragma: no cover - spans are in distributed >= 2023.11
        return contextlib.nullcontext()
    return _distributed_span(*tags)


def _dmix_span(tag: str):
    """A span ``tag`` inside the current dmix span, else ``("dmix", tag)``."""
    current = (dask.get_annotations().get("span") or {}).get("name", ())
    return span(tag) if tuple(current[:1]) == ("dmix",) else span("dmix", tag)


def iteration_span(client, iteration: int):
    """The span of EM iteration ``iteration`` (nothing without a client): with
    :func:`dmix.dashboard.watch`'s ``("dmix", fit_id)`` the passes of a fit are grouped as
    ``dmix / fit_id / iteration-N / estep``."""
    if client is None:
        return contextlib.nullcontext()
    return _dmix_span(f"iteration-{iteration}")


def map_blocks(data: da.Array, block_fn, *args, out_columns: int | None, dtype, label: str):
    """Lazily apply ``block_fn(block, *args, start=first_row, index=block_index)`` per row
    block; the result is (n, out_columns), or (n,) if ``out_columns`` is None."""
    # map_blocks takes ``name`` as the exact key name: it must be unique per call, or two
    # results (two models scoring the same data) would share keys and one would be wrong.
    tag = f"{next(_calls)}-{uuid.uuid4().hex[:8]}"
    shared = dask.delayed(args, name=f"dmix-params-{tag}", traverse=False)
    if out_columns is None:
        return data.map_blocks(
            _apply, block_fn, shared, drop_axis=1, dtype=dtype, name=f"dmix-{label}-{tag}",
            meta=np.empty((0,), dtype=dtype),
        )
    return data.map_blocks(
        _apply, block_fn, shared, chunks=(data.chunks[0], (out_columns,)), dtype=dtype,
        name=f"dmix-{label}-{tag}", meta=np.empty((0, 0), dtype=dtype),
    )


def _apply(block, block_fn, args, block_info=None):
    location = block_info[0] if block_info else {}
    start = location.get("array-location", [(0, 0)])[0][0]
    index = location.get("chunk-location", (0,))[0]
    return block_fn(block, *args, start=start, index=index)


def block_bytes_for(client, default: int = 32 * 2**20) -> int:
    """Target bytes per row block: ``default``, or 1/16 of the smallest worker memory limit if
    that is less. A worker holds the Python process (about 150 MB), the block it computes, a
    few queued blocks and the E-step scratch; with 400 MB workers 32 MiB blocks come within
    10 MB of the memory-warning threshold (60% of the limit), 25 MB blocks keep a margin."""
    if client is None:
        return default
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    limits = [x for x in limits if x]
    return int(min(default, min(limits) // 16)) if limits else default


def worker_slots(client) -> int:
    """Worker threads of ``client``'s cluster (1 without a client): default blocks come in a
    multiple of it, so that no thread idles while another finishes a pass."""
    if client is None:
        return 1
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def _available_memory(client) -> float:
    """Bytes the data may occupy: worker memory limits on a cluster, else free host memory."""
    if client is not None:
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
        if all(limits):
            return float(sum(limits))
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def resolve_client(client=None):
    """The ``distributed.Client`` a pass should use: ``client``, else the default client unless
    a local scheduler (``"sync"``, ``"threads"``, ``"processes"``) is configured, else None."""
    if client is not None:
        return client
    if dask.config.get("scheduler", None) in _LOCAL_SCHEDULERS:
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def place_data(data: da.Array, client=None, in_memory: bool = False, persist="auto",
               fraction: float = 0.5):
    """Persist ``data`` in (cluster) memory, or leave it lazy to be streamed every pass.

    ``persist="auto"`` persists when the data fit in ``fraction`` of the available memory (the
    workers' memory limits on a cluster), and streams them otherwise: persisted data that spill
    are re-read from local disk every pass and make workers pause. In-memory (NumPy) sources
    are persisted on a cluster, so that their blocks travel to the workers once, not once per
    iteration; with a local scheduler they are already in memory. ``persist=True`` or
    ``False`` overrides the choice.
    """
    if persist == "auto":
        persist = in_memory or data.nbytes <= fraction * _available_memory(client)
    if client is not None:
        if not persist:
            return data
        return _persist_evenly(data, client)
    return data.persist() if persist and not in_memory else data


def _persist_evenly(data: da.Array, client) -> da.Array:
    """Persist ``data`` on the cluster, wait for its blocks, and spread them evenly: tasks run
    where their block is, so a 7/3 split of 10 blocks on 2 workers would make every iteration
    40% longer. Waiting also keeps the load out of the first iteration's time."""
    data = client.persist(data)
    futures = client.futures_of(data)
    from distributed import wait

    with client.as_current():  # wait() finds its client through the current one
        wait(futures)
    client.rebalance(futures)
    return data


def check_device_everywhere(compute: Compute, client=None) -> None:
    """Raise a clear error unless every worker of ``client`` (this process without one) can
    compute on ``compute.device`` (see :func:`dmix.xp.check_device`)."""
    if compute.device == "cpu":
        return
    if client is None:
        check_device(compute.device)
        return
    problems = {w: p for w, p in client.run(device_problem, compute.device).items() if p}
    if problems:
        worker, problem = next(iter(sorted(problems.items())))
        raise DeviceError(
            f"device={compute.device!r} cannot run on {len(problems)} of "
            f"{len(client.scheduler_info()['workers'])} Dask worker(s); on {worker}: {problem}. "
            "Start the workers with GPUs (dask cuda worker, or --gpus), or use device='cpu'.")


def _device_memory() -> int:
    """Total bytes of this process's current GPU (run on a worker)."""
    import cupy

    return int(cupy.cuda.Device().mem_info[1])


def place_on_device(data: da.Array, client, compute: Compute, persist="auto",
                    fraction: float = 0.5) -> da.Array:
    """The blocks the E-steps read: ``data`` itself on the CPU; on GPUs, device arrays
    persisted on the workers when they fit.

    With ``device='cuda'`` and a cluster, ``persist="auto"`` keeps the blocks (in the compute
    dtype) in GPU memory if they take at most ``fraction`` of the workers' GPUs; ``True`` keeps
    them there regardless (dask-cuda spills to host memory past its device memory limit);
    ``False``, or data that do not fit, leaves ``data`` to be copied to the GPUs every pass.
    The graph's metadata stays NumPy: only the workers hold CuPy arrays.
    """
    if compute.device == "cpu" or client is None or persist is False:
        return data
    if persist == "auto":
        memory = sum(client.run(_device_memory).values())
        if data.size * compute.itemsize > fraction * memory:
            return data
    tag = f"{next(_calls)}-{uuid.uuid4().hex[:8]}"
    on_device = data.map_blocks(to_device, compute, dtype=np.dtype(compute.dtype),
                                meta=np.empty((0, 0), dtype=compute.dtype),
                                name=f"dmix-todevice-{tag}")
    return _persist_evenly(on_device, client)
