"""Out-of-core fitting on a real process cluster: 2 GiB of Zarr data on disk, workers limited
to 400 MB each (800 MB in all).

``persist='auto'`` must stream the data (they are more than half of the workers' memory), the
workers must stay under their memory limit without pausing, spilling or being restarted, and the
fit must equal a fit of the same rows through a NumPy memmap with Dask's threaded scheduler.
Scoring (``score`` and ``score_samples``) streams the same store under the same limits. The
input store is opened read-only and never modified.

Everything is real: a ``distributed.LocalCluster`` of two worker processes (with nannies), a
Zarr v3 store in a temporary directory, and a ``.npy`` file opened with
``numpy.load(mmap_mode='r')``.
The 4.3 GB of files are deleted when the module ends.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dask
import distributed  # a core dependency: its absence must fail, not skip
import numpy as np
import pytest
import zarr
from numpy.lib.format import open_memmap
from threadpoolctl import threadpool_limits

import dmix
from dmix.datasets import mixture_params
from dmix.engine.reduce import place_data
from dmix.io.source import _open_zarr, as_source, direct_reads
from dmix.io.store import write_blocks

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.filterwarnings("ignore::dmix.errors.ConvergenceWarning"),
]

N_ROWS = 1 << 24  # 16,777,216 rows x 16 float64 features = 2 GiB (2.15 GB)
N_FEATURES = 16
K = 4
SEED = 3
# Rows per stored Zarr chunk and per Dask block (the chunk_size of both fits): 16 MiB, 128
# blocks. With dmix's default of 32 MiB blocks a worker peaks near 290 MB, past the 70% spill
# threshold (280 MB), and logs "Unmanaged memory use is high": ~150 MB of imports, two queued
# blocks (root-task queuing, worker-saturation 1.1) and the running task's block plus its
# E-step temporaries (at most SUBBATCH_BYTES, whatever the block size).
STORED_ROWS = CHUNK_ROWS = 1 << 17
WRITE_ROWS = 1 << 20  # rows per write_blocks call: 128 MiB
MEMORY_LIMIT = 400e6  # bytes per worker
FIT_KW = {"covariance_type": "diag", "max_iter": 2, "tol": 0.0, "chunk_size": CHUNK_ROWS}
FITTED = ["weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"]
# What distributed logs when a worker nears its limit (spill 70%, pause 80%, terminate 95%).
MEMORY_WORDS = ("paus", "memory use is high", "spill", "exceed", "restart", "terminat", "kill")


# -- data ------------------------------------------------------------------------------------


def true_params() -> dict:
    return mixture_params(N_FEATURES, K, SEED)


def _block_sampler(params):
    """``rows(start, stop)``: rows of the mixture ``params``, keyed by ``(SEED, start)``.

    NumPy's Generator is used instead of ``dmix.datasets.mixture_rows`` (4 s per million rows
    on the 2-core machine, 67 s for this dataset): 0.3 s per million rows. Within a block the
    rows are grouped by component (EM does not care about row order).
    """
    weights, means = params["weights"], params["means"]
    chol = np.linalg.cholesky(params["covariances"])

    def rows(start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([SEED, start])
        counts = rng.multinomial(stop - start, weights)
        x = rng.standard_normal((stop - start, N_FEATURES))
        lo = 0
        for k, n in enumerate(counts):
            part = x[lo : lo + n]
            np.matmul(part, chol[k].T, out=part)  # row-wise, in place: z @ L_k^T
            part += means[k]
            lo += n
        return x

    return rows


@dataclass
class Dataset:
    zarr_path: Path
    npy_path: Path
    params: dict
    seconds: float


def _write_dataset(zarr_path: Path, npy_path: Path, params: dict) -> None:
    """The rows into the Zarr store and, the same bytes, into a .npy file, block by block."""
    sample = _block_sampler(params)
    mirror = open_memmap(npy_path, mode="w+", dtype=np.float64, shape=(N_ROWS, N_FEATURES))

    def block(start, stop):
        x = sample(start, stop)
        mirror[start:stop] = x
        return x

    with threadpool_limits(1):  # two writer threads, each with its own BLAS call
        write_blocks(zarr_path, N_ROWS, N_FEATURES, block, chunk_size=STORED_ROWS,
                     block_rows=WRITE_ROWS, max_workers=2)  # uncompressed (the default)
    # No flush (msync) on return: readers share the page cache, the disk is not needed.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The 2 GiB store and the same rows as a .npy file, written block by block (128 MiB)."""
    root = tmp_path_factory.mktemp("out_of_core")
    zarr_path, npy_path = root / "x.zarr", root / "x.npy"
    params = true_params()
    tic = time.perf_counter()
    _write_dataset(zarr_path, npy_path, params)
    try:
        yield Dataset(zarr_path, npy_path, params, time.perf_counter() - tic)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 4.3 GB: do not leave it to pytest's rotation


