"""dmix on GPUs, measured in one run: the device's ceilings, then seconds per EM iteration and
their fraction of the relevant ceiling, with scikit-learn on the machine's CPU cores beside.

Usage, on a machine with an NVIDIA GPU and ``pip install -e ".[gpu,dev]"``::

    python pipelines/bench_gpu.py [--out docs/bench] [--cases full64,stream32] [--n-iter 5]
    python pipelines/bench_gpu.py --smoke --out /tmp/x    # tiny shapes on the CPU (CI)

On the device tool's lent GPU machines (Python 3.12 with CuPy, NumPy, scikit-learn, but no
dask, distributed, dask-cuda or zarr, and no network), ``pipelines/bench_gpu.sh`` carries the
missing wheels: ``bash pipelines/bench_gpu.sh download`` here puts them in ``.whl/`` (5 MB,
git-ignored), then ``run(command="bash pipelines/bench_gpu.sh run --out $OUT",
carry=[".whl"])`` installs them into ``/tmp/site`` there and runs this script from the
checkout. All cases should take 6-8 minutes on one H100 with 16 cores, most of it
scikit-learn's (an estimate: not yet run); ``--cases`` and ``--skip-sklearn`` split or shorten
a run that must fit in a 10-minute call.

Method (the device tool's METHOD.md):

- Ceilings first, on GPU 0: 8192^3 matrix products in float32, TF32 (each in a subprocess with
  ``CUPY_TF32`` set to 0 or 1: CuPy reads it at the first float32 product) and float64; a
  device-to-device copy of 1 GiB (bytes read plus written); a host-to-device copy of 1 GiB
  from pinned memory; and, on the host, the float64 -> float32 copy into a pinned buffer that
  dmix's streaming does on one thread. CUDA events around each timed call, one untimed
  warm-up, the median of ``max(5, --repeats)``; random inputs, the output poisoned with NaN
  before the checked call, and each product checked against float64 (rows of it).
- Per case, fresh data: unit-covariance components with means ~ N(0, 3^2), the true means,
  uniform weights and unit covariances as every fit's start. dmix fits on a dask-cuda
  ``LocalCUDACluster`` (one worker per GPU; float32 compute unless ``--dtype``) for
  ``--n-iter`` + 1 iterations at ``tol=0``; seconds per iteration are the median of the
  ``History`` records after the first (which compiles the kernels). Wall-clock, as a user
  sees them: every iteration ends with its statistics on the host, which synchronizes the
  device.
- Placement: ``device`` cases pass the NumPy array (persisted on the workers' GPUs, as dmix does
  when the data take at most half of their memory); the ``stream`` case persists the blocks in
  the workers' host memory and fits with ``persist=False``, so every pass copies every block
  to the GPU (sub-batches through pinned buffers, copy overlapping compute).
- The E-step alone: one ``dmix.engine.loop.estep_pass`` in this process, on the same blocks
  (device-resident for ``device`` cases, copied from host memory for ``stream``), no Dask
  cluster and no M-step; the median of ``--repeats`` after a warm-up. ``GPU busy`` (stream
  case) is the device-resident E-step over the streamed iteration.
- GFLOP/s are ``pipelines/bench/run.py``'s nominal count of one EM iteration (``N K (2 D^2 +
  7 D)`` full, ``9 N K D`` diagonal) over the time; the relevant ceiling is the float32
  product rate (TF32 if ``CUPY_TF32=1`` is set, float64 for float64 compute).
- Check: the fit's lower bound at its final parameters (one more warm-started iteration on the
  cluster, whose lower bound is the mean log-likelihood of the parameters entering it) against
  ``score`` of a float64 CPU copy of the same estimator; relative error within 1e-5 in float32
  (1e-10 in float64). A failed check makes the command exit with status 1.
- scikit-learn: ``GaussianMixture`` from the same start, ``--sklearn-iter`` iterations at
  ``tol=0``, on all the machine's cores (its BLAS threads); seconds per iteration are the
  median time between the starts of consecutive E-steps (no initialisation in them).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bench"))

from run import machine, nominal_flops, write_report  # noqa: E402


class Case(NamedTuple):
    n: int
    d: int
    k: int
    covariance: str
    placement: str  # "device": persisted on the GPUs; "stream": copied from host every pass
    gpus: int


CASES = {
    "full64": Case(1_000_000, 64, 64, "full", "device", 1),
    "diag1024": Case(1_000_000, 128, 1024, "diag", "device", 1),
    "stream32": Case(10_000_000, 32, 32, "full", "stream", 1),
    "2gpus": Case(1_000_000, 64, 64, "full", "device", 2),
}
SMOKE_CASES = {
    "full64": Case(20_000, 8, 4, "full", "device", 1),
    "diag1024": Case(20_000, 16, 32, "diag", "device", 1),
    "stream32": Case(50_000, 8, 4, "full", "stream", 1),
    "2gpus": Case(20_000, 8, 4, "full", "device", 2),
}
#: Relative tolerance of the fit's lower bound against the float64 CPU evaluation.
LOWER_BOUND_RTOL = {"float32": 1e-5, "float64": 1e-10}
MATMUL_N = 8192


# -- ceilings ------------------------------------------------------------------------------


def _event_median(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` on the current stream, with CUDA events, after a warm-up."""
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def matmul_rate(n: int, dtype: str, repeats: int, check_rows: int = 128) -> dict:
    """GFLOP/s of an ``n^3`` product and its relative error on ``check_rows`` rows against
    float64 (computed on the GPU for float32; on the host for float64)."""
    import cupy

    a = cupy.random.standard_normal((n, n), dtype=dtype)
    b = cupy.random.standard_normal((n, n), dtype=dtype)
    out = cupy.empty((n, n), dtype)
    seconds = _event_median(lambda: cupy.matmul(a, b, out=out), repeats)
    out.fill(np.nan)  # poisoned: every element must be written
    cupy.matmul(a, b, out=out)
    written = bool(cupy.isfinite(out).all())
    if dtype == "float64":
        rows = 16  # 16 x n x n on the host: an independent reference
        got, ref = cupy.asnumpy(out[:rows]), cupy.asnumpy(a[:rows]) @ cupy.asnumpy(b)
    else:
        got = cupy.asnumpy(out[:check_rows]).astype(np.float64)
        ref = cupy.asnumpy(a[:check_rows].astype(np.float64) @ b.astype(np.float64))
    error = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"gflops": 2 * n**3 / seconds / 1e9, "rel_error": error, "all_written": written}


