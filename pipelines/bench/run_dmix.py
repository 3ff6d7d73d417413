"""Seconds per EM iteration of dmix on a benchmark dataset, as ``peers.py`` reports a peer.

Usage::

    python pipelines/bench/run_dmix.py --data DIR --covariance {full,diag} --n-iter N \
        --source {memory,zarr} [--workers W]

dmix runs as a user would run it on one machine: a ``distributed.LocalCluster`` of ``W`` (default:
one per core) single-threaded worker processes, ``dmix.GaussianMixture`` started from
``DIR/init.npz`` with ``tol=0`` for exactly ``N`` iterations, given either the NumPy array loaded
from ``DIR/X.npy`` (``memory``: dmix persists it on the workers before the first iteration) or
the path of ``DIR/X.zarr`` (``zarr``: ``persist=False``, every iteration reads the store).

``s_per_iter`` is the median of the per-iteration seconds that dmix's monitor records (one E-step
pass over the data, the tree reduction and the M-step on the driver: a whole EM iteration, as
a user sees it). A warm-up fit of one iteration runs first, untimed for the result, so worker
imports do not count; one-off costs are in ``setup_s``. The last line of stdout is one JSON
object with the keys ``peers.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--covariance", choices=["full", "diag"], required=True)
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--source", choices=["memory", "zarr"], default="memory")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)

    import dask
    import zarr
    from distributed import Client, LocalCluster

    import dmix
    from dmix.engine import History

    setup = {}
    tic = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    setup["cluster_start"] = time.perf_counter() - tic
    init = np.load(args.data / "init.npz")
    precisions = np.linalg.inv(init[f"covariances_{args.covariance}"]) if (
        args.covariance == "full") else 1.0 / init["covariances_diag"]
    k = len(init["weights"])

    if args.source == "memory":
        tic = time.perf_counter()
        data = np.load(args.data / "X.npy")
        setup["load_npy"] = time.perf_counter() - tic
        persist = True
    else:
        data, persist = str(args.data / "X.zarr"), False

    def fit(n_iter):
        gm = dmix.GaussianMixture(k, covariance_type=args.covariance, max_iter=n_iter, tol=0,
                                  weights_init=init["weights"], means_init=init["means"],
                                  precisions_init=precisions, client=client, persist=persist)
        history = History()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never converges
            tic = time.perf_counter()
            gm.fit(data, monitor=history)
        return gm, [r.seconds for r in history.records], time.perf_counter() - tic

    _, _, setup["warmup_fit"] = fit(1)
    gm, seconds, total = fit(args.n_iter)
    if len(seconds) != args.n_iter:
        sys.exit(f"dmix ran {len(seconds)} iterations, not {args.n_iter}")
    setup["fit_outside_iterations"] = total - sum(seconds)
    x_shape = zarr.open_array(str(args.data / "X.zarr"), mode="r").shape
    n, d = x_shape
    result = {
        "peer": "dmix" if args.source == "memory" else "dmix-zarr",
        "version": dmix.__version__,
        "covariance": args.covariance,
        "n": n, "d": d, "k": k,
        "dtype": "float64",
        "s_per_iter": statistics.median(seconds),
        "iter_s": seconds,
        "setup_s": setup,
        "lower_bound": float(gm.lower_bound_),
        "init_from_given": True,
        "notes": [f"LocalCluster of {args.workers} single-threaded worker processes; "
                  f"{'data persisted on the workers' if persist else 'read from Zarr every pass'}"
                  f"; dask {dask.__version__}, zarr {zarr.__version__}"],
    }
    client.close()
    cluster.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