def user_init(params) -> dict:
    variances = np.diagonal(params["covariances"], axis1=1, axis2=2)
    return {"weights_init": params["weights"], "means_init": params["means"],
            "precisions_init": 1.0 / variances}


# -- cluster and its watcher -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Port 8787 is already in use" (HTTP server)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           memory_limit="400MB", dashboard_address=None)
        c = distributed.Client(cluster, set_as_default=False)
    try:
        c.wait_for_workers(2, timeout=60)
        yield c
    finally:
        c.close()
        cluster.close()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """This process's resident-set high-water mark (VmHWM; unlike ru_maxrss, exec resets it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Watch:
    """What a background thread saw on the workers, every ``interval`` seconds."""

    rss: dict = field(default_factory=dict)  # address -> max RSS sampled
    managed: dict = field(default_factory=dict)  # address -> max bytes of Dask-managed data
    spilled: dict = field(default_factory=dict)  # address -> max bytes spilled to disk
    statuses: set = field(default_factory=set)
    samples: int = 0
    peak: dict = field(default_factory=dict)  # address -> VmHWM over the watched span
    pids_before: dict = field(default_factory=dict)
    pids_after: dict = field(default_factory=dict)
    log_lines: list = field(default_factory=list)  # worker and nanny lines about memory
    seconds: float = 0.0


class WorkerWatch:
    """Context manager: polls worker RSS (``client.run``), status and managed memory
    (``scheduler_info``) every 0.2 s, and reads each worker's VmHWM and logs at the end."""

    def __init__(self, client, interval=0.2):
        self.client, self.interval = client, interval
        self.result = Watch()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._error = None

    def _poll(self):
        try:
            while not self._stop.is_set():
                self._sample()
                self._stop.wait(self.interval)
            self._sample()
        except Exception as exc:  # noqa: BLE001 - reported by __exit__
            self._error = exc

    def _sample(self):
        r = self.result
        for addr, rss in self.client.run(_rss).items():
            r.rss[addr] = max(r.rss.get(addr, 0), rss)
        for addr, info in self.client.scheduler_info()["workers"].items():
            r.statuses.add(info["status"])
            metrics = info["metrics"]
            r.managed[addr] = max(r.managed.get(addr, 0), metrics["managed_bytes"])
            r.spilled[addr] = max(r.spilled.get(addr, 0), metrics["spilled_bytes"]["disk"])
        r.samples += 1

    def __enter__(self):
        self.result.pids_before = self.client.run(os.getpid)
        self.client.run(_reset_peak_rss)
        self._tic = time.perf_counter()
        self._thread.start()
        return self.result

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        r = self.result
        r.seconds = time.perf_counter() - self._tic
        if self._error is not None:
            raise self._error
        r.peak = self.client.run(_peak_rss)
        r.pids_after = self.client.run(os.getpid)
        for nanny in (False, True):
            for addr, lines in self.client.get_worker_logs(nanny=nanny).items():
                r.log_lines += [f"{addr} {msg}" for _, msg in lines
                                if any(w in msg.lower() for w in MEMORY_WORDS)]
        return False


def assert_within_limits(watch: Watch, what: str):
    print(f"\n{what}: {watch.seconds:.1f} s, {watch.samples} samples; worker peak RSS (VmHWM) "
          f"{max(watch.peak.values()) / 1e6:.0f} MB, max sampled RSS "
          f"{max(watch.rss.values()) / 1e6:.0f} MB, max managed "
          f"{max(watch.managed.values()) / 1e6:.0f} MB; limit {MEMORY_LIMIT / 1e6:.0f} MB")
    assert watch.samples >= 10, watch
    assert len(watch.pids_before) == 2
    # Not restarted: the same two worker processes at the same addresses.
    assert watch.pids_after == watch.pids_before
    # Under the limit, and under the pause threshold (80%), by both measures.
    assert max(watch.peak.values()) < 0.8 * MEMORY_LIMIT, watch.peak
    assert max(watch.rss.values()) < 0.8 * MEMORY_LIMIT, watch.rss
    assert watch.statuses == {"running"}, watch.statuses  # never 'paused'
    assert max(watch.spilled.values()) == 0, watch.spilled
    assert watch.log_lines == []


