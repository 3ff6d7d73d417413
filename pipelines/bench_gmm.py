"""Seconds per EM iteration: dmix on a local cluster versus scikit-learn, same data, one run.

Usage::

    python pipelines/bench_gmm.py                      # the issue's shapes, full and diag
    python pipelines/bench_gmm.py --n-samples 200000 --shapes 16x16 --repeats 3

Both fit the same in-memory float64 data from the same initial parameters for a fixed number of
iterations (tol=0), so both do the same work. Per-iteration time is the median over iterations
of a fit (dmix: from its per-iteration records; scikit-learn: total fit time / iterations, its
E- and M-steps being the whole loop). The data are generated once; the two libraries run
interleaved ``--repeats`` times and the median is reported, with the ratio
scikit-learn / dmix (> 1 means dmix is faster). dmix runs on a ``distributed.LocalCluster``
with one single-threaded worker process per core; it is given the NumPy array, as a user
would, and persists it on the workers once per fit (not counted in the per-iteration time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import numpy as np


def _data(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(k, d))
    labels = rng.integers(k, size=n)
    x = means[labels] + rng.normal(size=(n, d))
    return x, means


def _init(x, means, covariance_type):
    k, d = means.shape
    precisions = {
        "full": np.broadcast_to(np.eye(d), (k, d, d)).copy(),
        "diag": np.ones((k, d)),
    }[covariance_type]
    return dict(weights_init=np.full(k, 1.0 / k), means_init=means + 0.5,
                precisions_init=precisions)


def _time_sklearn(x, init, covariance_type, n_iter):
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(len(init["weights_init"]), covariance_type=covariance_type,
                         max_iter=n_iter, tol=0, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tic = time.perf_counter()
        gm.fit(x)
    return (time.perf_counter() - tic) / n_iter, gm.lower_bound_


class _Times:
    def __init__(self):
        self.seconds = []

    def begin_init(self, init):
        pass

    def end_iteration(self, record):
        self.seconds.append(record.seconds)

    def end_init(self, init, result, seconds):
        pass


def _time_dmix(data, init, covariance_type, n_iter, client):
    import dmix

    gm = dmix.GaussianMixture(len(init["weights_init"]), covariance_type=covariance_type,
                              max_iter=n_iter, tol=0, client=client, **init)
    times = _Times()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data, monitor=times)
    return statistics.median(times.seconds), gm.lower_bound_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--shapes", default="16x16,64x32", help="DxK pairs, comma-separated")
    parser.add_argument("--covariance-types", default="full,diag")
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    rows = []
    print(f"N = {args.n_samples:,}, {args.workers} dmix workers; seconds per EM iteration, "
          f"median of {args.repeats}")
    print(f"{'D':>4} {'K':>4} {'covariance':>10} {'sklearn':>9} {'dmix':>9} {'ratio':>7}")
    for shape in args.shapes.split(","):
        d, k = (int(v) for v in shape.split("x"))
        x, means = _data(args.n_samples, d, k)
        for cov in args.covariance_types.split(","):
            init = _init(x, means, cov)
            sk, dm = [], []
            for _ in range(args.repeats):  # interleaved
                t, lb_sk = _time_sklearn(x, init, cov, args.n_iter)
                sk.append(t)
                t, lb_dm = _time_dmix(x, init, cov, args.n_iter, client)
                dm.append(t)
            row = dict(n=args.n_samples, d=d, k=k, covariance_type=cov,
                       sklearn_s=statistics.median(sk), dmix_s=statistics.median(dm),
                       lower_bound_sklearn=lb_sk, lower_bound_dmix=lb_dm)
            row["ratio"] = row["sklearn_s"] / row["dmix_s"]
            rows.append(row)
            print(f"{d:>4} {k:>4} {cov:>10} {row['sklearn_s']:>9.3f} {row['dmix_s']:>9.3f} "
                  f"{row['ratio']:>6.1f}x", flush=True)
    client.close()
    cluster.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
