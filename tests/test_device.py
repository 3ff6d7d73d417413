"""``device=`` and ``dtype=``: float32 E-steps (on the CPU here, through the same array-namespace
code the GPU runs), the errors of a GPU request without a GPU, and, on a GPU (tests marked
``gpu``), GPU fits against CPU fits for every covariance type, with and without a dask-cuda
cluster, persisted on the devices and streamed."""

from __future__ import annotations

import importlib.util
import re
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import gpu_available

import dmix
from dmix.cli import main
from dmix.engine.loop import estep_pass
from dmix.errors import DeviceError, InvalidParameterError
from dmix.families.gaussian import Gaussian
from dmix.xp import Compute, Workspace

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical", "tied_diag", "tied_spherical"]
PARAMS = ["weights_", "means_", "covariances_"]


def blobs(n=6000, d=4, offset=1000.0, seed=0):
    """Three separated blobs far from the origin (float32 must not lose them to cancellation)."""
    rng = np.random.default_rng(seed)
    centers = offset + np.array([[0.0] * d, [4.0] * d, [-3.0, 3.0] * (d // 2)])
    scales = np.array([1.0, 0.5, 1.5])
    labels = rng.integers(0, 3, n)
    return centers[labels] + scales[labels, None] * rng.normal(size=(n, d)), centers


def fit(x, cov, centers, **kwargs):
    kwargs = {"max_iter": 15, "random_state": 0, **kwargs}
    gm = dmix.GaussianMixture(3, covariance_type=cov, means_init=centers, tol=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0
        return gm.fit(x)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


# -- float32 compute, on the CPU ---------------------------------------------------------------


@pytest.mark.parametrize("cov", COVARIANCE_TYPES)
def test_float32_fit_matches_float64(cov):
    x, centers = blobs()
    f64 = fit(x, cov, centers)
    f32 = fit(x, cov, centers, dtype="float32")
    assert f64.dtype is None and f32.dtype == "float32"
    # Float32 arithmetic, float64 sums: the mean log-likelihood to 1e-6, the parameters to
    # float32 rounding of the centred data (scale 1) after 15 iterations.
    np.testing.assert_allclose(f32.lower_bounds_, f64.lower_bounds_, rtol=1e-6)
    np.testing.assert_allclose(f32.weights_, f64.weights_, rtol=0, atol=1e-5)
    np.testing.assert_allclose(f32.means_, f64.means_, rtol=0, atol=1e-4)
    np.testing.assert_allclose(f32.covariances_, f64.covariances_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f32.predict_proba(x), f64.predict_proba(x), atol=1e-4)
    assert f32.predict_proba(x[:5]).dtype == np.float64  # results are float64 either way
    # Per row, float32 rounding of the expanded form's terms (up to 400 here): within the
    # 5e-4 that EXPANSION_TOL_FLOAT32 allows; averaged over the rows, far less.
    np.testing.assert_allclose(f32.score_samples(x), f64.score_samples(x), rtol=0, atol=5e-4)
    np.testing.assert_allclose(f32.score(x), f64.score(x), rtol=2e-6)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_float32_statistics_are_float64_and_independent_of_chunking(cov):
    x, centers = blobs(n=5000)
    family = Gaussian(cov)
    params = fit(x, cov, centers)._params
    compute = Compute("cpu", "float32")
    f64 = estep_pass(family, da.from_array(x, chunks=(5000, 4)), params)
    f32 = estep_pass(family, da.from_array(x, chunks=(5000, 4)), params, compute=compute)
    for rows in (777, 64):
        stats = estep_pass(family, da.from_array(x, chunks=(rows, 4)), params, compute=compute)
        for key in ("nk", "s1", "s2"):
            assert stats[key].dtype == np.float64
            scale = np.abs(f64[key]).max()
            # Other chunks: only the float32 rounding of the per-sub-batch sums changes.
            np.testing.assert_allclose(stats[key], f32[key], rtol=0, atol=1e-6 * scale)
            # Against float64: the responsibilities themselves carry float32 rounding.
            np.testing.assert_allclose(stats[key], f64[key], rtol=0, atol=2e-5 * scale)
        assert stats["n"] == 5000
        np.testing.assert_allclose(stats["loglik"], f32["loglik"], rtol=1e-9)
        np.testing.assert_allclose(stats["loglik"], f64["loglik"], rtol=2e-6)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_float32_takes_the_direct_form_where_the_expansion_loses_digits(cov):
    """A component 100 sd from the shift: the expanded form's terms reach 4e4, which float64
    sums to 1e-11 but float32 only to 3e-3; the float32 E-step must switch to the direct form
    and keep its log-densities to float32 rounding."""
    family = Gaussian(cov)
    d = 4
    means = np.array([[0.0] * d, [100.0] * d])
    covs = np.stack([np.eye(d)] * 2) if cov == "full" else np.ones((2, d))
    params = family.make_params(np.array([0.999, 0.001]), means, covariances=covs)
    x = means[1] + np.random.default_rng(0).normal(size=(500, d))
    expand = {}
    for dtype in ("float64", "float32"):
        ws = Workspace(dtype)
        expand[dtype] = family._coefficients(params, np, ws)[2]
    assert expand == {"float64": True, "float32": False}
    f64 = family.log_density(params, x, np)
    f32 = family.log_density(params, x, np, workspace=Workspace("float32"))
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, rtol=2e-6)


# -- options and errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "gpu"}, r"Invalid 'device' or 'dtype' of GaussianMixture: device must be one "
                        r"of \('cpu', 'cuda'\)\. Got 'gpu' instead"),
    ({"dtype": "float16"}, r"dtype must be 'float32', 'float64' or None\. Got 'float16'"),
])
def test_invalid_device_or_dtype(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        dmix.GaussianMixture(2, **kwargs).fit(np.zeros((10, 2)))


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU: the request succeeds")
def test_cuda_without_a_gpu_is_a_clear_error():
    x, _ = blobs(n=300)
    with pytest.raises(DeviceError, match=r"device='cuda' cannot run here: (CuPy is not "
                                           r"installed: pip install 'dmix\[gpu\]'|CuPy finds no)"):
        dmix.GaussianMixture(2, device="cuda").fit(x)


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU: the request succeeds")
def test_cuda_without_a_gpu_on_a_cluster_names_the_problem():
    from distributed import Client, LocalCluster

    x, _ = blobs(n=300)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(DeviceError, match=r"device='cuda' cannot run on 1 of 1 Dask "
                                              r"worker\(s\); on tcp://127\.0\.0\.1:\d+: CuPy"):
            dmix.GaussianMixture(2, device="cuda", client=client).fit(x)


def test_resume_on_another_device_or_dtype(tmp_path):
    x, centers = blobs(n=2000)
    ckpt = tmp_path / "ckpt"
    gm = dmix.GaussianMixture(3, covariance_type="diag", means_init=centers, max_iter=3, tol=0,
                              random_state=0, checkpoint=str(ckpt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(x)
        resumed = dmix.resume(str(ckpt), x, max_iter=6, dtype="float32")
        whole = fit(x, "diag", centers, max_iter=6, random_state=0)
    assert resumed.dtype == "float32" and resumed.n_iter_ == 6
    np.testing.assert_allclose(resumed.lower_bounds_, whole.lower_bounds_, rtol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "1", "--device", "cpu"], r"--gpus starts one worker per GPU for --device cuda"),
    (["--gpus", "all", "--scheduler", "tcp://127.0.0.1:1"],
     r"with --scheduler, start one 'dask cuda worker SCHEDULER' process per GPU host"),
    (["--gpus", "0"], r"argument --gpus: .*0"),
    (["--compute-dtype", "float16"], r"argument --compute-dtype: invalid choice: 'float16'"),
])
def test_cli_gpu_option_errors(argv, message, capsys, tmp_path):
    data = str(tmp_path / "data.zarr")
    assert main(["make-data", data, "-n", "50", "-d", "2", "-k", "2"]) == 0
    capsys.readouterr()
    status = main(["fit", data, "-k", "2", *argv])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU: the request succeeds")
