"""dmix.io.store (block writes, parameter sets, models) and dmix.datasets (block-wise data)."""

import uuid

import numpy as np
import pytest
import zarr

from dmix.datasets import (
    make_blobs,
    make_mixture,
    match_components,
    mixture_params,
    mixture_rows,
)
from dmix.errors import DataError, InvalidParameterError
from dmix.io.store import (
    check_alignment,
    read_model,
    read_params,
    write_blocks,
    write_params,
)


def memory_url(name: str) -> str:
    """A fresh memory:// URL (the fsspec memory filesystem is shared by the whole process)."""
    return f"memory://dmix-tests/{name}-{uuid.uuid4().hex}"


# -- datasets --------------------------------------------------------------------------------


def test_rows_do_not_depend_on_the_block_size():
    data = make_mixture(10_007, 5, 4, seed=11)
    whole = data.rows(0, data.n_samples)
    assert whole.shape == (10_007, 5) and whole.dtype == np.float64
    for block in (1, 13, 1000, 4096, 10_007):
        parts = [data.rows(s, min(s + block, data.n_samples))
                 for s in range(0, data.n_samples, block)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    # The same rows from the functional interface, and labels consistent with make_blobs.
    np.testing.assert_array_equal(mixture_rows(data.params, 11, 500, 777), whole[500:777])
    x, labels, params = make_blobs(10_007, 5, 4, seed=11)
    np.testing.assert_array_equal(x, whole)
    np.testing.assert_array_equal(labels, data.labels())
    np.testing.assert_array_equal(labels[3:9], data.labels(3, 9))
    np.testing.assert_array_equal(params["means"], data.params["means"])


def test_written_arrays_do_not_depend_on_chunks_or_shards(tmp_path):
    data = make_mixture(5_003, 3, 2, seed=4)
    a = write_blocks(tmp_path / "a.zarr", 5_003, 3, data.rows, 100)
    b = write_blocks(tmp_path / "b.zarr", 5_003, 3, data.rows, 977, shards=977 * 3,
                     max_workers=3)
    c = write_blocks(tmp_path / "c.zarr", 5_003, 3, data.rows, 7, block_rows=7 * 11)
    assert (a.chunks, b.chunks, b.shards, c.chunks) == ((100, 3), (977, 3), (2931, 3), (7, 3))
    np.testing.assert_array_equal(a[:], b[:])
    np.testing.assert_array_equal(a[:], c[:])
    np.testing.assert_array_equal(a[:], data.rows(0, 5_003))


def test_seed_determines_the_dataset():
    p1, p2 = mixture_params(4, 3, seed=1), mixture_params(4, 3, seed=1)
    for key in ("weights", "means", "covariances"):
        np.testing.assert_array_equal(p1[key], p2[key])
    other = mixture_params(4, 3, seed=2)
    assert not np.allclose(p1["means"], other["means"])
    assert not np.array_equal(make_mixture(100, 4, 3, seed=1).rows(0, 100),
                              mixture_rows(p1, 2, 0, 100))


@pytest.mark.parametrize("k, d", [(1, 1), (4, 1), (5, 3), (8, 16)])
def test_true_parameters_are_valid_and_well_separated(k, d):
    p = mixture_params(d, k, seed=3, separation=6.0, variance_range=(0.5, 2.0))
    assert p["weights"].shape == (k,) and p["means"].shape == (k, d)
    assert p["covariances"].shape == (k, d, d)
    assert np.isclose(p["weights"].sum(), 1.0, rtol=0, atol=1e-12)
    assert p["weights"].min() >= 0.5 / k - 1e-12
    np.testing.assert_array_equal(p["covariances"], np.swapaxes(p["covariances"], 1, 2))
    eig = np.linalg.eigvalsh(p["covariances"])
    assert eig.min() >= 0.5 - 1e-9 and eig.max() <= 2.0 + 1e-9
    if k > 1:
        dist = np.linalg.norm(p["means"][:, None] - p["means"][None], axis=2)
        assert dist[~np.eye(k, dtype=bool)].min() >= 6.0 * np.sqrt(2.0) - 1e-9


def test_sample_moments_match_the_truth():
    n = 200_000
    x, labels, p = make_blobs(n, 3, 3, seed=7)
    k = 3
    freq = np.bincount(labels, minlength=k) / n
    np.testing.assert_allclose(freq, p["weights"], atol=0.003)  # about 3 standard errors
    for j in range(k):
        xj = x[labels == j]
        np.testing.assert_allclose(xj.mean(axis=0), p["means"][j], atol=0.03)
        np.testing.assert_allclose(np.cov(xj.T), p["covariances"][j], atol=0.04)
    # The whole sample against the mixture's mean and covariance.
    mean = p["weights"] @ p["means"]
    second = np.einsum("k,kij->ij", p["weights"], p["covariances"]
                       + np.einsum("ki,kj->kij", p["means"], p["means"]))
    scale = np.sqrt(np.diag(second - np.outer(mean, mean)))
    np.testing.assert_allclose(x.mean(axis=0), mean, atol=0.01 * scale.max())
    np.testing.assert_allclose(np.cov(x.T), second - np.outer(mean, mean),
                               atol=0.01 * scale.max() ** 2)


def test_float32_rows_are_the_float64_rows_rounded():
    d64 = make_mixture(1000, 2, 2, seed=0)
    d32 = make_mixture(1000, 2, 2, seed=0, dtype="float32")
    assert d32.rows(0, 10).dtype == np.float32
    np.testing.assert_array_equal(d32.rows(0, 1000), d64.rows(0, 1000).astype(np.float32))


def test_dataset_arguments_are_checked():
    with pytest.raises(InvalidParameterError, match=r"n_samples must be an int >= 1. Got 0"):
        make_mixture(0, 2, 2)
    with pytest.raises(InvalidParameterError, match=r"n_components must be .* Got 2\.5 "):
        make_mixture(10, 2, 2.5)
    with pytest.raises(InvalidParameterError, match=r"seed must be an int >= 0. Got -1"):
        make_mixture(10, 2, 2, seed=-1)
    with pytest.raises(InvalidParameterError, match=r"must be float32 or float64. Got 'int32'"):
        make_mixture(10, 2, 2, dtype="int32")
    with pytest.raises(InvalidParameterError, match=r"separation must be a finite float > 0"):
        mixture_params(2, 2, separation=0)
    with pytest.raises(InvalidParameterError, match=r"stop must be <= n_samples = 10. Got 11"):
        make_mixture(10, 2, 2).rows(5, 11)


def test_match_components_recovers_a_permutation():
    means = mixture_params(3, 6, seed=5)["means"]
    perm = np.array([3, 0, 5, 1, 4, 2])
    fitted = np.empty_like(means)
    fitted[perm] = means + 0.01
    np.testing.assert_array_equal(match_components(means, fitted), perm)


# -- write_blocks ----------------------------------------------------------------------------


def test_write_blocks_refuses_misaligned_shards_before_writing(tmp_path):
    data = make_mixture(10_000, 3, 2, seed=1)
    target = tmp_path / "x.zarr"
    with pytest.raises(InvalidParameterError,
                       match=r"block_rows=300 is not a multiple of the 1000 rows of a stored "
                             r"shard"):
        write_blocks(target, 10_000, 3, data.rows, 100, shards=1000, block_rows=300)
    assert not target.exists()
    with pytest.raises(InvalidParameterError,
                       match=r"250 rows per shard is not a multiple of 100 rows per chunk"):
        write_blocks(target, 10_000, 3, data.rows, 100, shards=250)
    with pytest.raises(InvalidParameterError,
                       match=r"block_rows=150 is not a multiple of the 100 rows of a stored "
                             r"chunk"):
        write_blocks(target, 10_000, 3, data.rows, 100, block_rows=150)
    assert not target.exists()


def test_check_alignment_names_the_block():
    check_alignment([300, 300, 120], 100)  # the last block may be short
    check_alignment([100], 1000)
    with pytest.raises(InvalidParameterError,
                       match=r"block 1 \(rows 300-549\) has 250 rows, not a multiple of 100"):
        check_alignment([300, 250, 300], 100)


def test_write_blocks_round_trip_with_partial_last_shard(tmp_path):
    data = make_mixture(10_001, 4, 3, seed=2, dtype="float32")
    calls = []

    def block_fn(start, stop):
        calls.append((start, stop))
        return data.rows(start, stop)

    write_blocks(str(tmp_path / "x.zarr"), 10_001, 4, block_fn, 500, "float32", shards=1500,
                 block_rows=3000)
    # Whole shards per write, the array never in memory at once, every row written once.
    assert calls == [(0, 3000), (3000, 6000), (6000, 9000), (9000, 10_001)]
    reopened = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    assert reopened.shape == (10_001, 4) and reopened.dtype == np.float32
    assert reopened.chunks == (500, 4) and reopened.shards == (1500, 4)
    np.testing.assert_array_equal(reopened[:], data.rows(0, 10_001))


def test_write_blocks_into_a_group_on_memory_url():
    url = memory_url("group")
    data = make_mixture(1234, 2, 2, seed=0)
    arr = write_blocks(url, 1234, 2, data.rows, 100, name="X", attributes={"note": "test"})
    group = zarr.open_group(store=url, mode="r")
    np.testing.assert_array_equal(group["X"][:], data.rows(0, 1234))
    assert dict(group["X"].attrs) == {"note": "test"}
    assert arr.shape == (1234, 2)
    with pytest.raises(DataError, match=r"Cannot write array 'X' .* it already exists"):
        write_blocks(url, 1234, 2, data.rows, 100, name="X")
    write_blocks(url, 10, 2, lambda a, b: np.zeros((b - a, 2)), 5, name="X", overwrite=True)
    assert zarr.open_group(store=url, mode="r")["X"].shape == (10, 2)


def test_write_blocks_checks_blocks_and_targets(tmp_path):
    with pytest.raises(DataError, match=r"block_fn\(0, 10\) returned shape \(10, 3\); "
                                        r"expected \(10, 2\)"):
        write_blocks(tmp_path / "bad.zarr", 10, 2, lambda a, b: np.zeros((b - a, 3)), 10)
    good = lambda a, b: np.ones((b - a, 2))  # noqa: E731
    write_blocks(tmp_path / "x.zarr", 10, 2, good, 5)
    with pytest.raises(DataError, match=r"a Zarr array already exists there"):
        write_blocks(tmp_path / "x.zarr", 10, 2, good, 5)
    assert write_blocks(tmp_path / "x.zarr", 20, 2, good, 5, overwrite=True).shape == (20, 2)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"it exists and is not a Zarr array or group"):
        write_blocks(plain, 10, 2, good, 5, overwrite=True)
    assert (plain / "notes.txt").read_text() == "keep me"
    with pytest.raises(InvalidParameterError, match=r"chunk_size must be a positive int. Got 0 "
                                                     r"instead"):
        write_blocks(tmp_path / "y.zarr", 10, 2, good, 0)


