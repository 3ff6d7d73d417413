"""``dmix score``, ``predict`` and ``sample``, run in process on one module-wide cluster."""

import re

import numpy as np
import pytest
import zarr

from dmix import GaussianMixture
from dmix.cli import main
from dmix.cli.infer import _row_seed, load_estimator
from dmix.datasets import make_blobs, mixture_rows
from dmix.families.covariance import get_covariance
from dmix.io.model import save_model
from dmix.io.store import write_blocks

N, D, K, SEED, STORED = 3000, 3, 3, 7, 500


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _save(est, x, path):
    """Save ``est`` as ``dmix fit --output`` does."""
    save_model(est, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data (NumPy and Zarr), full and diag models saved from in-memory fits, a cluster."""
    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("infer")
    x, _, _ = make_blobs(N, D, K, seed=SEED)
    data = root / "data.zarr"
    write_blocks(data, N, D, lambda a, b: x[a:b], STORED, name="X")
    models = {}
    for cov in ("full", "diag"):
        est = GaussianMixture(K, covariance_type=cov, random_state=0).fit(x)
        models[cov] = (est, root / f"model-{cov}")
        _save(est, x, models[cov][1])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        yield {"x": x, "data": data, "models": models, "root": root,
               "scheduler": cluster.scheduler_address}


def test_help_lists_the_inference_commands(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert re.search(r"^\s+score\s+write the log-density of every row to Zarr$", out, re.MULTILINE)
    assert re.search(r"^\s+predict\s+write the most probable component of every row", out,
                     re.MULTILINE)
    assert re.search(r"^\s+sample\s+draw rows from a saved model into Zarr$", out, re.MULTILINE)
    for command in ("score", "predict", "sample"):
        status, out, _ = run(capsys, command, "--help")
        assert status == 0
        assert "--model MODEL_DIR" in out and "--output OUT.zarr" in out
        assert "--scheduler ADDRESS" in out and "--chunk-size ROWS" in out


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_load_estimator(setup, cov):
    est, path = setup["models"][cov]
    loaded = load_estimator(path, chunk_size=123)
    assert loaded.chunk_size == 123 and loaded.client is None
    assert loaded.covariance_type == cov and loaded.n_components == K
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(est, name))
    assert loaded.lower_bounds_ == est.lower_bounds_ and loaded.lower_bound_ == est.lower_bound_
    assert (loaded.n_iter_, loaded.converged_, loaded.n_features_in_) == (
        est.n_iter_, est.converged_, D)
    assert loaded.random_state == 0
    x = setup["x"]
    np.testing.assert_array_equal(loaded.score_samples(x), est.score_samples(x))
    np.testing.assert_array_equal(loaded.predict(x), est.predict(x))


def test_score(setup, capsys):
    est, model = setup["models"]["full"]
    out_path = setup["root"] / "scores.zarr"
    # 700-row blocks: the last one has 200 rows, and no block matches the stored chunks.
    status, out, err = run(capsys, "score", setup["data"], "--model", model, "--output",
                           out_path, "--chunk-size", 700, "--scheduler", setup["scheduler"])
    assert status == 0, err
    assert f"{N} rows x {D} features, float64, 5 block(s) of up to 700 rows" in out
    group = zarr.open_group(str(out_path), mode="r")
    log_density = group["log_density"]
    assert log_density.shape == (N,) and log_density.dtype == np.float64
    assert log_density.chunks == (700,)
    expected = est.score_samples(setup["x"])
    np.testing.assert_allclose(log_density[:], expected, rtol=1e-12, atol=0)

    printed = float(re.search(r"^Mean log-likelihood per row: (\S+)$", out, re.MULTILINE)[1])
    assert printed == pytest.approx(est.score(setup["x"]), rel=1e-12, abs=0)
    assert printed == pytest.approx(expected.mean(), rel=1e-12, abs=0)
    attrs = group.attrs["dmix_output"]
    assert attrs["command"] == "score" and attrs["n_samples"] == N
    assert attrs["mean_log_likelihood"] == printed

    # An existing output is kept unless --overwrite.
    status, _, err = run(capsys, "score", setup["data"], "-m", model, "-o", out_path,
                         "--scheduler", setup["scheduler"])
    assert status == 1
    assert err.strip() == (
        f"dmix score: error: Cannot write the log-densities to '{out_path}': a Zarr group "
        "already exists there. Choose another path or pass overwrite=True (--overwrite on the "
        "command line).")
    status, _, err = run(capsys, "score", setup["data"], "-m", model, "-o", out_path,
                         "--scheduler", setup["scheduler"], "--overwrite")
    assert status == 0, err
    log_density = zarr.open_group(str(out_path), mode="r")["log_density"]
    assert log_density.chunks == (N,)  # the default: one block of the whole small array
    np.testing.assert_allclose(log_density[:], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("proba", [False, True])
def test_predict(setup, capsys, proba):
    est, model = setup["models"]["diag"]
    out_path = setup["root"] / f"predict-{proba}.zarr"
    status, out, err = run(capsys, "predict", setup["data"], "--array", "X", "--model", model,
                           "--output", out_path, "--chunk-size", 1000,
                           "--scheduler", setup["scheduler"], *(["--proba"] if proba else []))
    assert status == 0, err
    x = setup["x"]
    group = zarr.open_group(str(out_path), mode="r")
    labels = group["labels"]
    assert labels.dtype == np.int64 and labels.shape == (N,) and labels.chunks == (1000,)
    np.testing.assert_array_equal(labels[:], est.predict(x))
    counts = np.bincount(est.predict(x), minlength=K)
    assert f"Rows per component: {' '.join(map(str, counts))}" in out
    assert group.attrs["dmix_output"]["counts"] == counts.tolist()
    if proba:
        p = group["proba"]
        assert p.dtype == np.float64 and p.shape == (N, K) and p.chunks == (1000, K)
        np.testing.assert_allclose(p[:].sum(axis=1), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(p[:], est.predict_proba(x), rtol=1e-12, atol=1e-15)
    else:
        assert "proba" not in group


def _sample(setup, capsys, name, *argv, cov="full"):
    path = setup["root"] / name
    status, out, err = run(capsys, "sample", "--model", setup["models"][cov][1],
                           "--output", path, *argv)
    assert status == 0, err
    group = zarr.open_group(str(path), mode="r")
    return group["X"][:], group["labels"][:], group, out


def test_sample_does_not_depend_on_the_chunk_size(setup, capsys):
    n = 10_001
    cluster = ("--scheduler", setup["scheduler"])
    x1, l1, g1, _ = _sample(setup, capsys, "s1000.zarr", "-n", n, "--seed", SEED,
                            "--chunk-size", 1000, *cluster)
    x3, l3, g3, out = _sample(setup, capsys, "s3000.zarr", "-n", n, "--seed", SEED,
                              "--chunk-size", 3000, *cluster)
    assert g1["X"].chunks == (1000, D) and g3["X"].chunks == (3000, D)
    assert x1.shape == (n, D) and x1.dtype == np.float64 and l1.dtype == np.int64
    np.testing.assert_array_equal(x1, x3)
    np.testing.assert_array_equal(l1, l3)
    assert f"Rows per component: {' '.join(map(str, np.bincount(l1, minlength=K)))}" in out

    # The rows are those of mixture_rows at the model, with a seed derived from --seed ...
    est = setup["models"]["full"][0]
    params = {"weights": est.weights_, "means": est.means_, "covariances": est.covariances_}
    row_seed = g1.attrs["dmix_output"]["row_seed"]
    assert row_seed == _row_seed(SEED) != SEED
    x, labels = mixture_rows(params, row_seed, 0, n, return_labels=True)
    np.testing.assert_array_equal(x1, x)
    np.testing.assert_array_equal(l1, labels)
    # ... so they do not repeat the noise of the data made with the same seed.
    assert np.abs(x1[:N] - setup["x"]).min() > 0

    x2, _, _, _ = _sample(setup, capsys, "s-other.zarr", "-n", n, "--seed", SEED + 1, *cluster)
    assert not np.array_equal(x1, x2)


def test_sample_matches_the_model(setup, capsys):
    """Frequencies, mean and covariance of a large sample, within 5 standard errors."""
    n = 200_000
    est = setup["models"]["diag"][0]
    x, labels, _, _ = _sample(setup, capsys, "large.zarr", "-n", n, "--seed", 1,
                              "--chunk-size", 30_000, "--scheduler", setup["scheduler"],
                              cov="diag")
    w = est.weights_
    freq = np.bincount(labels, minlength=K) / n
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / n)), (freq, w)

    dense = get_covariance("diag").dense(est.covariances_, K, D)
    mean = w @ est.means_
    cov = np.einsum("k,kij->ij", w, dense + est.means_[:, :, None] * est.means_[:, None, :])
    cov -= np.outer(mean, mean)
    centred = x - mean
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(axis=0) - mean) < 5 * se_mean)
    products = centred[:, :, None] * centred[:, None, :]  # (n, D, D)
    se_cov = products.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(products.mean(axis=0) - cov) < 5 * se_cov)
    # Within each component: the component's own mean and (diagonal) variances.
    for j in range(K):
        xj = x[labels == j]
        assert np.all(np.abs(xj.mean(axis=0) - est.means_[j])
                      < 5 * np.sqrt(est.covariances_[j] / len(xj)))
        assert np.all(np.abs(xj.var(axis=0) / est.covariances_[j] - 1)
                      < 5 * np.sqrt(2 / len(xj)))


def test_sample_starts_a_local_cluster(setup, capsys):
    _, _, _, out = _sample(setup, capsys, "local.zarr", "-n", 100, "--seed", 0,
                           "--n-workers", 1, "--dashboard-address", ":0")
    assert "Started a local Dask cluster: 1 worker process(es) x 1 thread" in out
    assert re.search(r"^Wrote .*local\.zarr: X \(100, 3\) float64, labels \(100,\) int64; "
                     r"1 block\(s\) of up to 100 rows", out, re.MULTILINE)


def test_errors(setup, capsys):
    root, scheduler = setup["root"], setup["scheduler"]
    model = setup["models"]["full"][1]
    narrow = root / "narrow.zarr"
    write_blocks(narrow, 10, 2, lambda a, b: np.zeros((b - a, 2)), 10, name="X")

    def error(*argv):
        status, _, err = run(capsys, *argv, "--scheduler", scheduler)
        assert status == 1 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        return err.strip()

    assert error("score", setup["data"], "-m", root / "nothing", "-o", root / "o1.zarr") == (
        f"dmix score: error: No dmix model found at '{root / 'nothing'}': the path does not "
        "exist.")
    assert error("predict", narrow, "-m", model, "-o", root / "o2.zarr") == (
        f"dmix predict: error: {narrow} (array 'X') has 2 features, but the model "
        f"'{model}' was fitted on {D} features.")
    assert error("predict", setup["data"], "-m", setup["data"], "-o", root / "o3.zarr") == (
        f"dmix predict: error: No dmix model found at '{setup['data']}': it is a Zarr group "
        "whose 'schema' attribute is None, not 'dmix-model/1'.")
    err = error("score", setup["data"], "-m", model, "-o", setup["data"], "--overwrite")
    assert err == (f"dmix score: error: Cannot write the log-densities to '{setup['data']}': "
                   f"it is, or contains, the input '{setup['data']}'. Choose another path.")
    err = error("sample", "-m", model, "-o", setup["models"]["diag"][1], "-n", 5, "--overwrite")
    assert "Refusing to overwrite" in err and "it holds a dmix model" in err
    err = error("sample", "-m", model, "-o", setup["data"], "-n", 5)
    assert "Cannot write the samples to" in err and "already exists there" in err
    for name in ("o1.zarr", "o2.zarr", "o3.zarr"):
        assert not (root / name).exists()

    # A failure on the workers removes the partial output.
    bad = root / "nan.zarr"
    write_blocks(bad, 100, D, lambda a, b: np.full((b - a, D), np.nan if a else 0.0), 50,
                 name="X", block_rows=50)
    assert error("score", bad, "-m", model, "-o", root / "o4.zarr", "--chunk-size", 50) == (
        f"dmix score: error: Input X contains NaN or infinity: chunk 1 (rows 50-99) of {bad} "
        "(array 'X') has 50 row(s) with non-finite values, the first at row 50. Remove or "
        "impute those rows.")
    assert not (root / "o4.zarr").exists()