# -- the runs (module fixtures, so each pass over 2 GiB happens once) ------------------------


@dataclass
class ClusterRun:
    estimator: dmix.GaussianMixture
    fit_watch: Watch
    score: float
    score_samples_mean: float
    score_watch: Watch
    mtimes_before: dict
    mtimes_after: dict


def _stat_tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cluster_run(dataset, client):
    path = str(dataset.zarr_path)
    mtimes_before = _stat_tree(dataset.zarr_path)
    est = dmix.GaussianMixture(K, client=client, **FIT_KW, **user_init(dataset.params))
    with WorkerWatch(client) as fit_watch:
        est.fit(path)
    with WorkerWatch(client) as score_watch:
        score = est.score(path)
        score_samples_mean = client.compute(est.score_samples(path).mean()).result()
    return ClusterRun(est, fit_watch, score, float(score_samples_mean), score_watch,
                      mtimes_before, _stat_tree(dataset.zarr_path))


@pytest.fixture(scope="module")
def memmap_fit(dataset):
    """The same rows through a read-only memmap, Dask's threaded scheduler, no cluster.

    BLAS is limited to one thread, as on distributed's workers: two Dask threads each running
    OpenBLAS's two threads on two cores make this fit 2x slower (35 s instead of 15 s).
    """
    x = np.load(dataset.npy_path, mmap_mode="r")
    assert isinstance(x, np.memmap)
    with threadpool_limits(1), dask.config.set(scheduler="threads", num_workers=2):
        return dmix.GaussianMixture(K, **FIT_KW, **user_init(dataset.params)).fit(x)


# -- tests -----------------------------------------------------------------------------------


