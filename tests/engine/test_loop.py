"""Tests of the EM driver loop (dmix.engine.loop) through GaussianMixture and the engine API:
monotone lower bound, tol semantics, ConvergenceWarning, n_init, and independence of the fit
from the chunking and from the scheduler (local, LocalCluster, CLI-started cluster)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings

import dask
import dask.array as da
import distributed  # a core dependency: its absence must fail, not skip
import numpy as np
import pytest
import sklearn.exceptions

import dmix
from dmix.engine.init import initial_params
from dmix.engine.loop import EMResult, Monitor, fit_em, run_em
from dmix.families.gaussian import Gaussian
from dmix.io.source import as_source

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical", "tied_diag", "tied_spherical"]
FITTED = ["weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def blobs(n_per=70, seed=0, d=3, scale=1.0, sep=5.0):
    """Three overlapping-but-distinct Gaussian blobs, shuffled; (3 * n_per, d)."""
    rng = np.random.default_rng(seed)
    centers = np.zeros((3, d))
    centers[1, 0] = sep
    centers[2, 1] = sep
    covs = [np.diag(np.linspace(0.5, 1.5, d)), np.eye(d) * 0.8, np.eye(d) * 1.3]
    covs[0][0, 1] = covs[0][1, 0] = 0.3
    x = np.concatenate([rng.multivariate_normal(c * scale, cv * scale**2, size=n_per)
                        for c, cv in zip(centers, covs, strict=True)])
    return x[rng.permutation(len(x))]


def assert_same_fit(a, b, rtol=1e-10):
    """Two fitted estimators agree to ``rtol`` relative (to each array's largest entry)."""
    assert a.n_iter_ == b.n_iter_
    assert a.converged_ == b.converged_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.lower_bound_, b.lower_bound_, rtol=rtol, atol=0)
    for name in FITTED:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(), err_msg=name)


