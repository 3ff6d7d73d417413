"""Streaming from Zarr versus persisted data: read throughput per codec, EM seconds per iteration,
and the per-iteration Dask overhead, on this machine, in one run.

Usage::

    python pipelines/bench_stream.py                       # N=1e6, D=16, K=16, 10 chunks
    python pipelines/bench_stream.py --n-samples 200000 --repeats 3 --out-json /tmp/bs.json

The dataset (``dmix.datasets.make_mixture``) is generated once in memory and written with
``dmix.io.store.write_blocks`` three times, one row chunk per ``--n-chunks`` part: without
compression (``compressors=None``), with Zarr 3's default codec (zstd level 0) and with blosc
lz4 + byte shuffle. Measured:

a. codecs: write throughput (from memory, single thread), compression ratio (decompressed bytes /
   bytes of the chunk files), and read throughput (GB/s of decompressed data) of the whole array
   read chunk by chunk, in this process and through Dask on the cluster below (a pass of
   ``dmix.engine.reduce.map_reduce`` whose chunk function only counts rows, so the time also
   holds one pass of Dask overhead). The page cache is warmed by one untimed read; best and
   median of ``--repeats``.
b. ``dmix.GaussianMixture(K, covariance_type='full', tol=0, max_iter=--n-iter)`` started at the
   true parameters (no k-means), ``persist=False``, one block per stored chunk, streaming the
   uncompressed store and the default-codec store every iteration; seconds per iteration from
   the Monitor records (median over the iterations of a fit, then median over repeats).
c. the same fit on the uncompressed data persisted on the workers beforehand (``persist=True``),
   and the user path ``fit(path, persist=True)``, whose first iteration also loads the data.
d. per-iteration Dask overhead: a ``map_reduce`` pass over the same persisted array whose chunk
   function returns ``{"n", "loglik", "n_nonfinite"}`` without touching the data, reduced with
   ``dmix.families.base.tree_add``; its seconds as a fraction of a real persisted iteration.
e. ratios: streaming / persisted throughput (target >= 0.70), overhead fraction (target < 0.10),
   codec read-throughput ratios.

Everything Dask runs on one ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
processes=True)``. GB are 1e9 bytes. Results go to ``--out-json`` (default
docs/bench_stream.json); the data go to a temporary directory deleted at the end unless
``--workdir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter

import numpy as np

N_WORKERS = 2
TARGET_STREAM_OVER_PERSISTED = 0.70
TARGET_OVERHEAD_FRACTION = 0.10
CODECS = ("none", "zstd0", "blosc_lz4_shuffle")


# -- environment and data --------------------------------------------------------------------


def _environment():
    import dask
    import distributed
    import numcodecs
    import zarr

    import dmix

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return dict(python=platform.python_version(), platform=platform.platform(),
                dmix=getattr(dmix, "__version__", "unknown"), dask=dask.__version__,
                distributed=distributed.__version__, zarr=zarr.__version__,
                numcodecs=numcodecs.__version__, numpy=np.__version__,
                cpu_count=os.cpu_count(), usable_cores=usable, load_average_start=_load())


def _load():
    """1-minute load average: other processes on a shared machine make the timings noisy."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available
        return None


def _compressors(codec, itemsize):
    from zarr.codecs import BloscCodec

    return {
        "none": None,
        "zstd0": "auto",  # Zarr 3's default for numeric data: ZstdCodec(level=0)
        "blosc_lz4_shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle",
                                        typesize=itemsize),
    }[codec]


def _generate(dataset, chunk_rows):
    """The whole dataset in memory, generated block by block."""
    x = np.empty(dataset.shape, dtype=dataset.dtype)
    for start in range(0, dataset.n_samples, chunk_rows):
        stop = min(start + chunk_rows, dataset.n_samples)
        x[start:stop] = dataset.rows(start, stop)
    return x