# -- parameter sets and models ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_params_round_trip(tmp_path, where):
    target = str(tmp_path / "p.zarr") if where == "local" else memory_url("params")
    params = {"weights": np.array([0.25, 0.75]), "means": np.arange(6.0).reshape(2, 3),
              "scale": 2.5, "count": np.int64(7)}
    write_params(target, "truth", params)
    back = read_params(target, "truth")
    assert sorted(back) == ["count", "means", "scale", "weights"]
    np.testing.assert_array_equal(back["means"], params["means"])
    np.testing.assert_array_equal(back["weights"], params["weights"])
    assert back["scale"].shape == () and back["scale"] == 2.5
    assert back["count"] == 7 and back["count"].dtype == np.int64
    with pytest.raises(DataError, match=r"No parameter group 'other'"):
        read_params(target, "other")


def _fitted_like(k=3, d=2):
    p = mixture_params(d, k, seed=9)
    chol = np.linalg.cholesky(p["covariances"])
    p["precisions_cholesky"] = np.linalg.inv(chol).swapaxes(1, 2)
    return p


@pytest.mark.parametrize("where", ["local", "memory"])
def test_raw_reader_reads_saved_models(tmp_path, where):
    import dmix
    from dmix.io.model import save_model

    path = str(tmp_path / "model") if where == "local" else memory_url("model")
    x = np.random.default_rng(0).normal(size=(60, 2))
    est = dmix.GaussianMixture(2, random_state=0).fit(x)
    save_model(est, path)
    family, params, attrs = read_model(path)
    assert family["name"] == "gaussian" and family["covariance_type"] == "full"
    np.testing.assert_array_equal(params["means"], est.means_)
    assert attrs["n_iter_"] == est.n_iter_ and attrs["dmix_version"] == dmix.__version__


def test_load_model_errors(tmp_path):
    with pytest.raises(DataError, match=r"No dmix model found at '.*missing': the path does"):
        read_model(tmp_path / "missing")
    with pytest.raises(DataError, match=r"No dmix model found at 'memory://.*': the path does"):
        read_model(memory_url("missing"))
    data = tmp_path / "data.zarr"
    write_blocks(data, 10, 2, lambda a, b: np.ones((b - a, 2)), 5, name="X")
    with pytest.raises(DataError, match=r"it is a Zarr group whose 'schema' attribute is None"):
        read_model(data)
    with pytest.raises(DataError, match=r"it is a Zarr array"):
        read_model(data / "X")
