"""The ``dmix`` command, run in process through ``main([...])`` and once as a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from dmix import GaussianMixture
from dmix.cli import main
from dmix.datasets import make_mixture, match_components
from dmix.io.store import read_model

N, D, K, SEED, CHUNK = 20_000, 3, 3, 3, 2_000

ITERATION_LINE = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(\S+)\s+(\d+\.\d+)\s*$", re.MULTILINE)


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "data.zarr"
    status = main(["make-data", str(path), "--n-samples", str(N), "--n-features", str(D),
                   "--n-components", str(K), "--seed", str(SEED), "--chunk-size", str(CHUNK),
                   "--shard-size", str(2 * CHUNK)])
    assert status == 0
    return path


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def test_make_data_writes_the_array_and_the_truth(data_path, capsys, tmp_path):
    group = zarr.open_group(str(data_path), mode="r")
    x = group["X"]
    assert x.shape == (N, D) and x.dtype == np.float64
    assert x.chunks == (CHUNK, D) and x.shards == (2 * CHUNK, D)
    expected = make_mixture(N, D, K, SEED)
    np.testing.assert_array_equal(x[:], expected.rows(0, N))
    for key in ("weights", "means", "covariances"):
        np.testing.assert_array_equal(group["truth"][key][...], expected.params[key])
    assert group.attrs["dmix_dataset"]["seed"] == SEED

    # The same dataset written with other chunks is bit-identical.
    status, out, _ = run(capsys, "make-data", tmp_path / "other.zarr", "-n", N, "-d", D,
                         "-k", K, "--seed", SEED, "--chunk-size", 777, "--threads", 1)
    assert status == 0
    assert f"shape ({N}, {D}), float64, 26 chunk(s) of 777 rows" in out
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "other.zarr"))["X"][:], x[:])

    status, out, _ = run(capsys, "make-data", tmp_path / "f32.zarr", "-n", 100, "-d", 2,
                         "-k", 2, "--dtype", "float32")
    assert status == 0 and "float32" in out
    assert zarr.open_group(str(tmp_path / "f32.zarr"))["X"].dtype == np.float32


@pytest.mark.parametrize("codec, compressor", [
    ("none", None), ("zstd", "ZstdCodec"), ("blosc-lz4", "BloscCodec")])
def test_make_data_codecs_store_the_same_values(tmp_path, codec, compressor):
    out = str(tmp_path / f"{codec}.zarr")
    assert main(["make-data", out, "-n", "3000", "-d", "3", "-k", "2", "--chunk-size", "1000",
                 "--codec", codec]) == 0
    x = zarr.open_array(out + "/X", mode="r")
    assert [type(c).__name__ for c in x.compressors] == ([compressor] if compressor else [])
    expected = make_mixture(3000, 3, 2, 0).rows(0, 3000)
    np.testing.assert_array_equal(x[...], expected)


def test_fit_on_a_scheduler_then_info(data_path, scheduler, capsys, tmp_path):
    model = tmp_path / "model"
    status, out, err = run(capsys, "fit", data_path, "--n-components", K, "--covariance-type",
                           "full", "--seed", 0, "--chunk-size", 4000, "--scheduler", scheduler,
                           "--output", model)
    assert status == 0, err
    assert f"Connected to the Dask scheduler at {scheduler} (2 workers)" in out
    assert re.search(r"Dask dashboard: http://\S+/status", out)
    assert f"{N} rows x {D} features, float64, 5 block(s) of up to 4000 rows" in out

    family, params, attrs = read_model(model)
    assert {k: family[k] for k in ("name", "covariance_type", "reg_covar", "prior", "cem")} == {
        "name": "gaussian", "covariance_type": "full", "reg_covar": 1e-6, "prior": None,
        "cem": False}
    iterations = ITERATION_LINE.findall(out)
    assert len(iterations) == attrs["n_iter_"] == len(attrs["lower_bounds_"]) >= 2
    assert [int(i[0]) for i in iterations] == list(range(1, attrs["n_iter_"] + 1))
    np.testing.assert_allclose([float(i[1]) for i in iterations], attrs["lower_bounds_"],
                               atol=1e-6)
    assert iterations[0][2] == "inf"
    assert attrs["converged_"] is True and attrs["n_features_in_"] == D
    assert attrs["settings"]["random_state"] == 0 and attrs["data"]["shape"] == [N, D]
    assert f"Lower bound (mean log-likelihood per row): {attrs['lower_bound_']:.6f}" in out
    assert f"Saved the model to {model}" in out

    # The fit recovers the truth ...
    truth = make_mixture(N, D, K, SEED).params
    order = match_components(truth["means"], params["means"])
    np.testing.assert_allclose(params["weights"][order], truth["weights"], atol=0.01)
    np.testing.assert_allclose(params["means"][order], truth["means"], atol=0.05)
    np.testing.assert_allclose(params["covariances"][order], truth["covariances"], atol=0.1)
    # ... and is the in-memory fit, whatever the chunking and the workers.
    x = zarr.open_group(str(data_path), mode="r")["X"][:]
    local = GaussianMixture(K, random_state=0, chunk_size=7_000).fit(x)
    np.testing.assert_allclose(local.lower_bounds_, attrs["lower_bounds_"], rtol=1e-12)
    np.testing.assert_allclose(local.means_, params["means"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(local.covariances_, params["covariances"], rtol=0, atol=1e-9)

    status, out, err = run(capsys, "info", model)
    assert status == 0, err
    assert re.search(r"family\s+gaussian", out)
    assert re.search(r"covariance type\s+full", out)
    assert re.search(rf"n_components\s+{K}\n", out)
    assert re.search(rf"n_features\s+{D}\n", out)
    assert re.search(rf"n_iter\s+{attrs['n_iter_']}\n", out)
    assert re.search(r"converged\s+True", out)
    assert f"{attrs['lower_bound_']:.6f}" in out
    for j in range(K):
        assert f"{params['weights'][j]:.4f}" in out
        assert f"{params['means'][j][0]:.4f}" in out

    # A second fit may not replace the model unless asked to.
    status, _, err = run(capsys, "fit", data_path, "-k", K, "--scheduler", scheduler,
                         "--output", model)
    assert status == 1
    assert "a Zarr group already exists there" in err and "--overwrite" in err


def test_fit_reports_errors_raised_during_the_fit(scheduler, capsys, tmp_path):
    tiny = tmp_path / "tiny.zarr"
    assert main(["make-data", str(tiny), "-n", "20", "-d", "2", "-k", "2"]) == 0
    status, out, err = run(capsys, "fit", tiny, "-k", 50, "--scheduler", scheduler)
    assert status == 1
    assert re.search(r"^Seed: (\d+) \(pass --seed \1 to repeat this fit\)$", out, re.MULTILINE)
    assert err.strip().splitlines()[-1] == (
        "dmix fit: error: Expected n_samples >= n_components but got n_components = 50, "
        "n_samples = 20")
    assert "Traceback" not in err


def test_unreachable_scheduler(data_path, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        status, _, err = run(capsys, "fit", data_path, "-k", 2, "--scheduler",
                             "tcp://127.0.0.1:9")
    assert status == 1
    assert re.search(r"dmix fit: error: Could not connect to the Dask scheduler at "
                     r"'tcp://127\.0\.0\.1:9': Timed out", err), err


def test_quickstart(scheduler, capsys, tmp_path):
    status, out, err = run(capsys, "quickstart", "--n-samples", 20_000, "--n-features", 3,
                           "--n-components", 3, "--scheduler", scheduler, "--out", tmp_path)
    assert status == 0, err
    assert "20000 rows x 3 features, float64, 8 block(s) of up to 2500 rows" in out
    errors = re.search(r"Max \|weight error\| = (\S+); max \|\|mean error\|\| = (\S+)", out)
    assert float(errors[1]) < 0.02 and float(errors[2]) < 0.1
    assert re.search(r"The Dask dashboard was at http://\S+", out)
    assert zarr.open_group(str(tmp_path / "data.zarr"), mode="r")["X"].shape == (20_000, 3)


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["fit", "{tmp}/missing.zarr", "-k", "2"], 1,
         r"dmix fit: error: No Zarr array or group found at '.*missing\.zarr'\."),
        (["fit", "{tmp}/data.zarr", "-k", "2", "--covariance-type", "bogus"], 2,
         r"argument --covariance-type: invalid choice: 'bogus' "
         r"\(choose from '?full'?, '?tied'?, "),
        (["fit", "{tmp}/data.zarr", "-k", "0"], 2,
         r"argument --n-components/-k: expected a positive integer, got '0'"),
        (["fit", "{tmp}/data.zarr", "-k", "2", "--tol", "-1"], 2,
         r"argument --tol: expected a finite number >= 0, got '-1'"),
        (["fit", "{tmp}/data.zarr", "-k", "2", "--output", "{tmp}/data.zarr"], 1,
         r"dmix fit: error: Cannot write a dmix model to '.*data\.zarr': a Zarr group already"),
        (["fit", "{tmp}/data.zarr", "-k", "2", "--output", "{tmp}/data.zarr", "--overwrite"], 1,
         r"Refusing to overwrite '.*data\.zarr': it holds a Zarr group that is not a dmix "
         r"model"),
        (["info", "{tmp}/data.zarr"], 1,
         r"dmix info: error: No dmix model found at '.*data\.zarr': it is a Zarr group whose "
         r"'schema' attribute is None"),
        (["info", "{tmp}/nothing"], 1, r"No dmix model found at '.*nothing': the path does"),
        (["make-data", "{tmp}/data.zarr", "-n", "10", "-d", "2", "-k", "2"], 1,
         r"dmix make-data: error: Cannot write a dataset to '.*data\.zarr': a Zarr group "
         r"already exists there"),
        (["make-data", "{tmp}/new.zarr", "-n", "10", "-d", "2", "-k", "2", "--chunk-size", "4",
          "--shard-size", "6"], 1,
         r"shards must be a multiple of chunk_size: 6 rows per shard is not a multiple of 4"),
        (["make-data", "{tmp}/new.zarr", "-n", "10", "-d", "2"], 1,
         r"make-data needs -d/--n-features and -k/--n-components for a Gaussian mixture, "
         r"or --shape"),
        ([], 2, r"the following arguments are required: COMMAND"),
        (["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
    ],
)
def test_errors(argv, status, message, capsys, tmp_path):
    data = str(tmp_path / "data.zarr")
    assert main(["make-data", data, "-n", "50", "-d", "2", "-k", "2"]) == 0
    capsys.readouterr()
    got, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == status
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_help_and_version(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for command in ("make-data", "fit", "info", "quickstart"):
        assert command in out
    status, out, _ = run(capsys, "fit", "--help")
    assert status == 0 and "--scheduler ADDRESS" in out and "--covariance-type TYPE" in out
    import dmix

    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"dmix {dmix.__version__}"


def _dmix_command() -> list[str]:
    script = Path(sys.executable).with_name("dmix")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dmix.cli"]


@pytest.mark.slow
def test_command_line_end_to_end(tmp_path):
    """``dmix make-data`` then ``dmix fit`` (with its own local cluster) as real processes."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    data, model = tmp_path / "d.zarr", tmp_path / "m"
    made = subprocess.run(
        [*_dmix_command(), "make-data", str(data), "--n-samples", "30000", "--n-features", "2",
         "--n-components", "2", "--seed", "5", "--chunk-size", "5000"],
        capture_output=True, text=True, timeout=120, env=env)
    assert made.returncode == 0, made.stderr
    assert f"Wrote {data}" in made.stdout
    fitted = subprocess.run(
        [*_dmix_command(), "fit", str(data), "--n-components", "2", "--seed", "1",
         "--covariance-type", "diag", "--n-workers", "1", "--dashboard-address", ":0",
         "--output", str(model)],
        capture_output=True, text=True, timeout=180, env=env)
    assert fitted.returncode == 0, fitted.stderr
    assert "Started a local Dask cluster: 1 worker process(es) x 1 thread" in fitted.stdout
    assert re.search(r"Dask dashboard: http://\S+/status", fitted.stdout)
    family, params, attrs = read_model(model)
    assert family["covariance_type"] == "diag" and params["covariances"].shape == (2, 2)
    assert len(ITERATION_LINE.findall(fitted.stdout)) == attrs["n_iter_"]
    truth = make_mixture(30_000, 2, 2, 5).params
    order = match_components(truth["means"], params["means"])
    np.testing.assert_allclose(params["weights"][order], truth["weights"], atol=0.01)
    bad = subprocess.run([*_dmix_command(), "fit", str(tmp_path / "nope.zarr"), "-k", "2"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith(f"No Zarr array or group found at "
                                       f"'{tmp_path / 'nope.zarr'}'.")
