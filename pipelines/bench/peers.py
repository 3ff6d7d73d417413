"""Seconds per EM iteration of one peer library's Gaussian mixture, on given data and start.

Usage (inside the benchmark venv, see ``env.py``)::

    python pipelines/bench/peers.py --peer {sklearn,pomegranate,pycave,spark} --data DIR \
        --covariance {full,diag} --n-iter N [--n-a 1]

``DIR`` holds ``X.npy`` (float64, (n, d)) and ``init.npz`` (``weights`` (k,), ``means`` (k, d),
``covariances_full`` (k, d, d), ``covariances_diag`` (k, d)). Peers:

- ``sklearn``: ``sklearn.mixture.GaussianMixture``, float64, started from the given weights,
  means and precisions (inverse covariances), so it skips its k-means initialisation.
- ``pomegranate``: ``GeneralMixtureModel`` of ``Normal`` components built from the given
  parameters (float64 tensors), data handed over as a torch tensor.
- ``pycave``: ``pycave.bayes.GaussianMixture`` in float32 (its model's buffers are float32).
  Its ``fit`` only accepts initial means and derives weights and covariances from them in an
  extra pass, so the script builds pycave's own ``GaussianMixtureModel`` from the given
  parameters and runs pycave's own EM module (``GaussianMixtureLightningModule``) with the
  estimator's trainer: the EM part of ``GaussianMixture.fit``, without its initialisation.
- ``spark``: Spark ML ``GaussianMixture`` on ``local[<cores>]``, full covariance only (Spark ML
  has no other). It has no way to set an initial model: it initialises itself with a fixed seed.

Every peer runs a fixed number of EM iterations with convergence checking off (tolerance 0, or
-inf where the library stops on ``improvement < tol``). Timing, in one process: a warm-up fit of
``n_a`` iterations (JIT compilation, first touches; its time is ``setup_s.warmup_fit``), then a
fit of ``n_a`` iterations (``fit_a_s``) and one of ``n_b = n_a + N`` (``fit_b_s``), each from
the same initial parameters; ``s_per_iter = (fit_b_s - fit_a_s) / (n_b - n_a)`` cancels
everything a fit does once (validation, initialisation, trainer or Spark job setup, a final
E-step). ``n_a`` and ``n_b`` in the output are the iterations actually run: only Spark can stop
early (its tolerance cannot be negative and it stops when the log-likelihood does not change at
all), and a note then says so. One-off costs outside the fits are in ``setup_s``: loading
``X.npy``, numpy to torch conversion, JVM and Spark session start, writing the Parquet file
Spark reads and building, caching and counting its DataFrame.

``lower_bound`` is the mean log-likelihood per sample that the library computed in the last
E-step of the longer fit (i.e. under the parameters before the final M-step), as scikit-learn's
``lower_bound_`` is. All libraries use every core (``threads``). ``other_cpu_s`` holds the CPU
seconds that other processes used during each timed fit (the machine's busy time from
``/proc/stat`` less this process tree's), so a disturbed measurement shows; a note says so when
they exceed 5% of the CPU time available during the fit. The last line of stdout is one
JSON object; anything the libraries print goes to stderr. Exit status 1 on failure, 2 on a
request a peer cannot do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psutil

THREADS = len(os.sched_getaffinity(0))
# A note flags a timed fit during which other processes used more than this share of the CPUs.
OTHER_CPU_WARN = 0.05
SPARK_SEED = 0
SPARK_DRIVER_MEMORY = "8g"
# Floor for pomegranate's diagonal variances, the value of scikit-learn's reg_covar.
POMEGRANATE_MIN_COV = 1e-6


@dataclass
class Peer:
    version: str
    dtype: str
    # fit(n): at most n EM iterations from the start; returns (lower bound, iterations run)
    fit: Callable[[int], tuple[float, int]]
    init_from_given: bool


class Refused(Exception):
    """A request the peer cannot do (exit status 2)."""


def _timed(fn, *args):
    tic = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - tic, value


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process tree)."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - machine.iowait - machine.guest - machine.guest_nice
    me = psutil.Process()
    t = me.cpu_times()
    own = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = child.cpu_times()
            own += t.user + t.system
    return busy, own


def _timed_fit(fit, n_iter: int) -> tuple[float, float, int, float]:
    """Wall seconds, lower bound, iterations run and CPU seconds other processes used meanwhile,
    of ``fit(n_iter)``."""
    busy0, own0 = _cpu_seconds()
    seconds, (bound, done) = _timed(fit, n_iter)
    busy1, own1 = _cpu_seconds()
    return seconds, bound, done, max(0.0, (busy1 - busy0) - (own1 - own0))


def _sklearn(x, init, cov, setup, notes, stack) -> Peer:
    import sklearn
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_info, threadpool_limits

    stack.enter_context(threadpool_limits(THREADS))
    notes.append("thread pools: " + "; ".join(
        f"{p['internal_api']} {p['version']} ({p['prefix']}), {p['num_threads']} threads"
        for p in threadpool_info()
    ))
    covariances = init[f"covariances_{cov}"]
    precisions = np.linalg.inv(covariances) if cov == "full" else 1.0 / covariances

    def fit(n_iter):
        gm = GaussianMixture(
            len(init["weights"]), covariance_type=cov, tol=0.0, max_iter=n_iter,
            weights_init=init["weights"], means_init=init["means"], precisions_init=precisions,
        )
        gm.fit(x)
        return float(gm.lower_bound_), gm.n_iter_

    return Peer(sklearn.__version__, str(x.dtype), fit, True)


def _pomegranate(x, init, cov, setup, notes, stack) -> Peer:
    import torch
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    torch.set_num_threads(THREADS)
    setup["to_tensor"], xt = _timed(torch.from_numpy, x)
    clamped = {"values": 0}

    class ClampedNormal(Normal):
        """pomegranate 1.1.2's Normal takes ``min_cov`` but never applies it; a diagonal
        variance that comes out of an M-step below 0 makes ``_reset_cache`` raise "Variances
        must be positive". Clamp the variances at ``min_cov`` just before that check."""

        def _reset_cache(self):
            if self._initialized:
                low = self.covs < self.min_cov
                if low.any():
                    clamped["values"] += int(low.sum())
                    with torch.no_grad():
                        self.covs.clamp_(min=self.min_cov)
            super()._reset_cache()

    class RecordingMixture(GeneralMixtureModel):
        """Keeps the log-likelihood of the last E-step and counts E-steps (``fit`` returns
        neither)."""

        def summarize(self, X, sample_weight=None, priors=None):
            logp = super().summarize(X, sample_weight=sample_weight, priors=priors)
            self.n_estep = getattr(self, "n_estep", 0) + 1
            self.last_logp = float(logp)
            return logp

    def build(n_iter):
        components = [
            ClampedNormal(init["means"][j].copy(), init["covariances_diag"][j].copy(), "diag",
                          min_cov=POMEGRANATE_MIN_COV)
            if cov == "diag" else
            Normal(init["means"][j].copy(), init["covariances_full"][j].copy(), "full")
            for j in range(len(init["weights"]))
        ]
        # fit() stops when improvement < tol: tol=0 would stop on a rounding-level decrease.
        return RecordingMixture(components, priors=init["weights"].copy(), max_iter=n_iter,
                                tol=-np.inf)

    def fit(n_iter):
        clamped["values"] = 0
        gmm = build(n_iter).fit(xt)
        if clamped["values"]:
            notes.append(f"a {n_iter}-iteration fit clamped {clamped['values']} variances")
        return gmm.last_logp / len(xt), gmm.n_estep

    gmm = build(1)
    component_dtype = str(gmm.distributions[0].means.dtype).removeprefix("torch.")
    emission_dtype = str(gmm.dtype).removeprefix("torch.")
    dtype = component_dtype
    if emission_dtype != component_dtype:
        dtype = f"{component_dtype}, log-densities stored as {emission_dtype}"
        notes.append(
            f"pomegranate computes each component's log-density in the parameters' dtype "
            f"({component_dtype}) but writes them into an emission matrix of "
            f"GeneralMixtureModel.dtype ({emission_dtype}: the dtype of its first parameter, a "
            f"float32 device placeholder); responsibilities and statistics are then "
            f"{component_dtype} again. Its own k-means initialisation would instead create "
            f"float32 parameters and cast X to float32."
        )
    notes.append("tol=-inf (pomegranate stops when improvement < tol)")
    if cov == "diag":
        notes.append(
            f"diag: a Normal subclass clamps variances at min_cov={POMEGRANATE_MIN_COV} before "
            "pomegranate's positivity check (1.1.2 accepts min_cov but never applies it, and "
            "diag fits at D=64 have been seen to stop with 'Variances must be positive'); no "
            "variance was clamped unless another note says how many"
        )
    return Peer(version("pomegranate"), dtype, fit, True)