def _stored_bytes(path):
    """Bytes of the chunk files under a Zarr array directory (metadata excluded)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f != "zarr.json")
    return total


# -- chunk functions (module level: they travel to the worker processes) ---------------------


def _count_rows(block, start, index):
    """Touches nothing but the shape; for a streamed array, the block was read to get here."""
    return {"n": float(block.shape[0]), "loglik": 0.0, "n_nonfinite": 0}


# -- measurements ----------------------------------------------------------------------------


def _write(path, x, chunk_rows, compressors):
    from dmix.io.store import write_blocks

    tic = time.perf_counter()
    array = write_blocks(path, x.shape[0], x.shape[1], lambda a, b: x[a:b], chunk_rows,
                         x.dtype, compressors=compressors, overwrite=True)
    return time.perf_counter() - tic, array


def _read_local(path, chunk_rows):
    import zarr

    array = zarr.open_array(path, mode="r")
    tic = time.perf_counter()
    rows = 0
    for start in range(0, array.shape[0], chunk_rows):
        rows += array[start : start + chunk_rows].shape[0]
    seconds = time.perf_counter() - tic
    assert rows == array.shape[0]
    return seconds


def _read_dask(path, chunk_rows, client):
    import dask.array as da
    import zarr

    from dmix.engine.reduce import map_reduce
    from dmix.families.base import tree_add

    array = zarr.open_array(path, mode="r")
    x = da.from_zarr(array, chunks=(chunk_rows, array.shape[1]))
    tic = time.perf_counter()
    out = map_reduce(x, _count_rows, combine=tree_add, client=client, label="read")
    seconds = time.perf_counter() - tic
    assert out["n"] == array.shape[0]
    return seconds


def _fit(data, dataset, n_iter, chunk_rows, client, persist):
    import dmix
    from dmix.engine import History

    p = dataset.params
    gm = dmix.GaussianMixture(
        dataset.n_components, covariance_type="full", max_iter=n_iter, tol=0,
        weights_init=p["weights"], means_init=p["means"],
        precisions_init=np.linalg.inv(p["covariances"]), persist=persist,
        chunk_size=chunk_rows, client=client,
    )
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 by design
        gm.fit(data, monitor=history)
    seconds = [r.seconds for r in history.records]
    assert gm.n_iter_ == n_iter and len(seconds) == n_iter
    return seconds, gm


def _empty_pass(x, client):
    from dmix.engine.reduce import map_reduce
    from dmix.families.base import tree_add

    tic = time.perf_counter()
    out = map_reduce(x, _count_rows, combine=tree_add, client=client, label="empty")
    seconds = time.perf_counter() - tic
    assert out["n"] == x.shape[0]
    return seconds


def _summary(seconds_per_fit, n_rows, nbytes):
    """Median over repeats of the median iteration of a fit, as seconds, rows/s and GB/s."""
    per_fit = [statistics.median(s) for s in seconds_per_fit]
    s = statistics.median(per_fit)
    return dict(iter_s=s, iter_s_min=min(min(f) for f in seconds_per_fit),
                iter_s_per_fit=per_fit, rows_per_s=n_rows / s, gb_per_s=nbytes / s / 1e9)


# -- the run ---------------------------------------------------------------------------------


def run(args, workdir):
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster, futures_of, wait

    from dmix.datasets import make_mixture
    from dmix.engine.reduce import tree_depth

    n, d = args.n_samples, args.n_features
    chunk_rows = -(-n // args.n_chunks)
    n_chunks = -(-n // chunk_rows)
    dataset = make_mixture(n, d, args.n_components, args.seed, dtype=args.dtype)
    nbytes = n * d * dataset.dtype.itemsize
    result = dict(
        environment=_environment(),
        config=dict(n_samples=n, n_features=d, n_components=args.n_components,
                    n_chunks=n_chunks, chunk_rows=chunk_rows, dtype=dataset.dtype.name,
                    nbytes=nbytes, chunk_bytes=chunk_rows * d * dataset.dtype.itemsize,
                    repeats=args.repeats, n_iter=args.n_iter, seed=args.seed,
                    workers=N_WORKERS, threads_per_worker=1, covariance_type="full",
                    tasks_per_pass=n_chunks + 1 + _n_combines(n_chunks),
                    reduce_tree_depth=tree_depth(n_chunks, 16)),
    )
    cfg = result["config"]
    print(f"N = {n:,} x D = {d} {cfg['dtype']} ({nbytes / 1e6:.1f} MB), K = "
          f"{args.n_components}, {n_chunks} chunks of {chunk_rows:,} rows "
          f"({cfg['chunk_bytes'] / 1e6:.1f} MB); {N_WORKERS} workers x 1 thread; "
          f"best/median of {args.repeats}", flush=True)

    tic = time.perf_counter()
    x = _generate(dataset, chunk_rows)
    print(f"generated in {time.perf_counter() - tic:.1f} s", flush=True)
    paths = {c: os.path.join(workdir, f"{c}.zarr") for c in CODECS}

    # a. writes (from memory, single thread) and compression ratios
    codecs = {}
    for codec in CODECS:
        comp = _compressors(codec, dataset.dtype.itemsize)
        writes = []
        for _ in range(args.repeats):
            seconds, array = _write(paths[codec], x, chunk_rows, comp)
            writes.append(seconds)
        stored = _stored_bytes(paths[codec])
        codecs[codec] = dict(compressors=repr(tuple(array.compressors)), stored_bytes=stored,
                             ratio=nbytes / stored, write_s=min(writes),
                             write_gb_per_s=nbytes / min(writes) / 1e9)
    del x
    stored = zarr.open_array(paths["none"], mode="r")
    assert stored.shape == (n, d) and stored.chunks[0] == chunk_rows

    cluster = LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        # a. reads, warm page cache; this process, then through Dask
        for codec in CODECS:
            _read_local(paths[codec], chunk_rows)  # warm-up, untimed
            local = [_read_local(paths[codec], chunk_rows) for _ in range(args.repeats)]
            _read_dask(paths[codec], chunk_rows, client)
            dsk = [_read_dask(paths[codec], chunk_rows, client) for _ in range(args.repeats)]
            codecs[codec].update(
                read_s=min(local), read_s_median=statistics.median(local),
                read_gb_per_s=nbytes / min(local) / 1e9,
                read_gb_per_s_median=nbytes / statistics.median(local) / 1e9,
                dask_read_s=min(dsk), dask_read_s_median=statistics.median(dsk),
                dask_read_gb_per_s=nbytes / min(dsk) / 1e9,
                dask_read_gb_per_s_median=nbytes / statistics.median(dsk) / 1e9)
        result["codecs"] = codecs
        _print_codecs(codecs)

        # b, c. EM per iteration: streaming (two stores) and persisted, interleaved
        persisted = client.persist(da.from_zarr(stored, chunks=(chunk_rows, d)))
        wait(persisted)
        # Blocks per worker: persisted blocks stay where they landed (not always 5/5 for 10
        # blocks on 2 workers; 7/3 was seen), while streamed blocks go to whichever is free.
        holders = client.who_has(futures_of(persisted))
        placement = sorted(Counter(w[0] for w in holders.values() if w).values(), reverse=True)
        _fit(persisted, dataset, 1, chunk_rows, client, True)  # warm-up: imports, pickling
        fits = {"stream_none": [], "stream_zstd0": [], "persisted": []}
        from_path_first, from_path_rest = [], []
        lower_bounds = {}
        for _ in range(args.repeats):
            for key, data, persist in (("stream_none", paths["none"], False),
                                       ("stream_zstd0", paths["zstd0"], False),
                                       ("persisted", persisted, True)):
                seconds, gm = _fit(data, dataset, args.n_iter, chunk_rows, client, persist)
                fits[key].append(seconds)
                lower_bounds[key] = gm.lower_bound_
            seconds, _ = _fit(paths["none"], dataset, args.n_iter, chunk_rows, client, True)
            from_path_first.append(seconds[0])
            if len(seconds) > 1:
                from_path_rest.append(statistics.median(seconds[1:]))
        em = {key: {**_summary(v, n, nbytes), "lower_bound": lower_bounds[key]}
              for key, v in fits.items()}
        em["persisted_from_path"] = dict(
            first_iter_s=statistics.median(from_path_first),
            later_iter_s=statistics.median(from_path_rest) if from_path_rest else None)
        em["persisted"]["blocks_per_worker"] = placement
        result["em"] = em

        # d. Dask overhead: the same pass over the persisted array, with no work per block
        _empty_pass(persisted, client)  # warm-up
        empty = [_empty_pass(persisted, client) for _ in range(args.repeats * args.n_iter)]
        overhead_s = statistics.median(empty)
        real_s = em["persisted"]["iter_s"]
        result["overhead"] = dict(empty_pass_s=overhead_s, empty_pass_s_min=min(empty),
                                  real_iter_s=real_s, fraction=overhead_s / real_s,
                                  fraction_of_stream_none=overhead_s / em["stream_none"]["iter_s"],
                                  per_task_ms=1e3 * overhead_s / cfg["tasks_per_pass"])
    finally:
        client.close()
        cluster.close()

    # e. ratios
    ratios = dict(
        stream_none_over_persisted=em["persisted"]["iter_s"] / em["stream_none"]["iter_s"],
        stream_zstd0_over_persisted=em["persisted"]["iter_s"] / em["stream_zstd0"]["iter_s"],
        overhead_fraction=result["overhead"]["fraction"],
    )
    for a, b in (("none", "zstd0"), ("none", "blosc_lz4_shuffle"),
                 ("blosc_lz4_shuffle", "zstd0")):
        ratios[f"read_{a}_over_{b}"] = codecs[a]["read_gb_per_s"] / codecs[b]["read_gb_per_s"]
        ratios[f"dask_read_{a}_over_{b}"] = (codecs[a]["dask_read_gb_per_s"]
                                             / codecs[b]["dask_read_gb_per_s"])
    result["ratios"] = ratios
    result["targets"] = dict(
        stream_over_persisted_min=TARGET_STREAM_OVER_PERSISTED,
        overhead_fraction_max=TARGET_OVERHEAD_FRACTION,
        stream_none_met=ratios["stream_none_over_persisted"] >= TARGET_STREAM_OVER_PERSISTED,
        stream_zstd0_met=ratios["stream_zstd0_over_persisted"] >= TARGET_STREAM_OVER_PERSISTED,
        overhead_met=ratios["overhead_fraction"] < TARGET_OVERHEAD_FRACTION,
    )
    _print_em(result)
    return result


def _n_combines(n_blocks, split_every=16):
    total = 0
    while n_blocks > 1:
        n_blocks = -(-n_blocks // split_every)
        total += n_blocks
    return total


def _print_codecs(codecs):
    print("\na. Zarr codecs (GB/s of decompressed data; read: warm cache, best of repeats)")
    print(f"{'codec':>18} {'ratio':>6} {'write':>7} {'read':>7} {'read med':>8} "
          f"{'dask read':>9} {'dask med':>8}")
    for codec, c in codecs.items():
        print(f"{codec:>18} {c['ratio']:>6.3f} {c['write_gb_per_s']:>7.3f} "
              f"{c['read_gb_per_s']:>7.3f} {c['read_gb_per_s_median']:>8.3f} "
              f"{c['dask_read_gb_per_s']:>9.3f} {c['dask_read_gb_per_s_median']:>8.3f}",
              flush=True)


def _print_em(result):
    em, o, r, t = result["em"], result["overhead"], result["ratios"], result["targets"]
    print("\nb, c. EM per iteration (full covariances; median over iterations, then repeats)")
    print(f"{'data':>22} {'s/iter':>8} {'min':>8} {'Mrows/s':>8} {'GB/s':>7}")
    for key in ("stream_none", "stream_zstd0", "persisted"):
        e = em[key]
        print(f"{key:>22} {e['iter_s']:>8.3f} {e['iter_s_min']:>8.3f} "
              f"{e['rows_per_s'] / 1e6:>8.3f} {e['gb_per_s']:>7.3f}")
    print(f"{'':>22} persisted blocks per worker: {em['persisted']['blocks_per_worker']}")
    p = em["persisted_from_path"]
    later = f"{p['later_iter_s']:.3f}" if p["later_iter_s"] is not None else "-"
    print(f"{'fit(path, persist=True)':>22} first iteration {p['first_iter_s']:.3f} s "
          f"(includes the load), later {later} s")
    print(f"\nd. Dask overhead: empty pass {o['empty_pass_s']:.3f} s "
          f"({result['config']['tasks_per_pass']} tasks, {o['per_task_ms']:.1f} ms/task) = "
          f"{o['fraction']:.1%} of a persisted iteration ({o['real_iter_s']:.3f} s)")
    ok = {True: "met", False: "NOT met"}
    print("\ne. ratios")
    print(f"  streaming/persisted throughput: uncompressed {r['stream_none_over_persisted']:.2f}"
          f" ({ok[t['stream_none_met']]}), zstd0 {r['stream_zstd0_over_persisted']:.2f} "
          f"({ok[t['stream_zstd0_met']]}); target >= {t['stream_over_persisted_min']:.2f}")
    print(f"  overhead fraction {r['overhead_fraction']:.3f} ({ok[t['overhead_met']]}); "
          f"target < {t['overhead_fraction_max']:.2f}")
    print(f"  read none/zstd0 {r['read_none_over_zstd0']:.1f}x, none/blosc-lz4 "
          f"{r['read_none_over_blosc_lz4_shuffle']:.1f}x, blosc-lz4/zstd0 "
          f"{r['read_blosc_lz4_shuffle_over_zstd0']:.1f}x (dask: "
          f"{r['dask_read_none_over_zstd0']:.1f}x, "
          f"{r['dask_read_none_over_blosc_lz4_shuffle']:.1f}x, "
          f"{r['dask_read_blosc_lz4_shuffle_over_zstd0']:.1f}x)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=16)
    parser.add_argument("--n-chunks", type=int, default=10, help="row chunks of the stores")
    parser.add_argument("--n-iter", type=int, default=5, help="EM iterations per fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default=os.path.join("docs", "bench_stream.json"))
    parser.add_argument("--workdir", help="keep the Zarr stores here (default: a temporary "
                        "directory, deleted at the end)")
    args = parser.parse_args(argv)
    if min(args.n_samples, args.n_features, args.n_components, args.n_chunks, args.n_iter,
           args.repeats) < 1 or args.n_chunks > args.n_samples:
        parser.error("sizes, --n-iter and --repeats must be >= 1, --n-chunks <= --n-samples")

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        workdir = args.workdir
    else:
        workdir = tempfile.mkdtemp(prefix="dmix-bench-stream-")
    tic = time.perf_counter()
    try:
        result = run(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - tic
    result["environment"]["load_average_end"] = _load()
    if os.path.dirname(args.out_json):
        os.makedirs(os.path.dirname(args.out_json), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(result, f, indent=1)
    env = result["environment"]
    load = [f"{v:.1f}" if v is not None else "?" for v in
            (env["load_average_start"], env["load_average_end"])]
    print(f"\n{result['total_s']:.0f} s in all; load average {load[0]} at the start, {load[1]} "
          f"at the end on {env['usable_cores']} cores; wrote {args.out_json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