def copy_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    import cupy

    a = cupy.random.random(nbytes // 4, dtype=np.float32)
    b = cupy.full_like(a, np.nan)
    seconds = _event_median(lambda: cupy.copyto(b, a), repeats)
    return {"gbs": 2 * nbytes / seconds / 1e9, "correct": bool((a == b).all())}


def h2d_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of a host-to-device copy from pinned memory (bytes copied)."""
    import cupy

    count = nbytes // 4
    host = np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), np.float32, count)
    np.random.default_rng().random(dtype=np.float32, out=host)
    dev = cupy.full(count, np.nan, np.float32)
    stream = cupy.cuda.get_current_stream()
    seconds = _event_median(lambda: dev.set(host, stream=stream), repeats)
    return {"gbs": nbytes / seconds / 1e9,
            "correct": bool(np.array_equal(cupy.asnumpy(dev[::4096]), host[::4096]))}


def stage_rate(rows: int, d: int, repeats: int) -> float:
    """GB/s (float64 bytes read) of the float64 -> float32 copy into a pinned buffer that
    dmix's host-to-device streaming does on one helper thread per block."""
    import cupy

    src = np.random.default_rng().standard_normal((rows, d))
    mem = cupy.cuda.alloc_pinned_memory(rows * d * 4)
    dst = np.frombuffer(mem, np.float32, rows * d).reshape(rows, d)
    np.copyto(dst, src, casting="same_kind")  # warm-up: pages touched
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        np.copyto(dst, src, casting="same_kind")
        times.append(time.perf_counter() - tic)
    return src.nbytes / statistics.median(times) / 1e9


def _float32_in_subprocess(tf32: bool, repeats: int) -> dict:
    """The float32 product rate in a fresh process with ``CUPY_TF32`` set as asked."""
    done = subprocess.run(
        [sys.executable, __file__, "--float32-child", str(repeats)], capture_output=True,
        text=True, env={**os.environ, "CUPY_TF32": "1" if tf32 else "0"}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ceilings(repeats: int) -> dict:
    """The device's and the streaming path's rates, measured now (see the module docstring)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    fp32 = _float32_in_subprocess(False, repeats)
    tf32 = _float32_in_subprocess(True, repeats)
    return {
        "gpu": name, "n_gpus": cupy.cuda.runtime.getDeviceCount(),
        "gpu_memory_gb": props["totalGlobalMem"] / 1e9, "sms": props["multiProcessorCount"],
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__,
        "fp32": fp32, "tf32": tf32, "fp64": matmul_rate(MATMUL_N, "float64", repeats),
        # TF32 rounds products to 10 bits: errors near 3e-4 against about 1e-6 in float32.
        "tf32_in_effect": tf32["rel_error"] > 10 * fp32["rel_error"],
        "copy": copy_bandwidth(2**30, repeats), "h2d_pinned": h2d_bandwidth(2**30, repeats),
        "stage_f64_to_f32_gbs": stage_rate(2**20, 32, repeats),
    }


def relevant_ceiling(ceil: dict | None, dtype: str) -> tuple[str, float | None]:
    """(name, GFLOP/s) of the product rate that bounds an E-step computed in ``dtype``."""
    if dtype == "float64":
        name = "fp64"
    else:  # CuPy uses TF32 for float32 products only when CUPY_TF32 is set, as it reads it
        name = "tf32" if int(os.environ.get("CUPY_TF32", "0") or 0) > 0 else "fp32"
    return name, ceil[name]["gflops"] if ceil else None


# -- the cases -----------------------------------------------------------------------------


def make_data(n: int, d: int, k: int, seed: int):
    """Rows of a mixture of unit-covariance components, and its means (every fit's start)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0, size=(k, d))
    x = rng.standard_normal((n, d))
    x += means[rng.integers(0, k, n)]
    return x, means


def start(means, covariance: str) -> dict:
    """The initial parameters, as both estimators take them."""
    k, d = means.shape
    prec = np.tile(np.eye(d), (k, 1, 1)) if covariance == "full" else np.ones((k, d))
    return {"weights_init": np.full(k, 1.0 / k), "means_init": means, "precisions_init": prec}


def _device_options(device: str, dtype: str | None) -> dict:
    # Only what differs from dmix's defaults is named: the options are the user's.
    return {**({} if device == "cpu" else {"device": device}),
            **({} if dtype is None else {"dtype": dtype})}


def _cluster(device: str, gpus: int):
    from distributed import Client, LocalCluster

    if device == "cuda":
        from dask_cuda import LocalCUDACluster

        # The first ``gpus`` of the visible GPUs: the workers' variable replaces this one's.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(gpus)))
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=visible.split(",")[:gpus],
                                   dashboard_address=None)
    else:  # --smoke: two single-threaded CPU workers stand in for the GPUs
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    return cluster, Client(cluster)


def fit_seconds(gm, data) -> list[float]:
    """Seconds of every iteration of ``gm.fit(data)``, from ``dmix.engine.History``."""
    from dmix.engine import History

    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning (tol=0), large-graph warnings
        gm.fit(data, monitor=history)
    return [r.seconds for r in history.records]


def lower_bound_check(gm, data, x) -> dict:
    """The fit's lower bound at its parameters against a float64 CPU evaluation of them."""
    import dask

    ref_gm = copy.copy(gm)
    ref_gm.set_params(client=None)
    if getattr(gm, "device", "cpu") != "cpu" or gm._compute.dtype != "float64":
        ref_gm.set_params(device="cpu", dtype="float64")
    with dask.config.set(scheduler="threads"):  # here, not on the cluster
        ref = ref_gm.score(x)
    gm.set_params(warm_start=True, max_iter=1)  # one iteration from the fitted parameters
    fit_seconds(gm, data)
    got, dtype = gm.lower_bound_, gm._compute.dtype
    error = abs(got - ref) / abs(ref)
    return {"lower_bound": got, "lower_bound_ref": ref, "lower_bound_rel_error": error,
            "lower_bound_ok": bool(error <= LOWER_BOUND_RTOL[dtype])}


def estep_seconds(x, chunks, gm, repeats: int, resident: bool) -> float:
    """Median seconds of one ``estep_pass`` over ``x`` in this process (no cluster)."""
    import dask
    import dask.array as da

    from dmix.engine.loop import estep_pass
    from dmix.xp import to_device

    compute = gm._compute
    data = da.from_array(x, chunks=chunks, name=False)  # no hashing of the whole array
    if resident and compute.device == "cuda":
        data = data.map_blocks(to_device, compute, dtype=np.dtype(compute.dtype),
                               meta=np.empty((0, 0), compute.dtype))
        data = data.persist(scheduler="sync")
    family, params = gm._family, gm._params
    times = []
    with dask.config.set(scheduler="sync"):
        for _ in range(repeats + 1):  # the first is a warm-up
            tic = time.perf_counter()
            estep_pass(family, data, params, compute=compute)
            times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def sklearn_seconds(x, means, covariance: str, n_iter: int) -> tuple[float, int]:
    """scikit-learn's median seconds per iteration (between the starts of consecutive
    E-steps: its final E-step closes the last one) and its BLAS threads."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_info

    class Timed(GaussianMixture):
        def _e_step(self, X, *args, **kwargs):
            self.e_step_starts.append(time.perf_counter())
            return super()._e_step(X, *args, **kwargs)

    gm = Timed(len(means), covariance_type=covariance, max_iter=n_iter, tol=0,
               **start(means, covariance))
    gm.e_step_starts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0
        gm.fit(x)
    threads = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"),
                  default=1)
    return statistics.median(np.diff(gm.e_step_starts)), threads


def run_case(name: str, case: Case, args, ceil: dict | None) -> dict:
    import dmix
    from dmix.engine.reduce import block_bytes_for, worker_slots
    from dmix.io.source import as_source

    n, d, k, covariance, placement, gpus = case
    x, means = make_data(n, d, k, seed=sum(map(ord, name)))
    row = {"case": name, **case._asdict(), "device": args.device}
    cluster, client = _cluster(args.device, gpus)
    with cluster, client:
        row["workers"] = len(client.scheduler_info()["workers"])
        # The blocks dmix would cut (the same call as GaussianMixture.fit makes).
        blocks = as_source(x, chunk_size=args.chunk_size, block_bytes=block_bytes_for(client),
                           slots=worker_slots(client)).array
        if placement == "stream":  # in the workers' host memory, copied to the GPU every pass
            from dmix.engine.reduce import _persist_evenly

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the large graph is sent once
                data = _persist_evenly(blocks, client)
        else:
            data = x
        gm = dmix.GaussianMixture(
            k, covariance_type=covariance, max_iter=args.n_iter + 1, tol=0, client=client,
            chunk_size=args.chunk_size, persist=False if placement == "stream" else "auto",
            **start(means, covariance), **_device_options(args.device, args.dtype))
        row["fit_s_all"] = fit_seconds(gm, data)
        row["dtype"] = gm._compute.dtype
        row.update(lower_bound_check(gm, data, x))
    row.update(blocks=blocks.numblocks[0], fit_s=statistics.median(row["fit_s_all"][1:]))
    flops = nominal_flops(n, d, k, covariance)
    row["gflops"] = flops / row["fit_s"] / 1e9
    row["ceiling"], peak = relevant_ceiling(ceil, row["dtype"])
    if gpus == 1:  # the kernels alone are the same on more GPUs
        row["estep_s"] = estep_seconds(x, blocks.chunks, gm, args.repeats,
                                       resident=placement == "device")
        row["estep_gflops"] = flops / row["estep_s"] / 1e9
    if placement == "stream":
        # Bytes sent to the compute device per second (on --smoke, only the data rate).
        row["stream_gbs"] = n * d * np.dtype(row["dtype"]).itemsize / row["fit_s"] / 1e9
        row["gpu_busy"] = estep_seconds(x, blocks.chunks, gm, args.repeats, True) / row["fit_s"]
        if ceil:
            row["h2d_fraction"] = row["stream_gbs"] / ceil["h2d_pinned"]["gbs"]
    if peak:
        row["fraction_of_ceiling"] = row["gflops"] / peak
        if "estep_gflops" in row:
            row["estep_fraction_of_ceiling"] = row["estep_gflops"] / peak
    if not args.skip_sklearn and gpus == 1:
        row["sklearn_s"], row["sklearn_threads"] = sklearn_seconds(x, means, covariance,
                                                                   args.sklearn_iter)
        row["speedup"] = row["sklearn_s"] / row["fit_s"]
    print(json.dumps(row), flush=True)
    return row


# -- report --------------------------------------------------------------------------------


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.0f}%" if key in row else "-"


def _num(row: dict, key: str, fmt: str = ".3g") -> str:
    return format(row[key], fmt) if key in row else "-"


def markdown(report: dict) -> str:
    """``gpu.md``: the ceilings, the timings and the checks."""
    lines = [f"Command: `{report['command']}`  ", f"Date: {report['date']}; CPU: "
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores.", ""]
    c = report.get("ceilings")
    if c:
        lines += [
            f"Ceilings on {c['gpu']} ({c['n_gpus']} visible, {c['gpu_memory_gb']:.0f} GB, CUDA "
            f"runtime {c['cuda_runtime']}, CuPy {c['cupy']}), medians of CUDA-event timings:",
            "", "| ceiling | rate | relative error vs float64 |", "|---|---|---|"]
        for key, label in (("fp32", "float32"), ("tf32", "TF32 (CUPY_TF32=1)"),
                           ("fp64", "float64")):
            lines.append(f"| {label} product {MATMUL_N}^3 | {c[key]['gflops']:,.0f} GFLOP/s "
                         f"| {c[key]['rel_error']:.1e} |")
        lines += [
            f"| device-to-device copy, 1 GiB (read + write) | {c['copy']['gbs']:,.0f} GB/s "
            "| - |",
            f"| host-to-device copy, 1 GiB pinned | {c['h2d_pinned']['gbs']:,.1f} GB/s | - |",
            f"| host float64 -> float32 staging copy, 1 thread "
            f"| {c['stage_f64_to_f32_gbs']:.1f} GB/s read | - |", ""]
        if not c["tf32_in_effect"]:
            lines += ["TF32 did not take effect (its error is not above float32's).", ""]
    lines += [
        "| case | N x D x K | covariance | data | GPUs | dtype | blocks | s/iter | GFLOP/s "
        "| of ceiling | E-step alone s | E-step of ceiling | streamed GB/s (of H2D) | GPU busy "
        "| scikit-learn s/iter (threads) | speed-up |", "|---" * 16 + "|"]
    for r in report["rows"]:
        stream = (f"{r['stream_gbs']:.3g} ({_pct(r, 'h2d_fraction')})" if "stream_gbs" in r
                  else "-")
        sk = f"{r['sklearn_s']:.3g} ({r['sklearn_threads']})" if "sklearn_s" in r else "-"
        of = (f"{_pct(r, 'fraction_of_ceiling')} {r['ceiling']}"
              if "fraction_of_ceiling" in r else "-")
        where = r["gpus"] if r["device"] == "cuda" else "CPU"
        lines.append(
            f"| {r['case']} | {r['n']:,} x {r['d']} x {r['k']} | {r['covariance']} "
            f"| {r['placement']} | {where} | {r['dtype']} | {r['blocks']} | {r['fit_s']:.4g} "
            f"| {r['gflops']:,.0f} | {of} | {_num(r, 'estep_s', '.4g')} "
            f"| {_pct(r, 'estep_fraction_of_ceiling')} | {stream} | {_pct(r, 'gpu_busy')} "
            f"| {sk} | {_num(r, 'speedup', '.1f')} |")
    lines += [f"\n2 GPUs: {r['speedup_vs_1gpu']:.2f} times the iterations per second of one."
              for r in report["rows"] if "speedup_vs_1gpu" in r]
    lines += ["", "Lower bound of the fit at its final parameters (on its device and dtype) "
              "against a float64 CPU evaluation of the same parameters:", "",
              "| case | fit | float64 CPU | relative error | within tolerance |",
              "|---" * 5 + "|"]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {r['lower_bound']:.10g} | {r['lower_bound_ref']:.10g} "
                     f"| {r['lower_bound_rel_error']:.1e} "
                     f"| {'yes' if r['lower_bound_ok'] else '**NO**'} |")
    lines += ["", *[f"Note: {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "bench")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, of: %(default)s")
    parser.add_argument("--repeats", type=int, default=5, help="timed E-step passes per case")
    parser.add_argument("--n-iter", type=int, default=5,
                        help="timed EM iterations per fit (after one untimed)")
    parser.add_argument("--sklearn-iter", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, help="rows per block (default: dmix's)")
    parser.add_argument("--dtype", choices=["float32", "float64"],
                        help="dmix's compute dtype (default: dmix's, float32 on GPUs)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--float32-child", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.float32_child:
        print(json.dumps(matmul_rate(MATMUL_N, "float32", args.float32_child)))
        return 0
    names = [s for s in args.cases.split(",") if s]
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {list(CASES)}")
    args.device = "cpu" if args.smoke else "cuda"
    report = {"command": " ".join(["python pipelines/bench_gpu.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
              "machine": machine(), "notes": [], "rows": []}

    def note(text: str) -> None:
        report["notes"].append(text)
        print("note:", text, flush=True)

    ceil = None
    if args.smoke:
        note(f"--smoke: tiny shapes on two CPU workers in {args.dtype or 'float64'}; no GPU "
             "ceilings (CuPy is not used); the times mean nothing.")
    else:
        ceil = report["ceilings"] = ceilings(max(5, args.repeats))
        print(json.dumps(ceil), flush=True)
    for name in names:
        case = (SMOKE_CASES if args.smoke else CASES)[name]
        have = 1 if args.smoke else ceil["n_gpus"]  # --smoke: the CPU stands in for one GPU
        if case.gpus > have:
            note(f"{name} skipped: it needs {case.gpus} GPUs, and "
                 + ("--smoke runs on the CPU." if args.smoke else f"{have} is visible."))
            continue
        report["rows"].append(run_case(name, case, args, ceil))
    rows = {r["case"]: r for r in report["rows"]}
    if "2gpus" in rows and "full64" in rows:
        rows["2gpus"]["speedup_vs_1gpu"] = rows["full64"]["fit_s"] / rows["2gpus"]["fit_s"]
    failed = [r["case"] for r in report["rows"] if not r["lower_bound_ok"]]
    if ceil:
        failed += [k for k in ("fp32", "tf32", "fp64") if not ceil[k]["all_written"]
                   or not math.isfinite(ceil[k]["rel_error"])]
        failed += [k for k in ("copy", "h2d_pinned") if not ceil[k]["correct"]]
    if failed:
        note(f"checks FAILED: {', '.join(failed)}")
    write_report(args.out, "gpu", report, markdown(report), draw=lambda path: None)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