def _pycave(x, init, cov, setup, notes, stack) -> Peer:
    import torch
    from lightkit.data import DataLoader, collate_tensor, dataset_from_tensors
    from pycave.bayes import GaussianMixture
    from pycave.bayes.core import cholesky_precision
    from pycave.bayes.gmm import GaussianMixtureModel, GaussianMixtureModelConfig
    from pycave.bayes.gmm.lightning_module import GaussianMixtureLightningModule

    torch.set_num_threads(THREADS)
    setup["to_tensor_float32"], xt = _timed(
        lambda: torch.from_numpy(x).to(torch.float32).contiguous())
    k, d = init["means"].shape
    estimator = GaussianMixture(
        k, covariance_type=cov, convergence_tolerance=0.0,
        trainer_params={"enable_progress_bar": False, "enable_model_summary": False},
    )
    precisions_cholesky = cholesky_precision(
        torch.as_tensor(init[f"covariances_{cov}"], dtype=torch.float32), cov)

    def fit(n_iter):
        model = GaussianMixtureModel(GaussianMixtureModelConfig(k, d, cov))
        model.component_probs.copy_(torch.as_tensor(init["weights"]))
        model.means.copy_(torch.as_tensor(init["means"]))
        model.precisions_cholesky.copy_(precisions_cholesky)
        # From here on as in GaussianMixture.fit (pycave 3.2.1), batch_size=None: one batch.
        loader = DataLoader(dataset_from_tensors(xt), batch_size=len(xt),
                            collate_fn=collate_tensor)
        is_batch_training = estimator._num_batches_per_epoch(loader) == 1
        module = GaussianMixtureLightningModule(
            model, convergence_tolerance=0.0,
            covariance_regularization=estimator.covariance_regularization,
            is_batch_training=is_batch_training,
        )
        trainer = estimator.trainer(max_epochs=n_iter * (1 + int(is_batch_training)))
        trainer.fit(module, loader)
        done = module.current_epoch // (1 + int(is_batch_training))
        return -float(trainer.callback_metrics["nll"]), done

    notes += [
        "float32: pycave's model buffers are float32; X converted once (setup_s)",
        ("EM started from the given parameters by loading them into pycave's "
         "GaussianMixtureModel and running pycave's GaussianMixtureLightningModule with the "
         "estimator's trainer (GaussianMixture.fit only takes init_means and re-estimates "
         "weights and covariances from them)"),
        ("pycave 3.2.1 with the data in one batch (batch_size=None, the default) sets "
         "is_batch_training=True and runs each EM iteration as two epochs, each a pass over "
         "the data computing log-densities; kept as shipped"),
        "convergence_tolerance=0: no EarlyStopping callback",
        "covariance_regularization=1e-6 (pycave's default, added to the diagonal)",
    ]
    return Peer(version("pycave"), "float32", fit, True)