def test_cli_device_cuda_without_a_gpu(capsys, tmp_path):
    data = str(tmp_path / "data.zarr")
    assert main(["make-data", data, "-n", "50", "-d", "2", "-k", "2"]) == 0
    capsys.readouterr()
    assert main(["fit", data, "-k", "2", "--device", "cuda", "--n-workers", "1"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "device='cuda'" in err, err


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None,
                    reason="dask-cuda is installed here")
def test_cli_gpus_without_dask_cuda(capsys, tmp_path):
    data = str(tmp_path / "data.zarr")
    assert main(["make-data", data, "-n", "50", "-d", "2", "-k", "2"]) == 0
    capsys.readouterr()
    assert main(["fit", data, "-k", "2", "--gpus", "all"]) != 0
    assert "--gpus needs dask-cuda (and CuPy): pip install 'dmix[gpu]'" in capsys.readouterr().err


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cov", COVARIANCE_TYPES)
def test_gpu_fit_matches_cpu_fit(cov):
    x, centers = blobs(n=20_000, d=8)
    cpu = fit(x, cov, centers)
    gpu32 = fit(x, cov, centers, device="cuda")
    gpu64 = fit(x, cov, centers, device="cuda", dtype="float64")
    np.testing.assert_allclose(gpu64.lower_bounds_, cpu.lower_bounds_, rtol=1e-10)
    for name in PARAMS:
        np.testing.assert_allclose(getattr(gpu64, name), getattr(cpu, name), rtol=1e-8,
                                   atol=1e-10)
    # float32 E-steps (measured on an H200): mean log-densities of about -17 per row at the
    # far start err by 2.6e-6 relative; covariance entries by up to 1.1e-5 on a matrix of
    # scale 1; a row's log-density (about -10, from expanded terms of order 100) by up to
    # 9e-4.
    np.testing.assert_allclose(gpu32.lower_bounds_, cpu.lower_bounds_, rtol=1e-5)
    np.testing.assert_allclose(gpu32.means_, cpu.means_, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu32.covariances_, cpu.covariances_, rtol=1e-4, atol=3e-5)
    np.testing.assert_allclose(gpu32.predict_proba(x), cpu.predict_proba(x), atol=1e-4)
    np.testing.assert_allclose(gpu32.score_samples(x), cpu.score_samples(x), rtol=0, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("persist", [True, False])
def test_gpu_cluster_persisted_on_the_devices_or_streamed(persist):
    import cupy
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from dmix.engine.reduce import place_on_device

    x, centers = blobs(n=50_000, d=16)
    cpu = fit(x, "full", centers)
    with LocalCUDACluster(dashboard_address=None) as cluster, Client(cluster) as client:
        gpu = fit(x, "full", centers, device="cuda", client=client, persist=persist,
                  chunk_size=7_000)
        blocks = da.from_array(x, chunks=(7_000, 16))
        placed = place_on_device(blocks, client, Compute("cuda", "float32"), persist=persist)
        kinds = client.run(lambda dask_worker: sorted(
            {type(v).__module__.split(".")[0] for v in dask_worker.data.values()}))
    np.testing.assert_allclose(gpu.lower_bounds_, cpu.lower_bounds_, rtol=1e-6)
    np.testing.assert_allclose(gpu.means_, cpu.means_, rtol=0, atol=1e-4)
    assert (placed is not blocks) == persist
    if persist:
        assert any("cupy" in k for k in kinds.values()), kinds
    assert cupy.is_available()


@pytest.mark.gpu
def test_two_gpus_give_the_one_gpu_result():
    import cupy
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs; this machine has 1")
    x, centers = blobs(n=40_000, d=8)
    one = fit(x, "full", centers, device="cuda", dtype="float64")
    with LocalCUDACluster(dashboard_address=None) as cluster, Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) >= 2
        many = fit(x, "full", centers, device="cuda", dtype="float64", client=client,
                   chunk_size=5_000)
    np.testing.assert_allclose(many.lower_bounds_, one.lower_bounds_, rtol=1e-10)


@pytest.mark.gpu
def test_cupy_input_fits_like_numpy_input():
    import cupy

    x, centers = blobs(n=5_000)
    host = fit(x, "diag", centers, device="cuda")
    dev = fit(cupy.asarray(x), "diag", centers, device="cuda")
    np.testing.assert_array_equal(dev.lower_bounds_, host.lower_bounds_)
    np.testing.assert_allclose(dev.predict_proba(cupy.asarray(x[:50])), host.predict_proba(x[:50]))


def test_gpus_n_keeps_a_cuda_visible_devices_mask():
    from dmix.cli._common import first_visible_gpus

    assert first_visible_gpus(2, "") == "0,1"
    assert first_visible_gpus(2, "3,5,7") == "3,5"
    assert first_visible_gpus(4, "GPU-ab12, GPU-cd34") == "GPU-ab12,GPU-cd34"
