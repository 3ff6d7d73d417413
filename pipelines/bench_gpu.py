"""dmix on GPUs, measured in one run: the device's ceilings first, then seconds per EM iteration
and the fraction of the relevant ceiling, with scikit-learn on the same machine's CPU cores as
the ratio a user would see.

Usage, on a machine with an NVIDIA GPU and ``pip install -e ".[gpu,dev]"``::

    python pipelines/bench_gpu.py [--out docs/bench] [--repeats 3] [--n-iter 4]
    python pipelines/bench_gpu.py --smoke --out /tmp/x    # tiny shapes on the CPU (CI)

On the lent GPU machine, whose Python has CuPy but neither dask, distributed nor zarr, carry the
wheels: here, ``pip download -d .wheels dask distributed zarr dask-cuda scikit-learn psutil``
(for the device's Python version and platform: ``--python-version 3.12 --only-binary=:all:
--platform manylinux2014_x86_64``), ``echo /.wheels/ >> .git/info/exclude``, and run with
``carry=[".wheels"]``: ``pip install --no-index --find-links .wheels dask distributed zarr
dask-cuda scikit-learn && pip install --no-deps -e . && python pipelines/bench_gpu.py``.

Method (the device tool's METHOD.md): ceilings measured first with CUDA events, a warm-up call
before every timed one, medians of ``--repeats``, data drawn fresh for each shape, and each
fit's log-likelihood checked against a float64 CPU evaluation of the same parameters.

Cases (``N, D, K, covariance, placement``): (1e6, 64, 64, full) and (1e6, 128, 1024, diag)
persisted on the GPU, (1e7, 32, 32, full) streamed from host memory every pass, and the first
case on every GPU when there are two or more. For each: seconds per iteration of the fit on a
dask-cuda cluster (median over iterations after the first), the E-step alone (one
``estep_pass`` in this process), nominal GFLOP/s (``pipelines/bench/run.py``'s count) and
their fraction of the float32 matrix-product rate, and for the streamed case how busy the GPU
is (the E-step time on device-resident blocks over the streamed iteration's).
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bench"))

from run import nominal_flops  # noqa: E402

CASES = [(1_000_000, 64, 64, "full", "device"), (1_000_000, 128, 1024, "diag", "device"),
         (10_000_000, 32, 32, "full", "stream")]
SMOKE_CASES = [(20_000, 8, 4, "full", "device"), (20_000, 16, 32, "diag", "device"),
               (50_000, 8, 4, "full", "stream")]


# -- ceilings --------------------------------------------------------------------------------


def _device_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` on the GPU, timed with CUDA events after a warm-up."""
    import cupy

    fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def matmul_rate(n: int, dtype: str, repeats: int) -> float:
    """GFLOP/s of an ``n^3`` matrix product (TF32 when ``CUPY_TF32=1`` is set for float32)."""
    import cupy

    a = cupy.random.standard_normal((n, n), dtype=np.float64).astype(dtype)
    b = cupy.random.standard_normal((n, n), dtype=np.float64).astype(dtype)
    out = cupy.empty((n, n), dtype)
    return 2 * n**3 / _device_seconds(lambda: cupy.matmul(a, b, out=out), repeats) / 1e9


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of a device-to-device copy (bytes read plus written)."""
    import cupy

    a = cupy.ones(nbytes // 4, dtype=cupy.float32)
    b = cupy.empty_like(a)
    return 2 * nbytes / _device_seconds(lambda: cupy.copyto(b, a), repeats) / 1e9


def ceilings(repeats: int) -> dict:
    """The device's rates; TF32 in a subprocess, since CuPy reads ``CUPY_TF32`` at import."""
    import subprocess

    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    tf32 = subprocess.run(
        [sys.executable, __file__, "--tf32-rate", str(repeats)], capture_output=True,
        text=True, env={**os.environ, "CUPY_TF32": "1"}, check=True).stdout.strip()
    return {"gpu": name, "n_gpus": cupy.cuda.runtime.getDeviceCount(),
            "fp32_gflops": matmul_rate(8192, "float32", repeats), "tf32_gflops": float(tf32),
            "fp64_gflops": matmul_rate(8192, "float64", repeats),
            "copy_gbs": copy_bandwidth(2**30, repeats)}


# -- dmix and scikit-learn ----------------------------------------------------------------------


