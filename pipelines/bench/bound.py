"""Where dmix's time per EM iteration goes, and the fraction of the machine's float64 rate it
can reach: the E-step kernel alone against the Dask round trip, measured in one run.

Usage (inside the benchmark venv, which ``run.py`` builds; datasets from ``run.py``'s cache)::

    python pipelines/bench/bound.py [--shapes 1000000x16x16,200000x64x32] [--out docs/bench]

For each dataset and covariance type of the CPU suite it measures, with ``W`` = one worker per
core:

- ``fit_s``: seconds per EM iteration of ``dmix.GaussianMixture`` on a ``LocalCluster`` of
  ``W`` single-threaded workers, data persisted (as ``run_dmix.py`` does; median of
  ``--n-iter`` iterations after a warm-up fit);
- ``kernel_s``: the same E-step code (``dmix.engine.loop.estep_pass`` with Dask's synchronous
  scheduler, so no cluster) over one worker's share of the rows (N / W), in ``W`` processes at
  once, each with one BLAS thread: the slowest process's median of 3 runs. An iteration cannot
  be shorter, whatever the scheduler does;
- ``empty_pass_s``: a pass over the same persisted blocks that computes nothing (a row count)
  on the same cluster: the round trip every iteration pays (graph submission, task dispatch,
  results back to the driver), median of 20;
- ``peak_gflops``: the float64 ``4096^3`` matrix-product rate through NumPy on all cores, as in
  ``ceilings.py``.

``bound_s = kernel_s + empty_pass_s`` is the fastest this design can be with this E-step
kernel; ``% peak`` divides the nominal flops of ``run.py`` by a time and by ``peak_gflops``.
Writes ``<out>/bound.md`` and ``<out>/bound.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ceilings import matmul_square  # noqa: E402
from data import dataset_dir  # noqa: E402
from run import SHAPES, _parse_shape, machine, nominal_flops, write_report  # noqa: E402

WORKERS = len(os.sched_getaffinity(0))


def _params(family, data: Path, covariance: str):
    init = np.load(data / "init.npz")
    return family.make_params(init["weights"], init["means"],
                              covariances=init[f"covariances_{covariance}"])


def _kernel_share(data: Path, covariance: str, part: int, parts: int) -> float:
    """Median seconds of the E-step pass over rows ``part / parts`` of the dataset, here."""
    import dask
    import dask.array as da
    from threadpoolctl import threadpool_limits

    from dmix.engine.loop import estep_pass
    from dmix.families.gaussian import Gaussian

    x = np.load(data / "X.npy", mmap_mode="r")
    lo, hi = part * len(x) // parts, (part + 1) * len(x) // parts
    share = da.from_array(np.array(x[lo:hi]), chunks=(hi - lo, x.shape[1]))
    family = Gaussian(covariance)
    params = _params(family, data, covariance)
    times = []
    with threadpool_limits(1), dask.config.set(scheduler="sync"):
        for _ in range(4):  # the first is a warm-up
            tic = time.perf_counter()
            estep_pass(family, share, params)
            times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def kernel_s(data: Path, covariance: str) -> float:
    """The slowest worker's share when all ``WORKERS`` run at once, as in a pass."""
    with ProcessPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(_kernel_share, data, covariance, i, WORKERS)
                   for i in range(WORKERS)]
        return max(f.result() for f in futures)


def _count_rows(block, start, index):
    return {"n": float(block.shape[0])}


def cluster_times(data: Path, covariance: str, n_iter: int) -> tuple[float, float]:
    """``(fit_s, empty_pass_s)`` on a fresh ``LocalCluster`` of ``WORKERS`` workers."""
    from distributed import Client, LocalCluster

    import dmix
    from dmix.engine import History
    from dmix.engine.reduce import block_bytes_for, map_reduce, place_data, worker_slots
    from dmix.families.base import tree_add
    from dmix.families.gaussian import Gaussian
    from dmix.io.source import as_source

    init = np.load(data / "init.npz")
    x = np.load(data / "X.npy")
    params = _params(Gaussian(covariance), data, covariance)
    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        def fit(max_iter):
            gm = dmix.GaussianMixture(
                len(init["weights"]), covariance_type=covariance, max_iter=max_iter, tol=0,
                weights_init=params["weights"], means_init=params["means"],
                precisions_init=np.linalg.inv(params["covariances"]) if covariance == "full"
                else 1.0 / params["covariances"], client=client, persist=True)
            history = History()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0
                gm.fit(x, monitor=history)
            return gm, [r.seconds for r in history.records]

        fit(1)
        gm, seconds = fit(n_iter)
        # The fit's own blocks, made and persisted as the estimator makes them.
        blocks = place_data(
            as_source(x, block_bytes=block_bytes_for(client), slots=worker_slots(client)).array,
            client, in_memory=True)
        empty = []
        for _ in range(21):
            tic = time.perf_counter()
            map_reduce(blocks, _count_rows, combine=tree_add, client=client, label="empty")
            empty.append(time.perf_counter() - tic)
    return statistics.median(seconds), statistics.median(empty[1:])