def uneven_chunks(n, seed=0, max_size=15):
    """Dozens of uneven row chunks (sizes 1..max_size) covering n rows."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, max_size + 1), n - sum(sizes))))
    return tuple(sizes)


def user_init(x, k=3):
    """Deliberately rough initial parameters (full precisions), shared by several tests."""
    means = x[[0, 1, 2]][:k] + 0.1
    weights = np.full(k, 1.0 / k)
    precisions = np.stack([np.eye(x.shape[1]) * 0.5] * k)
    return dict(weights_init=weights, means_init=means, precisions_init=precisions)


# -- monotonicity -------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_lower_bound_never_decreases(covariance_type):
    x = blobs(seed=1)
    gm = dmix.GaussianMixture(3, covariance_type=covariance_type, reg_covar=0.0, max_iter=30,
                              tol=0.0, random_state=0, init_params="random")
    with pytest.warns(dmix.ConvergenceWarning):
        gm.fit(x)
    lbs = np.asarray(gm.lower_bounds_)
    assert lbs.shape == (30,)
    assert gm.n_iter_ == 30 and not gm.converged_
    assert np.all(np.isfinite(lbs))
    steps = np.diff(lbs)
    assert np.all(steps >= -1e-9 * np.abs(lbs[1:])), steps.min()
    # EM actually moved from the random start
    assert lbs[-1] - lbs[0] > 1e-4
    assert gm.lower_bound_ == lbs[-1]


# -- tol and max_iter --------------------------------------------------------------------


@pytest.mark.parametrize("tol", [1e-1, 1e-3, 1e-6])
def test_tol_semantics(tol):
    x = blobs(seed=2)
    gm = dmix.GaussianMixture(3, tol=tol, max_iter=500, random_state=1,
                              init_params="random").fit(x)
    lbs = np.asarray(gm.lower_bounds_)
    assert gm.converged_ is True
    assert gm.n_iter_ == len(lbs) >= 2  # the first change is measured from -inf
    changes = np.diff(lbs)
    assert abs(changes[-1]) < tol  # stopped because the change fell below tol ...
    assert np.all(np.abs(changes[:-1]) >= tol)  # ... and not before
    assert gm.lower_bound_ == lbs[-1]


def test_tol_huge_stops_after_two_iterations():
    x = blobs(seed=2)
    gm = dmix.GaussianMixture(3, tol=1e9, random_state=0).fit(x)
    assert gm.n_iter_ == 2 and gm.converged_ and len(gm.lower_bounds_) == 2


def test_convergence_warning_when_max_iter_hit():
    x = blobs(seed=3)
    gm = dmix.GaussianMixture(3, tol=0.0, max_iter=4, random_state=0)
    with pytest.warns(dmix.ConvergenceWarning,
                      match=r"^Best performing initialization did not converge\. Try different "
                            r"init parameters, or increase max_iter, tol, or check for "
                            r"degenerate data\.$") as record:
        gm.fit(x)
    hits = [w for w in record if issubclass(w.category, dmix.ConvergenceWarning)]
    assert len(hits) == 1
    assert isinstance(hits[0].message, sklearn.exceptions.ConvergenceWarning)
    assert issubclass(dmix.ConvergenceWarning, sklearn.exceptions.ConvergenceWarning)
    assert gm.n_iter_ == 4 and gm.converged_ is False and len(gm.lower_bounds_) == 4
    # the warning points at the caller's line, not inside dmix
    assert hits[0].filename == __file__


def test_no_warning_when_converged():
    x = blobs(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = dmix.GaussianMixture(3, tol=1e-3, max_iter=200, random_state=0).fit(x)
    assert gm.converged_


def test_max_iter_zero_returns_initial_parameters():
    x = blobs(seed=3)
    init = user_init(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning for max_iter=0 (as scikit-learn)
        gm = dmix.GaussianMixture(3, max_iter=0, **init).fit(x)
    assert gm.n_iter_ == 0 and gm.converged_ is False
    assert gm.lower_bound_ == -math.inf and gm.lower_bounds_ == []
    np.testing.assert_array_equal(gm.means_, init["means_init"])
    np.testing.assert_array_equal(gm.weights_, init["weights_init"])
    np.testing.assert_allclose(gm.precisions_, init["precisions_init"], rtol=1e-12)


def test_run_em_records_and_monitor():
    x = blobs(seed=4)
    family = Gaussian("diag", 1e-6)
    data = as_source(x, chunk_size=50).array
    params = initial_params(family, data, 3, "kmeans", seed=0)

    class Recorder(Monitor):
        def __init__(self):
            self.records = []

        def end_iteration(self, record):
            self.records.append(record)

    rec = Recorder()
    result = run_em(family, data, params, max_iter=50, tol=1e-4, init=2, monitor=rec)
    assert isinstance(result, EMResult)
    assert result.n_iter == len(result.lower_bounds) == len(rec.records)
    assert [r.iteration for r in rec.records] == list(range(1, result.n_iter + 1))
    assert all(r.init == 2 for r in rec.records)
    assert [r.lower_bound for r in rec.records] == result.lower_bounds
    assert rec.records[0].change == math.inf
    np.testing.assert_allclose([r.change for r in rec.records[1:]],
                               np.diff(result.lower_bounds), rtol=0, atol=0)
    assert result.converged == (abs(rec.records[-1].change) < 1e-4)
    # the lower bound at iteration t is the mean log-likelihood of the parameters entering it
    first = family.log_density(params, x, np).mean()
    assert result.lower_bounds[0] == pytest.approx(first, rel=1e-12)


# -- n_init ------------------------------------------------------------------------------


def test_n_init_keeps_best_final_lower_bound():
    rng = np.random.default_rng(1)
    centers = rng.uniform(-6, 6, size=(8, 2))
    x = np.concatenate([rng.normal(size=(25, 2)) * 0.7 + c for c in centers])
    kw = dict(init_params="k-means++", max_iter=200, tol=1e-5)
    gm = dmix.GaussianMixture(5, n_init=4, random_state=3, **kw).fit(x)

    # the four restarts, run separately through the engine with the same keys
    family = Gaussian("full", 1e-6)
    data = as_source(x).array
    starts = [initial_params(family, data, 5, "k-means++", seed=3, restart=i) for i in range(4)]
    runs = [run_em(family, data, p, max_iter=200, tol=1e-5) for p in starts]
    bounds = [r.lower_bound for r in runs]
    assert max(bounds) - min(bounds) > 0.05  # the restarts really reach different optima
    best = int(np.argmax(bounds))
    assert best != 0  # so keeping the first would be wrong
    assert gm.lower_bound_ == pytest.approx(bounds[best], rel=1e-12)
    assert gm.n_iter_ == runs[best].n_iter
    np.testing.assert_allclose(gm.means_, runs[best].params["means"], rtol=1e-10)
    np.testing.assert_allclose(gm.lower_bounds_, runs[best].lower_bounds, rtol=1e-12)
    assert all(gm.lower_bound_ >= b for b in bounds)

    # n_init=1 is restart 0 of the same seed
    single = dmix.GaussianMixture(5, n_init=1, random_state=3, **kw).fit(x)
    assert single.lower_bound_ == pytest.approx(bounds[0], rel=1e-12)
    assert gm.lower_bound_ > single.lower_bound_


def test_fit_em_keeps_best_and_warns_only_for_kept_run():
    x = blobs(seed=5)
    family = Gaussian("spherical", 1e-6)
    data = as_source(x).array
    inits = [initial_params(family, data, 3, "random", seed=9, restart=i) for i in range(3)]
    with pytest.warns(dmix.ConvergenceWarning, match="did not converge"):
        result = fit_em(family, data, lambda i: inits[i], n_init=3, max_iter=3, tol=0.0)
    singles = [run_em(family, data, p, max_iter=3, tol=0.0) for p in inits]
    assert result.lower_bound == max(s.lower_bound for s in singles)
    assert result.n_iter == 3


# -- independence from the chunking -------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("init", ["user", "kmeans"])
def test_fit_independent_of_chunking(init):
    x = blobs(n_per=67, seed=6)  # 201 rows
    assert x.shape[0] == 201
    kw = dict(covariance_type="full", tol=1e-8, max_iter=40, random_state=12)
    if init == "user":
        kw.update(user_init(x))
    one = dmix.GaussianMixture(3, **kw).fit(x)
    chunks = uneven_chunks(201, seed=1)
    assert 20 <= len(chunks) <= 60 and len(set(chunks)) > 5
    uneven = dmix.GaussianMixture(3, **kw).fit(da.from_array(x, chunks=(chunks, (3,))))
    rows1 = dmix.GaussianMixture(3, chunk_size=1, **kw).fit(x)
    assert one.n_iter_ >= 3
    assert_same_fit(uneven, one)
    assert_same_fit(rows1, one)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "tied_spherical"])
def test_fit_independent_of_chunking_other_covariances(covariance_type):
    x = blobs(n_per=67, seed=7)
    kw = dict(covariance_type=covariance_type, tol=1e-8, max_iter=30, random_state=4)
    one = dmix.GaussianMixture(3, **kw).fit(x)
    many = dmix.GaussianMixture(3, chunk_size=7, **kw).fit(x)
    assert_same_fit(many, one)


# -- independence from the scheduler ------------------------------------------------------


@pytest.fixture(scope="module")
def process_cluster():  # shared by the LocalCluster tests, closed after the module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # port-in-use notices from concurrent test runs
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0")
        client = distributed.Client(cluster, set_as_default=False)
    try:
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        client.close()
        cluster.close()


SCHED_X = blobs(n_per=60, seed=8)  # 180 rows
# 8 blocks, fan-in 4: one level of dmix-reduce tasks on the cluster, the last combine on the driver
SCHED_KW = dict(covariance_type="full", tol=1e-6, max_iter=100, random_state=5, chunk_size=23,
                split_every=4)


@pytest.fixture(scope="module")
def sync_reference():
    with dask.config.set(scheduler="sync"):
        return dmix.GaussianMixture(3, **SCHED_KW).fit(SCHED_X)


def test_fit_threaded_equals_synchronous(sync_reference):
    with dask.config.set(scheduler="threads", num_workers=4):
        threaded = dmix.GaussianMixture(3, **SCHED_KW).fit(SCHED_X)
    assert sync_reference.n_iter_ >= 3
    assert_same_fit(threaded, sync_reference)


def test_fit_local_cluster_processes_equals_synchronous(sync_reference, process_cluster):
    dist = dmix.GaussianMixture(3, client=process_cluster, **SCHED_KW).fit(SCHED_X)
    assert_same_fit(dist, sync_reference)
    # the work really ran on the cluster
    prefixes = process_cluster.run_on_scheduler(
        lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"dmix-estep", "dmix-reduce", "dmix-summary", "dmix-lloyd"} <= set(prefixes)
    # predictions via the cluster equal the local ones
    np.testing.assert_allclose(dist.score(SCHED_X), sync_reference.score(SCHED_X), rtol=1e-12)


def test_fit_user_init_local_cluster_equals_synchronous(process_cluster):
    x = blobs(n_per=50, seed=9)
    kw = dict(tol=1e-8, max_iter=50, chunk_size=17, **user_init(x))
    ref = dmix.GaussianMixture(3, **kw).fit(x)
    dist = dmix.GaussianMixture(3, client=process_cluster, **kw).fit(x)
    assert_same_fit(dist, ref)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(180)
def test_fit_on_cli_started_cluster_equals_synchronous(sync_reference, tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, started as commands."""
    sched_file = tmp_path / "scheduler.json"
    procs = []
    logs = []

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                      stderr=subprocess.STDOUT))

    try:
        start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
               "--no-dashboard", "--scheduler-file", str(sched_file)], "scheduler")
        _wait_for(lambda: sched_file.exists() and sched_file.stat().st_size > 0, 60,
                  "the scheduler file")
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            start(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                   "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                   "--name", f"w{i}"], f"worker{i}")
        with distributed.Client(address, set_as_default=False, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
            fitted = dmix.GaussianMixture(3, client=client, **SCHED_KW).fit(SCHED_X)
            prefixes = client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            assert {"dmix-estep", "dmix-reduce"} <= set(prefixes)
            # both workers took part (the blocks are spread over the cluster)
            counts = client.run(lambda dask_worker: len(dask_worker.state.log) > 0)
            assert sorted(counts.values()) == [True, True]
        assert_same_fit(fitted, sync_reference)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    assert all(p.returncode is not None for p in procs)


def test_history_monitor_keeps_every_iteration():
    """History records one IterationRecord per iteration, with the fit's lower bounds."""
    from dmix.engine import History

    x = np.random.default_rng(0).normal(size=(300, 2))
    history = History()
    gm = dmix.GaussianMixture(2, max_iter=4, tol=0, random_state=0)
    with pytest.warns(dmix.ConvergenceWarning):
        gm.fit(x, monitor=history)
    assert [r.iteration for r in history.records] == [1, 2, 3, 4]
    np.testing.assert_array_equal([r.lower_bound for r in history.records], gm.lower_bounds_)
    assert all(r.seconds > 0 for r in history.records)