def _spark(x, init, cov, setup, notes, stack) -> Peer:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.clustering import GaussianMixture
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import SparkSession

    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # else the driver binds to a public interface
    tic = time.perf_counter()
    spark = (
        SparkSession.builder.master(f"local[{THREADS}]")
        .appName("dmix-bench-peer")
        .config("spark.driver.memory", SPARK_DRIVER_MEMORY)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(2 * THREADS))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    stack.callback(spark.stop)
    setup["jvm_session_start"] = time.perf_counter() - tic

    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dmix-bench-spark-")))
    columns = [f"x{j}" for j in range(x.shape[1])]
    setup["parquet_write"], _ = _timed(
        pq.write_table, pa.table({c: x[:, j] for j, c in enumerate(columns)}),
        path / "X.parquet")

    def load():
        df = VectorAssembler(inputCols=columns, outputCol="features").transform(
            spark.read.parquet(str(path / "X.parquet")))
        df = df.select("features").repartition(2 * THREADS).cache()
        return df, df.count()

    setup["dataframe_load_cache_count"], (df, n_rows) = _timed(load)
    k = len(init["weights"])
    # Spark's E-step sums EPSILON + weight * pdf(x) over the components in linear space: where
    # every density is negligible next to EPSILON, the log-likelihood per point is
    # log(k * EPSILON) whatever the parameters.
    degenerate_bound = math.log(k * np.finfo(np.float64).eps)
    degenerate = {"seen": False}

    def fit(n_iter):
        max_iter = min(n_iter, 2) if degenerate["seen"] else n_iter
        model = GaussianMixture(k=k, maxIter=max_iter, tol=0.0, seed=SPARK_SEED).fit(df)
        bound = model.summary.logLikelihood / n_rows
        if abs(bound - degenerate_bound) < 1e-9 and not degenerate["seen"]:
            degenerate["seen"] = True
            notes.append(
                f"degenerate fit: the log-likelihood per point is log(k * EPSILON) = "
                f"{degenerate_bound:.4f}, i.e. every point's densities are negligible next to "
                f"the EPSILON (2.2e-16) that Spark's E-step adds to each weighted density in "
                f"linear space (densities of order exp(-100) are usual at D=64): "
                f"responsibilities are uniform and the log-likelihood stays constant, so tol=0 "
                f"stops the loop after 2 iterations, or, when rounding makes two sums differ, "
                f"lets it go on (one such run here hung in LAPACK dsyev on the next "
                f"covariances). Later fits are therefore capped at 2 iterations. Each "
                f"iteration still does the full work (densities and statistics of every point "
                f"and component), but the fitted model is meaningless")
        return bound, model.summary.numIter

    blas = spark.sparkContext._jvm.dev.ludovic.netlib.blas.BLAS.getInstance()
    notes += [
        (f"not started from the given parameters: Spark ML GaussianMixture has no "
         f"initial-model parameter; it initialises from a random sample of the data with "
         f"seed={SPARK_SEED} (pyspark.mllib's GaussianMixture.train takes initialModel, but is "
         f"the older RDD-based implementation)"),
        (f"local[{THREADS}], spark.driver.memory={SPARK_DRIVER_MEMORY}; data written to "
         f"Parquet with pyarrow, read, assembled into a vector column, repartitioned into "
         f"{2 * THREADS} partitions, cached and counted before timing (setup_s)"),
        f"JVM BLAS: {blas.getClass().getName()}",
        "tol=0.0; Spark's loop stops early only if the log-likelihood does not change at all",
    ]
    return Peer(f"pyspark {version('pyspark')}, Spark {spark.version}", "float64", fit, False)