def plot(rows: list[dict], path: Path) -> None:
    """One stacked bar per case: kernel, empty pass, and the rest of the fit's iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']:.0e} x {r['d']} x {r['k']}\n{r['covariance']}" for r in rows]
    fit = np.array([r["fit_s"] for r in rows])
    kern = np.array([r["kernel_s"] for r in rows])
    empty = np.array([r["empty_pass_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    pos = np.arange(len(rows))
    ax.bar(pos, kern / fit, label="E-step kernel alone")
    ax.bar(pos, empty / fit, bottom=kern / fit, label="empty Dask pass")
    ax.bar(pos, np.maximum(1 - (kern + empty) / fit, 0), bottom=(kern + empty) / fit,
           label="rest of the fit's iteration")
    ax.set_xticks(pos, labels, fontsize=8)
    ax.set_ylabel("share of the fit's seconds per iteration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; machine: {report['machine']['cpu']}, {WORKERS} cores; "
        f"float64 matrix product (NumPy, all cores): {report['peak_gflops']:.0f} GFLOP/s.",
        "",
        "Seconds per EM iteration and the share of that rate, on the nominal flops of "
        "`run.py`: the fit on a LocalCluster; the E-step kernel alone over one worker's rows, "
        "all workers' shares at once in plain processes (no Dask); an empty pass (the Dask "
        "round trip of every iteration); and their sum, the fastest this design can be with "
        "this kernel.",
        "",
        "| N x D x K | covariance | fit | kernel alone | empty pass | kernel + empty pass "
        "| fit - bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['n']:,} x {r['d']} x {r['k']} | {r['covariance']} "
            f"| {r['fit_s']:.3f} s ({r['fit_pct']:.0f}%) "
            f"| {r['kernel_s']:.3f} s ({r['kernel_pct']:.0f}%) | {r['empty_pass_s']:.3f} s "
            f"| {r['bound_s']:.3f} s ({r['bound_pct']:.0f}%) "
            f"| {r['fit_s'] - r['bound_s']:+.3f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: [_parse_shape(v) for v in s.split(",")],
                        default=SHAPES)
    parser.add_argument("--covariances", default="full,diag")
    parser.add_argument("--n-iter", type=int, default=6)
    parser.add_argument("--data-root", type=Path, default=HERE / ".data")
    parser.add_argument("--out", type=Path, default=HERE.parent.parent / "docs" / "bench")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    with threadpool_limits(WORKERS):
        peak = matmul_square(4096, "float64", 5)["numpy"]
    rows = []
    for n, d, k in args.shapes:
        data = dataset_dir(args.data_root, n, d, k)
        if not (data / "done").exists():
            sys.exit(f"{data} is missing: run pipelines/bench/run.py first, which makes it")
        for covariance in args.covariances.split(","):
            flops = nominal_flops(n, d, k, covariance) / 1e9
            fit_s, empty_s = cluster_times(data, covariance, args.n_iter)
            kern_s = kernel_s(data, covariance)
            row = {"n": n, "d": d, "k": k, "covariance": covariance, "fit_s": fit_s,
                   "kernel_s": kern_s, "empty_pass_s": empty_s, "bound_s": kern_s + empty_s}
            for key in ("fit", "kernel", "bound"):
                row[f"{key}_pct"] = 100 * flops / row[f"{key}_s"] / peak
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "command": " ".join(["python pipelines/bench/bound.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": machine(),
        "peak_gflops": peak,
        "rows": rows,
    }
    write_report(args.out, "bound", report, markdown(report), lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