def test_dataset_is_larger_than_the_cluster_memory(dataset):
    z = zarr.open_array(str(dataset.zarr_path), mode="r")
    assert z.shape == (N_ROWS, N_FEATURES) and z.dtype == np.float64
    assert z.chunks == (STORED_ROWS, N_FEATURES) and not z.compressors
    on_disk = sum(p.stat().st_size for p in dataset.zarr_path.rglob("*") if p.is_file())
    assert on_disk >= 2 * 2**30 > 2 * 2 * MEMORY_LIMIT
    # Spot checks that the store and the memmap hold the same rows.
    x = np.load(dataset.npy_path, mmap_mode="r")
    for start in (0, N_ROWS // 2 + 12345, N_ROWS - 1000):
        np.testing.assert_array_equal(z[start : start + 1000], x[start : start + 1000])


def test_auto_persist_streams_the_store(dataset, client, cluster_run):
    source = as_source(str(dataset.zarr_path), chunk_size=CHUNK_ROWS)
    assert source.array.numblocks == (N_ROWS // CHUNK_ROWS, 1)
    assert source.array.nbytes > 0.5 * 2 * MEMORY_LIMIT
    # The decision itself: 'auto' leaves the lazy array as it is (no persist, no futures).
    assert place_data(source.array, client, in_memory=source.in_memory) is source.array
    # During the fit no worker held more than a few blocks of Dask-managed data; persisted,
    # each would have held ~1 GiB.
    block_bytes = CHUNK_ROWS * N_FEATURES * 8
    assert max(cluster_run.fit_watch.managed.values()) <= 4 * block_bytes
    # And nothing of the data stays on the cluster after the fit.
    held = client.run_on_scheduler(
        lambda dask_scheduler: sum(ts.nbytes for ts in dask_scheduler.tasks.values()
                                   if ts.state == "memory"))
    assert held < block_bytes


def test_fit_streams_2gib_under_400mb_workers(cluster_run):
    est = cluster_run.estimator
    assert est.n_iter_ == 2 and len(est.lower_bounds_) == 2
    assert np.isfinite(est.lower_bounds_).all()
    assert est.lower_bounds_[1] >= est.lower_bounds_[0]  # EM does not decrease it
    assert_within_limits(cluster_run.fit_watch, "fit")


def test_fit_equals_memmap_fit_with_threads(cluster_run, memmap_fit):
    est = cluster_run.estimator
    assert est.n_iter_ == memmap_fit.n_iter_ == 2
    np.testing.assert_allclose(est.lower_bounds_, memmap_fit.lower_bounds_, rtol=1e-12, atol=0)
    for name in FITTED:
        a, b = getattr(est, name), getattr(memmap_fit, name)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max(),
                                   err_msg=name)


def test_fitted_params_are_near_the_truth(cluster_run, dataset):
    est, truth = cluster_run.estimator, dataset.params
    np.testing.assert_allclose(est.weights_, truth["weights"], atol=1e-3)
    np.testing.assert_allclose(est.means_, truth["means"], atol=5e-3)
    variances = np.diagonal(truth["covariances"], axis1=1, axis2=2)
    np.testing.assert_allclose(est.covariances_, variances, rtol=5e-3)


def test_score_and_score_samples_stream_under_the_limit(cluster_run):
    est = cluster_run.estimator
    # One pass each, on the cluster: both are the mean log-likelihood at the fitted params.
    np.testing.assert_allclose(cluster_run.score_samples_mean, cluster_run.score, rtol=1e-12)
    # The fitted params are the M-step after the last recorded E-step: no worse than it (up to
    # rounding: at convergence the two differ by ~1e-15 relative, in either direction).
    assert cluster_run.score >= est.lower_bounds_[-1] - 1e-12 * abs(est.lower_bounds_[-1])
    assert cluster_run.score - est.lower_bounds_[-1] < 1e-3
    assert_within_limits(cluster_run.score_watch, "score + score_samples")


def test_store_is_opened_read_only_and_not_modified(dataset, cluster_run):
    assert cluster_run.mtimes_after == cluster_run.mtimes_before
    z, _ = _open_zarr(str(dataset.zarr_path), None, None)
    assert z.read_only


# -- read-only input, byte for byte, on a small store ----------------------------------------


def _hash_tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_fit_score_predict_never_modify_the_store(tmp_path, client):
    path = tmp_path / "small.zarr"
    params = true_params()
    write_blocks(path, 20_000, N_FEATURES, _block_sampler(params), chunk_size=2_000)
    group_path = tmp_path / "group.zarr"
    zarr.open_group(str(group_path), mode="w").create_array(
        "X", data=np.asarray(zarr.open_array(str(path), mode="r")[:]), chunks=(3_000, 16))
    stores = [path, group_path]
    before = {p: _hash_tree(p) for p in stores}
    assert all(len(b) >= 8 for b in before.values())

    est = dmix.GaussianMixture(K, covariance_type="full", max_iter=5, random_state=0,
                               chunk_size=4_000, client=client)
    for p in stores:
        est.fit(str(p))
        assert np.isfinite(est.score(str(p)))
        labels = client.compute(est.predict(str(p))).result()
        proba = client.compute(est.predict_proba(str(p))).result()
        assert labels.shape == (20_000,) and proba.shape == (20_000, K)
        with dask.config.set(scheduler="sync"):  # and locally, without the cluster
            est2 = dmix.GaussianMixture(K, max_iter=2, random_state=0).fit(str(p))
            est2.score_samples(str(p)).compute()

    assert {p: _hash_tree(p) for p in stores} == before

    # The array dmix opens, and the copy of it that travels to the workers, refuse writes; an
    # uncompressed store (the first) is read from its chunk files, opened for reading only.
    assert direct_reads(as_source(str(path)).array) is not None
    assert direct_reads(as_source(str(group_path)).array) is None  # zstd: through zarr
    for p in stores[1:]:
        source = as_source(str(p))
        arrays = [v for v in dict(source.array.__dask_graph__()).values()
                  if isinstance(v, zarr.Array)]
        assert len(arrays) == 1 and arrays[0].read_only
        shipped = client.submit(lambda z: (z.read_only, z.store.read_only), arrays[0]).result()
        assert shipped == (True, True)
        with pytest.raises(ValueError, match="read-only"):
            arrays[0][0:1] = 0.0
    assert {p: _hash_tree(p) for p in stores} == before


def test_default_blocks_follow_the_worker_memory_limit(client, dataset):
    """Without chunk_size, blocks are at most 1/16 of the smallest worker limit when that is
    below 32 MiB (here 400 MB / 16 = 25 MB: one stored chunk of 2**17 rows, 16.8 MB, since two
    would pass it), and at most 32 MiB without a cluster; equal blocks, an even number of them
    for the two workers."""
    from dmix.engine.reduce import block_bytes_for

    assert block_bytes_for(None) == 32 * 2**20
    assert block_bytes_for(client) == 400_000_000 // 16
    est = dmix.GaussianMixture(2, client=client)
    chunks = est._source(str(dataset.zarr_path), fitting=True, client=client).array.chunks[0]
    assert chunks == (STORED_ROWS,) * (N_ROWS // STORED_ROWS)
    assert STORED_ROWS * N_FEATURES * 8 <= 400_000_000 // 16 < 2 * STORED_ROWS * N_FEATURES * 8
    assert len(chunks) % 2 == 0