def make_data(n: int, d: int, k: int, seed: int):
    """Rows of a random mixture with unit covariances, and its means (the fits' start)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0, size=(k, d))
    x = rng.standard_normal((n, d))
    x += means[rng.integers(0, k, n)]
    return x, means


def _init(x, means, covariance: str) -> dict:
    k, d = means.shape
    prec = np.tile(np.eye(d), (k, 1, 1)) if covariance == "full" else np.ones((k, d))
    return {"weights_init": np.full(k, 1.0 / k), "means_init": means, "precisions_init": prec}


def fit_seconds(x, means, covariance, device, client, persist, n_iter: int):
    """(median seconds per iteration after the first, the fitted estimator)."""
    import dmix
    from dmix.engine import History

    gm = dmix.GaussianMixture(len(means), covariance_type=covariance, max_iter=n_iter + 1,
                              tol=0, device=device, client=client, persist=persist,
                              **_init(x, means, covariance))
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0
        gm.fit(x, monitor=history)
    return statistics.median(r.seconds for r in history.records[1:]), gm


def estep_seconds(x, gm, device: str, repeats: int, on_device: bool) -> float:
    """Median seconds of one E-step pass in this process (blocks on the GPU if ``on_device``)."""
    import dask
    import dask.array as da

    from dmix.engine.loop import estep_pass

    compute = gm._compute
    data = da.from_array(x, chunks=(min(len(x), 250_000), x.shape[1]))
    if on_device and device == "cuda":
        from dmix.xp import to_device

        data = data.map_blocks(to_device, compute, meta=np.empty((0, 0), compute.dtype))
        data = data.persist(scheduler="sync")
    times = []
    with dask.config.set(scheduler="sync"):
        for _ in range(repeats + 1):  # the first is a warm-up
            tic = time.perf_counter()
            estep_pass(gm._family, data, gm._params, compute=compute)
            times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def loglik_error(x, gm, rows: int = 200_000) -> float:
    """Relative difference of the fit's mean log-likelihood (on its device and dtype) from a
    float64 CPU evaluation of the same parameters, on the first ``rows`` rows."""
    import dask

    with dask.config.set(scheduler="sync"):  # the fit's cluster is closed by now
        got = gm.set_params(client=None).score(x[:rows])
        ref = gm.set_params(device="cpu", dtype="float64").score(x[:rows])
    return abs(got - ref) / abs(ref)


def sklearn_seconds(x, means, covariance: str) -> float:
    """scikit-learn's seconds per iteration: (fit of 3 iterations - fit of 1) / 2."""
    from sklearn.mixture import GaussianMixture

    init = _init(x, means, covariance)
    times = []
    for max_iter in (1, 3):
        gm = GaussianMixture(len(means), covariance_type=covariance, max_iter=max_iter, tol=0,
                             **init)
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(x)
        times.append(time.perf_counter() - tic)
    return (times[1] - times[0]) / 2


def _cluster(device: str, all_gpus: bool = False):
    from distributed import Client, LocalCluster

    if device == "cuda":
        from dask_cuda import LocalCUDACluster

        options = {} if all_gpus else {"CUDA_VISIBLE_DEVICES": "0"}
        cluster = LocalCUDACluster(dashboard_address=None, **options)
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    return cluster, Client(cluster)


def run_case(n, d, k, covariance, placement, args, peak, all_gpus=False) -> dict:
    x, means = make_data(n, d, k, seed=n + d + k)
    cluster, client = _cluster(args.device, all_gpus)
    with cluster, client:
        workers = len(client.scheduler_info()["workers"])
        fit_s, gm = fit_seconds(x, means, covariance, args.device, client,
                                persist="auto" if placement == "device" else False,
                                n_iter=args.n_iter)
    row = {"n": n, "d": d, "k": k, "covariance": covariance, "placement": placement,
           "workers": workers, "dtype": gm._compute.dtype, "fit_s": fit_s,
           "estep_s": estep_seconds(x, gm, args.device, args.repeats, placement == "device")}
    flops = nominal_flops(n, d, k, covariance) / 1e9
    row["gflops"] = flops / fit_s
    if peak:
        row["fraction_of_fp32"] = row["gflops"] / peak
        row["estep_fraction_of_fp32"] = flops / row["estep_s"] / peak
    if placement == "stream":  # busy: compute on resident blocks over the streamed pass
        row["gpu_busy"] = estep_seconds(x, gm, args.device, args.repeats, True) / fit_s
    row["loglik_rel_error"] = loglik_error(x, gm)
    if not args.skip_sklearn and not all_gpus:
        row["sklearn_s"] = sklearn_seconds(x, means, covariance)
        row["sklearn_ratio"] = row["sklearn_s"] / fit_s
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Date: {report['date']}", ""]
    c = report.get("ceilings")
    if c:
        lines += [f"Ceilings on {c['gpu']} ({c['n_gpus']} GPU(s)): float32 {c['fp32_gflops']:.0f}, "
                  f"TF32 {c['tf32_gflops']:.0f}, float64 {c['fp64_gflops']:.0f} GFLOP/s "
                  f"(8192^3 products); device copy {c['copy_gbs']:.0f} GB/s.", ""]
    else:
        lines += [f"No GPU ceilings: {report['note']}", ""]
    lines += ["| N x D x K | covariance | placement | workers | dtype | s/iter | E-step s "
              "| GFLOP/s | of fp32 | E-step of fp32 | GPU busy | log-lik rel. error "
              "| scikit-learn s/iter (ratio) |", "|---" * 13 + "|"]
    for r in report["rows"]:
        def pct(key):
            return f"{100 * r[key]:.0f}%" if key in r else "-"
        sk = f"{r['sklearn_s']:.3g} ({r['sklearn_ratio']:.0f}x)" if "sklearn_s" in r else "-"
        lines.append(
            f"| {r['n']:,} x {r['d']} x {r['k']} | {r['covariance']} | {r['placement']} "
            f"| {r['workers']} | {r['dtype']} | {r['fit_s']:.4g} | {r['estep_s']:.4g} "
            f"| {r['gflops']:.0f} | {pct('fraction_of_fp32')} | {pct('estep_fraction_of_fp32')} "
            f"| {pct('gpu_busy')} | {r['loglik_rel_error']:.1e} | {sk} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-iter", type=int, default=4)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--tf32-rate", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tf32_rate:
        print(matmul_rate(8192, "float32", args.tf32_rate))
        return 0
    args.device = "cpu" if args.smoke else "cuda"
    report = {"command": " ".join(["python pipelines/bench_gpu.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now().isoformat(timespec="minutes"), "rows": []}
    if args.smoke:
        report["note"] = "--smoke runs tiny shapes on the CPU; its times mean nothing."
        peak = None
    else:
        report["ceilings"] = ceilings(max(5, args.repeats))
        peak = report["ceilings"]["fp32_gflops"]
    for case in SMOKE_CASES if args.smoke else CASES:
        report["rows"].append(run_case(*case, args, peak))
    if not args.smoke and report["ceilings"]["n_gpus"] >= 2:
        report["rows"].append(run_case(*CASES[0], args, peak, all_gpus=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "gpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
