"""This machine's compute and memory ceilings, measured now, as one JSON object on stdout.

Usage (inside the benchmark venv, see ``env.py``)::

    python pipelines/bench/ceilings.py [--quick]

Every number is the median of ``runs`` timed repetitions (5; 3 with ``--quick``) after one
untimed warm-up, with every core of this process's CPU set in use (``threads``: NumPy's BLAS
through threadpoolctl, torch through ``set_num_threads``), unless a figure says "1 thread".

- ``float64_gflops``, ``float32_gflops``: GFLOP/s of an ``n x n`` by ``n x n`` product into a
  preallocated output (``n`` = 4096; 1024 quick) through NumPy (its OpenBLAS) and torch (its
  BLAS), 2 n^3 flops each, and the best of the two libraries.
- ``tall_skinny_float64_gflops``: GFLOP/s of the EM-shaped float64 products with
  X of (1e6, 32) (2e5 quick) and W of (32, 32): ``X @ W`` (as in an E-step) and ``X.T @ X``
  (as in an M-step), each counted as 2 n 32^2 flops (NumPy may use a symmetric rank-k update
  for ``X.T @ X``, doing half of them), through NumPy and torch, and the best.
- ``copy_GBps``: memory bandwidth of copying a 512 MiB float64 array (64 MiB quick) into
  another, already touched one, counting read + write bytes (2 x the array's bytes; the
  write-allocate read, where the CPU does one, is not counted): NumPy's ``copyto`` (1 thread)
  and torch's ``copy_`` (all threads), and the best.
- ``exp_log_Gelem_per_s``: float64 ``exp`` and ``log`` rates in 1e9 elements per second on
  cache-resident blocks of 32768 elements (256 KiB in, 256 KiB out, so it is compute and not
  memory that is measured), written into a preallocated output, on 1 thread and on all threads:
  NumPy (all threads: one Python thread per core, each on its own block, NumPy releasing the
  GIL inside the ufunc) and torch (all threads: one call over one block per thread, which torch
  splits among its threads). Inputs are in [-10, 0] for exp and [0.1, 10] for log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

THREADS = len(os.sched_getaffinity(0))
BLOCK = 32768  # elements per exp/log block: 256 KiB of float64
GB = 1e9


def _median_s(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _with_best(rates: dict) -> dict:
    return {**rates, "best": max(rates.values())}


def matmul_square(n: int, dtype: str, runs: int) -> dict:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    c = np.empty((n, n), dtype)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
    flops = 2.0 * n**3
    return {"n": n, **_with_best({
        "numpy": flops / _median_s(lambda: np.matmul(a, b, out=c), runs) / GB,
        "torch": flops / _median_s(lambda: torch.matmul(ta, tb, out=tc), runs) / GB,
    })}


def matmul_tall_skinny(n: int, runs: int, d: int = 32) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, d))
    xw = np.empty((n, d))
    gram = np.empty((d, d))
    tx, tw, txw, tgram = map(torch.from_numpy, (x, w, xw, gram))
    flops = 2.0 * n * d * d
    numpy = {
        "X@W": flops / _median_s(lambda: np.matmul(x, w, out=xw), runs) / GB,
        "X.T@X": flops / _median_s(lambda: np.matmul(x.T, x, out=gram), runs) / GB,
    }
    torch_ = {
        "X@W": flops / _median_s(lambda: torch.matmul(tx, tw, out=txw), runs) / GB,
        "X.T@X": flops / _median_s(lambda: torch.matmul(tx.T, tx, out=tgram), runs) / GB,
    }
    return {
        "shape": f"X ({n}, {d}), W ({d}, {d})",
        "numpy": numpy,
        "torch": torch_,
        "best": {op: max(numpy[op], torch_[op]) for op in numpy},
    }


def copy_bandwidth(nbytes: int, runs: int) -> dict:
    src = np.random.default_rng(0).standard_normal(nbytes // 8)
    dst = np.zeros_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    moved = 2.0 * src.nbytes
    return {
        "convention": "(read + write bytes) / s = 2 x array bytes / s; write-allocate "
                      "traffic not counted",
        "array_bytes": src.nbytes,
        **_with_best({
            "numpy_1_thread": moved / _median_s(lambda: np.copyto(dst, src), runs) / GB,
            "torch_all_threads": moved / _median_s(lambda: tdst.copy_(tsrc), runs) / GB,
        }),
    }


def _ufunc_rates(name: str, low: float, high: float, repeats: int, runs: int) -> dict:
    src = np.random.default_rng(0).uniform(low, high, size=(THREADS, BLOCK))
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    np_fn, torch_fn = getattr(np, name), getattr(torch, name)

    def numpy_block(i):
        for _ in range(repeats):
            np_fn(src[i], out=dst[i])

    def torch_blocks(rows):
        for _ in range(repeats):
            torch_fn(tsrc[:rows], out=tdst[:rows])

    with ThreadPoolExecutor(THREADS) as pool:
        def numpy_all():
            list(pool.map(numpy_block, range(THREADS)))

        numpy_1 = _median_s(lambda: numpy_block(0), runs)
        numpy_n = _median_s(numpy_all, runs)
    torch.set_num_threads(1)
    torch_1 = _median_s(lambda: torch_blocks(1), runs)
    torch.set_num_threads(THREADS)
    torch_n = _median_s(lambda: torch_blocks(THREADS), runs)
    one, every = BLOCK * repeats / GB, THREADS * BLOCK * repeats / GB
    return {
        "numpy": {"1_thread": one / numpy_1, "all_threads": every / numpy_n},
        "torch": {"1_thread": one / torch_1, "all_threads": every / torch_n},
    }


def exp_log(repeats: int, runs: int) -> dict:
    return {
        "dtype": "float64",
        "block_elements": BLOCK,
        "exp": _ufunc_rates("exp", -10.0, 0.0, repeats, runs),
        "log": _ufunc_rates("log", 0.1, 10.0, repeats, runs),
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 3 runs: a smoke test")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else 5
    square = 1024 if args.quick else 4096
    torch.set_num_threads(THREADS)
    with threadpool_limits(THREADS):
        result = {
            "cpu": _cpu_model(),
            "threads": THREADS,
            "quick": args.quick,
            "runs": runs,
            "numpy": np.__version__,
            "torch": torch.__version__,
            "numpy_blas": [f"{p['internal_api']} {p['version']} ({p['prefix']}), "
                           f"{p['num_threads']} threads"
                           for p in threadpool_info() if p["user_api"] == "blas"],
            "float64_gflops": matmul_square(square, "float64", runs),
            "float32_gflops": matmul_square(square, "float32", runs),
            "tall_skinny_float64_gflops": matmul_tall_skinny(
                200_000 if args.quick else 1_000_000, runs),
            "copy_GBps": copy_bandwidth((64 if args.quick else 512) * 2**20, runs),
            "exp_log_Gelem_per_s": exp_log(50 if args.quick else 300, runs),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
