"""The benchmark pipeline's dmix side (pipelines/bench/): data, the dmix runner, the summary.

The peers run in their own virtual environment, which CI does not build; what runs here is
everything dmix contributes to the comparison. Timings are never asserted: the numbers checked
are the data (the .npy file and the Zarr store hold the same rows as ``make_mixture``), the fit
the runner reports (equal to the same fit in this process, in memory and streamed), and the
summary's arithmetic.
"""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import dmix
from dmix.datasets import make_mixture

BENCH = Path(__file__).resolve().parents[1] / "pipelines" / "bench"


def _load(name):
    """A pipelines/bench script as a module, under a name no other module has."""
    spec = importlib.util.spec_from_file_location(f"dmix_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_data, bench_run = _load("data"), _load("run")

N, D, K = 3000, 3, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return bench_data.prepare(tmp_path_factory.mktemp("bench"), N, D, K, seed=4)


def test_prepare_writes_the_same_rows_twice_and_is_cached(dataset):
    want = make_mixture(N, D, K, 4).rows(0, N)
    np.testing.assert_array_equal(np.load(dataset / "X.npy"), want)
    store = zarr.open_array(str(dataset / "X.zarr"), mode="r")
    np.testing.assert_array_equal(store[:], want)
    assert store.chunks[0] == 375  # an eighth of the rows: blocks for every worker
    init = np.load(dataset / "init.npz")
    np.testing.assert_array_equal(init["means"], make_mixture(N, D, K, 4).params["means"] + 0.5)
    assert init["covariances_full"].shape == (K, D, D)
    assert init["covariances_diag"].shape == (K, D)
    stamp = (dataset / "X.npy").stat().st_mtime_ns
    assert bench_data.prepare(dataset.parent, N, D, K, seed=4) == dataset
    assert (dataset / "X.npy").stat().st_mtime_ns == stamp  # not generated again


@pytest.mark.slow
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_run_dmix_reports_the_fit_it_ran(dataset, covariance):
    """The runner's process (a real LocalCluster) reports the lower bound of the fit it timed:
    equal to the same fit here, and the same whether the rows come from memory or Zarr."""
    results = {}
    for source in ("dmix", "dmix-zarr"):
        cmd = bench_run.command(source, dataset, covariance, n_iter=3)
        results[source] = bench_run.run_one(cmd + ["--workers", "2"], timeout=300)
        assert "error" not in results[source], results[source]
    init = np.load(dataset / "init.npz")
    cov = init[f"covariances_{covariance}"]
    gm = dmix.GaussianMixture(K, covariance_type=covariance, max_iter=3, tol=0,
                              weights_init=init["weights"], means_init=init["means"],
                              precisions_init=np.linalg.inv(cov) if covariance == "full"
                              else 1 / cov)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(np.load(dataset / "X.npy"))
    for source, r in results.items():
        assert (r["n"], r["d"], r["k"], r["covariance"]) == (N, D, K, covariance)
        assert len(r["iter_s"]) == 3 and r["s_per_iter"] == np.median(r["iter_s"]) > 0
        assert r["peak_rss_bytes"] > 100e6  # driver and two worker processes at least
        np.testing.assert_allclose(r["lower_bound"], gm.lower_bound_, rtol=1e-12)
    assert results["dmix"]["peer"] == "dmix" and results["dmix-zarr"]["peer"] == "dmix-zarr"


def test_nominal_flops():
    # full: N K (2 D^2 + 7 D); diag: 9 N K D
    assert bench_run.nominal_flops(1_000_000, 16, 16, "full") == 1e6 * 16 * (512 + 112)
    assert bench_run.nominal_flops(200_000, 64, 32, "diag") == 2e5 * 32 * 9 * 64


def test_summary_medians_ratios_and_table():
    ceilings = {"float64_gflops": {"n": 4096, "numpy": 100.0, "torch": 90.0, "best": 100.0},
                "float32_gflops": {"n": 4096, "numpy": 150.0, "torch": 200.0, "best": 200.0}}
    runs = []
    for rep, (dm, sk) in enumerate([(1.0, 4.0), (2.0, 5.0), (1.5, 9.0)]):
        for lib, s in (("dmix", dm), ("sklearn", sk)):
            runs.append(dict(runner=lib, repeat=rep, n=1000, d=4, k=2, covariance="full",
                             s_per_iter=s, peak_rss_bytes=2e9, dtype="float64", version="1",
                             setup_s={"load": 0.5}, lower_bound=-3.0))
    runs.append(dict(runner="spark", repeat=0, n=1000, d=4, k=2, covariance="full",
                     error="exit status 1"))
    rows = {r["library"]: r for r in bench_run.summarize(runs, ceilings)}
    assert rows["dmix"]["s_per_iter"] == 1.5 and rows["sklearn"]["s_per_iter"] == 5.0
    assert rows["sklearn"]["vs_dmix"] == pytest.approx(5.0 / 1.5)
    flops = bench_run.nominal_flops(1000, 4, 2, "full")
    assert rows["dmix"]["gflops"] == pytest.approx(flops / 1e9 / 1.5)
    assert rows["dmix"]["pct_float64_peak"] == pytest.approx(rows["dmix"]["gflops"])
    assert rows["spark"]["errors"] == ["exit status 1"] and "s_per_iter" not in rows["spark"]
    report = {"command": "x", "date": "2026-11-22T00:00:00", "repeats": 3, "n_iter": 4,
              "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 24.0},
              "ceilings": ceilings, "summary": list(rows.values())}
    table = bench_run.markdown(report)
    assert "| 1,000 | 4 | 2 | full | sklearn | float64 | 5 (4-9) | 3.33 |" in table
    assert "failed: exit status 1" in table
    assert "| 1,000 x 4 x 2 | full | **1.5** | 5 (3.3x) | failed |" in table  # side by side
    assert "| float32 matrix product 4096^3: NumPy / torch / best | 150 / 200 / **200** GFLOP/s |" in (
        table)
    json.dumps(report)  # the report is JSON as written
