"""Fault tolerance on a real process cluster: a worker killed with SIGKILL in the middle of an
EM iteration.

A ``distributed.LocalCluster`` of two single-threaded worker processes, each under a Nanny. The
fit runs from user-given initial parameters (no k-means passes) for three iterations; after the
first iteration ends, a background thread waits until one worker is running an E-step task and
already holds computed E-step results, and kills that worker's process with SIGKILL. The
scheduler recomputes what was lost from the graph (the blocks are re-read from the Zarr store,
or, for NumPy input persisted on the cluster, re-sent from the graph's data), the fit completes,
and its parameters equal those of a run without failure. The Nanny restarts the worker: a new
process, two workers again.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import distributed  # a core dependency: its absence must fail, not skip
import numpy as np
import pytest

import dmix
from dmix.datasets import make_mixture
from dmix.engine.loop import Monitor
from dmix.io.store import write_blocks

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::dmix.errors.ConvergenceWarning"),
    # NumPy input persisted on a cluster travels inside the graph (what makes it recomputable).
    pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning"),
]

N_ROWS = 2_000_000  # x 16 float64 features = 256 MB; 16 blocks of 16 MB
N_FEATURES = 16
K = 8
SEED = 11
CHUNK_ROWS = 125_000
MAX_ITER = 3
FITTED = ["weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"]


@dataclass
class Data:
    x: np.ndarray
    zarr_path: str
    params: dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    mixture = make_mixture(N_ROWS, N_FEATURES, K, SEED)
    x = mixture.rows(0, N_ROWS)
    root = tmp_path_factory.mktemp("faults")
    path = root / "x.zarr"
    write_blocks(path, N_ROWS, N_FEATURES, lambda a, b: x[a:b], chunk_size=CHUNK_ROWS)
    try:
        yield Data(x, str(path), mixture.params)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 256 MB


def estimator(client, params) -> dmix.GaussianMixture:
    return dmix.GaussianMixture(
        K, covariance_type="full", max_iter=MAX_ITER, tol=0.0, chunk_size=CHUNK_ROWS,
        weights_init=params["weights"], means_init=params["means"],
        precisions_init=np.linalg.inv(params["covariances"]), client=client)


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Port 8787 is already in use" (HTTP server)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        c = distributed.Client(cluster, set_as_default=False)
    try:
        c.wait_for_workers(2, timeout=60)
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def reference(data, client):
    """A run without failure: same data, init, chunks and cluster."""
    est = estimator(client, data.params).fit(data.zarr_path)
    assert est.n_iter_ == MAX_ITER
    return est


class IterationClock(Monitor):
    """Records when each iteration ends; ``first`` is set when iteration 1 has ended."""

    def __init__(self):
        self.first = threading.Event()
        self.ends: dict[int, float] = {}

    def end_iteration(self, record):
        self.ends[record.iteration] = time.monotonic()
        if record.iteration == 1:
            self.first.set()


def _is_estep(key) -> bool:
    return isinstance(key, str) and key.startswith("dmix-estep-")


@dataclass
class Kill:
    address: str = ""
    pid: int = 0
    at: float = 0.0
    held_estep: int = 0  # computed E-step results in the killed worker's memory
    running_estep: int = 0  # E-step tasks assigned to it
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _killer(client, clock: IterationClock, kill: Kill, delay=0.3, timeout=120):
    """After iteration 1 (plus ``delay``), SIGKILL a worker that is running an E-step task and
    holds computed E-step results of the current pass."""
    try:
        if not clock.first.wait(timeout):
            raise TimeoutError("iteration 1 never ended")
        time.sleep(delay)
        pids = client.run(os.getpid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            processing = client.processing()
            held = client.has_what()
            for address, pid in sorted(pids.items()):
                running = [k for k in processing.get(address, ()) if _is_estep(k)]
                done = [k for k in held.get(address, ()) if _is_estep(k)]
                if running and done:
                    os.kill(pid, signal.SIGKILL)
                    kill.at = time.monotonic()
                    kill.address, kill.pid = address, pid
                    kill.running_estep, kill.held_estep = len(running), len(done)
                    return
            time.sleep(0.01)
        raise TimeoutError("no worker was ever running and holding E-step tasks")
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        kill.error = exc
    finally:
        kill.done.set()


def fit_with_kill(client, params, X):
    pids_before = client.run(os.getpid)
    nannies_before = {w["nanny"] for w in client.scheduler_info()["workers"].values()}
    assert len(pids_before) == 2 and len(nannies_before) == 2
    clock, kill = IterationClock(), Kill()
    thread = threading.Thread(target=_killer, args=(client, clock, kill), daemon=True)
    thread.start()
    with distributed.get_task_stream(client=client) as stream:
        est = estimator(client, params).fit(X, monitor=clock)
    thread.join(timeout=60)
    assert kill.done.is_set() and kill.error is None, kill.error
    return est, clock, kill, stream.data, pids_before, nannies_before


def assert_same_fit(a, b, rtol=1e-12):
    assert a.n_iter_ == b.n_iter_ == MAX_ITER
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol, atol=0)
    for name in FITTED:
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(), err_msg=name)


def assert_recovered(client, kill: Kill, clock: IterationClock, stream, pids_before,
                     nannies_before, lost_prefixes):
    # The kill landed in iteration 2, while a worker was computing it.
    assert clock.ends[1] < kill.at < clock.ends[2]
    assert kill.pid in pids_before.values() and kill.running_estep >= 1 and kill.held_estep >= 1
    # The scheduler saw the worker die unexpectedly, and lost (and so recomputed) computed
    # results, never data it could not recover.
    removals = [msg for _, msg in client.get_events(kill.address)
                if isinstance(msg, dict) and msg.get("action") == "remove-worker"]
    assert len(removals) == 1 and removals[0]["expected"] is False
    lost = {k if isinstance(k, str) else k[0] for k in removals[0]["lost-computed-tasks"]}
    assert not removals[0]["lost-scattered-tasks"]
    for prefix in lost_prefixes:
        assert any(k.startswith(prefix) for k in lost), (prefix, lost)
    # Some E-step ran twice: once on the killed worker, again elsewhere.
    runs: dict = {}
    for task in stream:
        if _is_estep(task["key"]):
            runs[task["key"]] = runs.get(task["key"], 0) + 1
    assert max(runs.values()) == 2
    print(f"\nkilled {kill.address} (pid {kill.pid}) {kill.at - clock.ends[1]:.2f} s into "
          f"iteration 2 (which took {clock.ends[2] - clock.ends[1]:.2f} s) while it ran "
          f"{kill.running_estep} and held {kill.held_estep} E-step result(s); "
          f"{sum(v == 2 for v in runs.values())} E-step(s) ran twice; lost: {sorted(lost)}")
    assert len(runs) == MAX_ITER * (N_ROWS // CHUNK_ROWS)
    # The Nanny restarted the worker: two workers again, a new process under the same nannies.
    client.wait_for_workers(2, timeout=60)
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids_after = client.run(os.getpid)
    assert len(pids_after) == 2 and kill.pid not in pids_after.values()
    assert len(set(pids_after.values()) - set(pids_before.values())) == 1
    nannies_after = {w["nanny"] for w in client.scheduler_info()["workers"].values()}
    assert nannies_after == nannies_before


def test_sigkill_mid_iteration_zarr_blocks_reread(data, client, reference):
    est, clock, kill, stream, pids, nannies = fit_with_kill(client, data.params, data.zarr_path)
    assert_same_fit(est, reference)
    assert_recovered(client, kill, clock, stream, pids, nannies, ["dmix-estep-"])


def test_sigkill_mid_iteration_persisted_numpy_recomputed(data, client, reference):
    """NumPy input is persisted on the cluster; the killed worker's blocks come back from the
    data in the graph (lineage), not from a scatter that would be lost."""
    est, clock, kill, stream, pids, nannies = fit_with_kill(client, data.params, data.x)
    assert_same_fit(est, reference)
    assert_recovered(client, kill, clock, stream, pids, nannies, ["dmix-estep-", "array-"])