PEERS = {"sklearn": _sklearn, "pomegranate": _pomegranate, "pycave": _pycave, "spark": _spark}


def _load(data: Path, setup: dict) -> tuple[np.ndarray, dict]:
    setup["load_npy"], x = _timed(np.load, data / "X.npy")
    with np.load(data / "init.npz") as f:
        init = {name: f[name] for name in
                ("weights", "means", "covariances_full", "covariances_diag")}
    d = x.shape[1]
    k = len(init["weights"])
    expected = {"means": (k, d), "covariances_full": (k, d, d), "covariances_diag": (k, d)}
    for name, shape in expected.items():
        if init[name].shape != shape:
            raise ValueError(f"init.npz: {name} has shape {init[name].shape}, expected {shape}")
    if x.dtype != np.float64:
        raise ValueError(f"X.npy: dtype {x.dtype}, expected float64")
    return np.ascontiguousarray(x), init


def run(peer: str, data: Path, cov: str, n_iter: int, n_a: int) -> dict:
    if peer == "spark" and cov != "full":
        raise Refused("Spark ML GaussianMixture has full covariance only; no diag run")
    setup: dict[str, float] = {}
    notes: list[str] = []
    x, init = _load(data, setup)
    n_b = n_a + n_iter
    with contextlib.ExitStack() as stack:
        lib = PEERS[peer](x, init, cov, setup, notes, stack)
        setup["warmup_fit"], _ = _timed(lib.fit, n_a)
        fit_a, _, done_a, other_a = _timed_fit(lib.fit, n_a)
        fit_b, lower_bound, done_b, other_b = _timed_fit(lib.fit, n_b)
    if done_b <= done_a:
        raise RuntimeError(f"the fits ran {done_a} and {done_b} EM iterations (asked: {n_a} "
                           f"and {n_b}): no iteration to time between them")
    if (done_a, done_b) != (n_a, n_b):
        notes.append(f"stopped early: the fits ran {done_a} and {done_b} EM iterations instead "
                     f"of {n_a} and {n_b}; s_per_iter is over the {done_b - done_a} between")
    for name, other, wall in (("fit_a", other_a, fit_a), ("fit_b", other_b, fit_b)):
        if other > OTHER_CPU_WARN * THREADS * wall:
            notes.append(f"disturbed: other processes used {other / (THREADS * wall):.0%} of "
                         f"the machine's CPU time during {name}")
    return {
        "peer": peer,
        "version": lib.version,
        "covariance": cov,
        "n": int(x.shape[0]),
        "d": int(x.shape[1]),
        "k": len(init["weights"]),
        "dtype": lib.dtype,
        "s_per_iter": (fit_b - fit_a) / (done_b - done_a),
        "fit_a_s": fit_a,
        "fit_b_s": fit_b,
        "n_a": done_a,
        "n_b": done_b,
        "setup_s": setup,
        "lower_bound": lower_bound,
        "init_from_given": lib.init_from_given,
        "threads": THREADS,
        "other_cpu_s": {"fit_a": other_a, "fit_b": other_b},
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", required=True, choices=sorted(PEERS))
    parser.add_argument("--data", required=True, type=Path,
                        help="directory with X.npy and init.npz")
    parser.add_argument("--covariance", required=True, choices=["full", "diag"])
    parser.add_argument("--n-iter", required=True, type=int,
                        help="N: the longer fit runs n_a + N iterations")
    parser.add_argument("--n-a", type=int, default=1, help="iterations of the shorter fit")
    args = parser.parse_args(argv)
    if args.n_iter < 1 or args.n_a < 1:
        parser.error("--n-iter and --n-a must be at least 1")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args.peer, args.data, args.covariance, args.n_iter, args.n_a)
    except Refused as e:
        print(f"peers.py: {args.peer}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        traceback.print_exc()
        print(f"peers.py: {args.peer} {args.covariance} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
