"""Tests of dmix.io.source (every input becomes a row-chunked Dask array) and of the data
errors that fit and predict raise."""

from __future__ import annotations

import re
import uuid

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import dmix
from dmix.errors import DataError
from dmix.io.source import DEFAULT_BLOCK_BYTES, Source, as_source

FITTED = ["weights_", "means_", "covariances_", "precisions_cholesky_"]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def data(n=120, d=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n // 2, d)), rng.normal(size=(n - n // 2, d)) + 4])
    return x[rng.permutation(n)].astype(dtype)


def assert_same_fit(a, b, rtol=1e-10):
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol)
    for name in FITTED:
        ref = getattr(b, name)
        np.testing.assert_allclose(getattr(a, name), ref, rtol=rtol,
                                   atol=rtol * np.abs(ref).max(), err_msg=name)


# -- NumPy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_float_kept_without_copy(dtype):
    x = data(dtype=dtype)
    src = as_source(x)
    assert isinstance(src, Source)
    assert src.dtype == dtype and src.array.dtype == dtype
    assert src.shape == x.shape
    assert src.in_memory is True
    assert src.local is x  # validated, not copied
    assert src.array.chunks == ((120,), (3,))
    np.testing.assert_array_equal(src.array.compute(), x)
    assert src.description == "the input array"


@pytest.mark.parametrize("dtype",
                         [np.int8, np.int32, np.int64, np.uint16, np.bool_, np.float16])
def test_numpy_other_real_dtypes_become_float64(dtype):
    x = (data() * 3).astype(dtype)
    src = as_source(x)
    assert src.dtype == np.float64
    assert src.local.dtype == np.float64
    np.testing.assert_array_equal(src.array.compute(), x.astype(np.float64))


def test_numpy_list_input():
    src = as_source([[1, 2], [3, 4], [5, 6]])
    assert src.dtype == np.float64 and src.shape == (3, 2)
    np.testing.assert_array_equal(src.array.compute(), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


def test_numpy_chunk_size_and_default_blocks():
    x = data(n=101)
    src = as_source(x, chunk_size=10)
    assert src.array.chunks == ((10,) * 10 + (1,), (3,))
    assert as_source(x, chunk_size=1).array.numblocks == (101, 1)
    # default: equal blocks of at most about DEFAULT_BLOCK_BYTES (80 MB: 3 blocks)...
    wide = np.zeros((10_000, 2000), dtype=np.float32)
    assert DEFAULT_BLOCK_BYTES // (2000 * 4) == 4194
    assert as_source(wide).array.chunks[0] == (3334, 3334, 3332)
    # ... in a multiple of the worker threads, so that each gets the same work
    assert as_source(wide, slots=2).array.chunks[0] == (2500,) * 4
    assert as_source(x, slots=3).array.chunks[0] == (34, 34, 33)
    assert as_source(da.from_array(wide, chunks=(10_000, 500)), slots=5).array.chunks[0] == (
        (2000,) * 5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_invalid_chunk_size(bad):
    with pytest.raises(DataError, match=re.escape(
            f"chunk_size must be a positive int or None. Got {bad!r} instead.")):
        as_source(data(), chunk_size=bad)


# -- Dask ----------------------------------------------------------------------------------


def test_dask_column_chunks_merged_rows_kept():
    x = data(n=100, d=5)
    arr = da.from_array(x, chunks=((10, 30, 1, 59), (2, 2, 1)))
    src = as_source(arr)
    assert src.array.chunks == ((10, 30, 1, 59), (5,))
    assert src.in_memory is False and src.local is None
    assert src.description == "the Dask array"
    np.testing.assert_array_equal(src.array.compute(), x)


def test_dask_single_row_chunk_gets_default_blocks_and_chunk_size_rechunks():
    x = data(n=100, d=5)
    single = as_source(da.from_array(x, chunks=(100, 2)))
    assert single.array.chunks == ((100,), (5,))
    src = as_source(da.from_array(x, chunks=(13, 5)), chunk_size=7)
    assert src.array.chunks == ((7,) * 14 + (2,), (5,))
    np.testing.assert_array_equal(src.array.compute(), x)


def test_dask_int_and_float32_dtypes():
    x = data(n=40)
    ints = da.from_array((x * 10).astype(np.int16), chunks=(8, 3))
    assert as_source(ints).dtype == np.float64
    assert as_source(da.from_array(x.astype(np.float32), chunks=(8, 3))).dtype == np.float32


def test_dask_unknown_chunks():
    x = da.from_array(data(n=40), chunks=(8, 3))
    unknown = x[x[:, 0] > 0]
    with pytest.raises(DataError, match=re.escape(
            "the Dask array has unknown chunk sizes; call compute_chunk_sizes() first.")):
        as_source(unknown)


# -- Zarr ----------------------------------------------------------------------------------


def test_zarr_array_object(tmp_path):
    x = data(n=90)
    z = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(20, 3), dtype="f4")
    z[:] = x.astype(np.float32)
    src = as_source(z)
    assert src.dtype == np.float32
    assert src.in_memory is False
    # one block: a multiple of the stored chunks near the target size (all 90 rows)
    assert src.array.chunks == ((90,), (3,))
    np.testing.assert_array_equal(src.array.compute(), x.astype(np.float32))
    assert as_source(z, chunk_size=40).array.chunks == ((40, 40, 10), (3,))


def test_zarr_int_array_becomes_float64(tmp_path):
    z = zarr.create_array(tmp_path / "i.zarr", shape=(10, 2), chunks=(5, 2), dtype="i4")
    z[:] = np.arange(20).reshape(10, 2)
    src = as_source(z)
    assert src.dtype == np.float64
    np.testing.assert_array_equal(src.array.compute(), np.arange(20.0).reshape(10, 2))


def test_path_to_array(tmp_path):
    x = data(n=50)
    path = tmp_path / "arr.zarr"
    zarr.create_array(path, shape=x.shape, chunks=(7, 3), dtype="f8")[:] = x
    for p in (path, str(path)):
        src = as_source(p)
        assert src.description == str(path)
        np.testing.assert_array_equal(src.array.compute(), x)
    assert as_source(path, chunk_size=7).array.chunks[0] == (7,) * 7 + (1,)


def test_path_to_group_with_X(tmp_path):
    x = data(n=50)
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("X", shape=x.shape, chunks=(10, 3), dtype="f8")[:] = x
    g.create_array("labels", shape=(50,), chunks=(10,), dtype="i8")
    src = as_source(tmp_path / "g.zarr")
    assert src.description == f"{tmp_path / 'g.zarr'} (array 'X')"
    np.testing.assert_array_equal(src.array.compute(), x)


def test_path_to_group_with_one_array(tmp_path):
    x = data(n=30)
    g = zarr.open_group(tmp_path / "g1.zarr", mode="w")
    g.create_array("data", shape=x.shape, chunks=(10, 3), dtype="f8")[:] = x
    src = as_source(tmp_path / "g1.zarr")
    assert src.description.endswith("(array 'data')")
    np.testing.assert_array_equal(src.array.compute(), x)


def test_group_with_several_arrays_and_component(tmp_path):
    a, b = data(n=30, seed=1), data(n=40, d=2, seed=2)
    g = zarr.open_group(tmp_path / "multi.zarr", mode="w")
    g.create_array("a", shape=a.shape, chunks=(10, 3), dtype="f8")[:] = a
    g.create_array("b", shape=b.shape, chunks=(10, 2), dtype="f8")[:] = b
    path = tmp_path / "multi.zarr"
    with pytest.raises(DataError, match=re.escape(
            f"{str(path)!r} is a Zarr group with arrays ['a', 'b']; name the one to fit "
            f"(component=..., or the path {path}/NAME).")):
        as_source(path)
    src = as_source(path, component="b")
    assert src.shape == (40, 2)
    assert src.description == f"{path} (array 'b')"
    np.testing.assert_array_equal(src.array.compute(), b)
    np.testing.assert_array_equal(as_source(path / "a").array.compute(), a)
    # the estimator fits the group's array named by a path
    with pytest.raises(DataError, match="is a Zarr group with arrays"):
        dmix.GaussianMixture(2).fit(path)


def test_fsspec_memory_url():
    x = data(n=60)
    url = f"memory://dmix-test-{uuid.uuid4().hex}/x.zarr"
    z = zarr.open_array(url, mode="w", shape=x.shape, chunks=(16, 3), dtype="f8")
    z[:] = x
    src = as_source(url)
    assert src.description == url
    np.testing.assert_array_equal(src.array.compute(), x)
    gm_url = dmix.GaussianMixture(2, random_state=0, chunk_size=16).fit(url)
    gm_mem = dmix.GaussianMixture(2, random_state=0, chunk_size=16).fit(x)
    assert_same_fit(gm_url, gm_mem)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(DataError, match=re.escape(f"No Zarr array or group found at "
                                                  f"{str(missing)!r}.")):
        as_source(missing)
    with pytest.raises(DataError, match="No Zarr array or group found at"):
        dmix.GaussianMixture(2).fit(str(missing))


def test_sharded_array_blocks_are_multiples_of_the_shard(tmp_path):
    # 40 000 bytes per row: 40 MB make 2 blocks of 500 rows, 5 shards of 100 rows each, never
    # a multiple of the inner chunks of 10 rows only. Nothing is written (fill value 0).
    z = zarr.create_array(tmp_path / "sharded.zarr", shape=(1000, 10_000), chunks=(10, 10_000),
                          shards=(100, 10_000), dtype="f4")
    src = as_source(z)
    assert src.array.chunks == ((500, 500), (10_000,))
    assert as_source(z, slots=3).array.chunks == ((400, 400, 200), (10_000,))
    # shard larger than the default block: one shard per block
    big = zarr.create_array(tmp_path / "bigshard.zarr", shape=(3000, 10_000),
                            chunks=(100, 10_000), shards=(1000, 10_000), dtype="f4")
    assert as_source(big).array.chunks[0] == (1000, 1000, 1000)
    # and from a path
    assert as_source(tmp_path / "sharded.zarr").array.chunks == ((500, 500), (10_000,))


def test_sharded_array_values_and_fit(tmp_path):
    x = data(n=200, d=4, seed=3)
    z = zarr.create_array(tmp_path / "s.zarr", shape=x.shape, chunks=(5, 4), shards=(40, 4),
                          dtype="f8")
    z[:] = x
    src = as_source(z)
    assert all(c % 40 == 0 for c in src.array.chunks[0][:-1])
    np.testing.assert_array_equal(src.array.compute(), x)
    kw = dict(random_state=3, tol=1e-8)
    assert_same_fit(dmix.GaussianMixture(2, **kw).fit(z), dmix.GaussianMixture(2, **kw).fit(x))


@pytest.mark.parametrize("init", ["kmeans", "user"])
def test_fit_from_zarr_on_disk_equals_in_memory(tmp_path, init):
    x = data(n=150, d=3, seed=4)
    path = tmp_path / "fit.zarr"
    zarr.create_array(path, shape=x.shape, chunks=(17, 3), dtype="f8")[:] = x
    kw = dict(random_state=7, tol=1e-8, max_iter=200)
    if init == "user":
        kw.update(means_init=[[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]], weights_init=[0.5, 0.5],
                  precisions_init=np.stack([np.eye(3)] * 2))
    disk = dmix.GaussianMixture(2, **kw).fit(path)
    mem = dmix.GaussianMixture(2, **kw).fit(x)
    assert_same_fit(disk, mem)
    # and the lazy outputs of the Zarr input equal the NumPy ones
    np.testing.assert_allclose(disk.score_samples(path).compute(), mem.score_samples(x),
                               rtol=1e-10)


# -- shape and dtype errors -----------------------------------------------------------------


def test_one_dimensional_input():
    with pytest.raises(DataError, match=re.escape(
            "Expected 2D array, got 1D array instead: the input array has shape (5,). Reshape "
            "your data either using array.reshape(-1, 1) if your data has a single feature or "
            "array.reshape(1, -1) if it contains a single sample.")):
        as_source(np.arange(5.0))
    with pytest.raises(DataError, match="Expected 2D array, got 1D array instead: the Dask"):
        as_source(da.arange(5.0, chunks=2))
    with pytest.raises(DataError, match="Expected 2D array, got 1D array instead"):
        dmix.GaussianMixture(1).fit(np.arange(5.0))


def test_three_dimensional_input(tmp_path):
    with pytest.raises(DataError, match=re.escape(
            "Expected 2D array (n_samples, n_features), got 3D array instead: the input array "
            "has shape (2, 3, 4).")):
        as_source(np.zeros((2, 3, 4)))
    z = zarr.create_array(tmp_path / "3d.zarr", shape=(2, 3, 4), chunks=(1, 3, 4), dtype="f8")
    with pytest.raises(DataError, match=r"got 3D array instead: Zarr array .* has shape "
                                        r"\(2, 3, 4\)\."):
        as_source(z)
    with pytest.raises(DataError, match=r"got 0D array instead"):
        as_source(np.float64(3.0))


def test_empty_input():
    with pytest.raises(DataError, match=re.escape(
            "Found array with 0 sample(s) (shape=(0, 3)) while a minimum of 1 is required: "
            "the input array.")):
        as_source(np.zeros((0, 3)))
    with pytest.raises(DataError,
                       match=re.escape("Found array with 0 feature(s) (shape=(4, 0))")):
        as_source(np.zeros((4, 0)))


@pytest.mark.parametrize("x,dtype", [
    (np.array([["a", "b"], ["c", "d"]]), "<U1"),
    (np.array([[1 + 1j, 2], [3, 4]]), "complex128"),
    (np.array([[1, None], [3, 4]], dtype=object), "object"),
])
def test_non_numeric_dtype(x, dtype):
    with pytest.raises(DataError, match=re.escape(
            f"Expected numeric data of a real dtype in the input array, got dtype {dtype}. "
            "Convert the data to float32 or float64.")):
        as_source(x)


def test_non_numeric_dask_and_zarr(tmp_path):
    with pytest.raises(DataError, match="got dtype complex64"):
        as_source(da.zeros((4, 2), dtype=np.complex64, chunks=2))
    z = zarr.create_array(tmp_path / "c.zarr", shape=(4, 2), chunks=(2, 2), dtype="c16")
    with pytest.raises(DataError, match="Expected numeric data of a real dtype in Zarr array .*"
                                        "got dtype complex128"):
        as_source(z)


def test_ragged_input():
    with pytest.raises(DataError, match="Could not convert the input to a numeric array"):
        as_source([[1.0, 2.0], [3.0]])


# -- non-finite values found in the first pass ----------------------------------------------


USER_INIT = dict(weights_init=[0.5, 0.5], means_init=[[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]],
                 precisions_init=np.stack([np.eye(3)] * 2))


@pytest.mark.parametrize("init", ["kmeans", "user", "random", "k-means++"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_report_chunk_and_rows(init, bad):
    x = data(n=100)
    x[35, 1] = bad
    x[37, 0] = bad
    kw = dict(USER_INIT) if init == "user" else dict(init_params=init)
    expected = ("Input X contains NaN or infinity: chunk 3 (rows 30-39) of the input array has "
                "2 row(s) with non-finite values, the first at row 35. Remove or impute those "
                "rows.")
    with pytest.raises(DataError, match=re.escape(expected)):
        dmix.GaussianMixture(2, chunk_size=10, random_state=0, **kw).fit(x)


def test_non_finite_values_zarr_and_uneven_dask(tmp_path):
    x = data(n=100)
    x[61, 2] = np.nan
    z = zarr.create_array(tmp_path / "nan.zarr", shape=x.shape, chunks=(25, 3), dtype="f8")
    z[:] = x
    with pytest.raises(DataError, match=re.escape(
            "chunk 2 (rows 50-74) of Zarr array")):
        dmix.GaussianMixture(2, chunk_size=25).fit(z)
    arr = da.from_array(x, chunks=((7, 50, 5, 38), (3,)))
    with pytest.raises(DataError, match=re.escape(
            "chunk 2 (rows 57-61) of the Dask array has 1 row(s) with non-finite values, the "
            "first at row 61.")):
        dmix.GaussianMixture(2, **USER_INIT).fit(arr)


def test_too_few_rows():
    with pytest.raises(DataError, match=re.escape(
            "Expected n_samples >= n_components but got n_components = 5, n_samples = 3")):
        dmix.GaussianMixture(5).fit(data(n=3))
    # n_samples == n_components is allowed
    gm = dmix.GaussianMixture(3, random_state=0, max_iter=2, tol=1e9).fit(data(n=3))
    assert gm.n_iter_ == 2 and gm.means_.shape == (3, 3)


def test_feature_mismatch_at_predict():
    gm = dmix.GaussianMixture(2, random_state=0).fit(data(n=60, d=3))
    other = data(n=10, d=2)
    msg = re.escape("X has 2 features, but GaussianMixture is expecting 3 features as input.")
    for method in (gm.predict, gm.predict_proba, gm.score_samples, gm.score):
        with pytest.raises(DataError, match=msg):
            method(other)
    with pytest.raises(DataError, match=msg):
        gm.predict(da.from_array(other, chunks=5))


def test_fit_does_not_modify_input():
    for dtype in (np.float64, np.float32):
        x = data(n=80, dtype=dtype)
        x[::7] += 1000.0  # values far from the mean: the centring must not happen in place
        before = x.copy()
        flags = x.flags.writeable
        gm = dmix.GaussianMixture(3, random_state=0, chunk_size=9).fit(x)
        gm.predict(x)
        gm.score_samples(x)
        gm.score(x)
        np.testing.assert_array_equal(x, before)
        assert x.dtype == dtype and x.flags.writeable == flags
    # read-only input works too
    ro = data(n=50)
    ro.flags.writeable = False
    dmix.GaussianMixture(2, random_state=0).fit(ro).predict(ro)


# -- the direct read of uncompressed local Zarr chunks -------------------------------------------


def _direct(source) -> bool:
    """Whether the source's blocks come from dmix's own read of the chunk files."""
    return any(name.startswith("dmix-read-") for name in source.array.dask.layers)


def _stored(tmp_path, x, chunk_rows, name="a.zarr", **kwargs):
    path = str(tmp_path / name)
    z = zarr.create_array(path, shape=x.shape, chunks=(chunk_rows, x.shape[1]), dtype=x.dtype,
                          **kwargs)
    z[:] = x
    return path, z


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32])
@pytest.mark.parametrize("chunk_size", [None, 1, 37, 100, 130, 1003])
def test_direct_read_equals_zarr(tmp_path, dtype, chunk_size):
    """Blocks read straight from the chunk files equal zarr's own read, whatever the block
    boundaries (inside chunks, across them, the partial last chunk), and chunks that were
    never written (all fill value) read as the fill value."""
    x = (data(n=1003, d=5, seed=3) * 100).astype(dtype)
    x[200:300] = 0  # a whole chunk of fill values: zarr does not write it
    path, z = _stored(tmp_path, x, 100, compressors=None)
    assert not (tmp_path / "a.zarr" / "c" / "2" / "0").exists()
    source = as_source(path, chunk_size=chunk_size)
    assert _direct(source)
    assert source.dtype == (np.float32 if dtype == np.float32 else np.float64)
    got = source.array.compute()
    np.testing.assert_array_equal(got, z[:].astype(source.dtype))
    np.testing.assert_array_equal(got, x.astype(source.dtype))


def test_direct_read_nonzero_fill_value_and_group_path(tmp_path):
    x = data(n=50, d=2)
    x[10:20] = -1.5
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    z = group.create_array("X", shape=x.shape, chunks=(10, 2), dtype="f8", fill_value=-1.5,
                           compressors=None)
    z[:] = x
    source = as_source(str(tmp_path / "g.zarr"), chunk_size=15)
    assert _direct(source)
    np.testing.assert_array_equal(source.array.compute(), x)


def test_direct_read_truncated_chunk_names_the_file(tmp_path):
    x = data(n=40, d=2)
    path, _ = _stored(tmp_path, x, 10, compressors=None)
    chunk = tmp_path / "a.zarr" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    source = as_source(path, chunk_size=20)
    with pytest.raises(DataError, match=r"chunk file .*c/1/0 is shorter than its chunk: "
                                        r"expected 160 bytes, read 100"):
        source.array.compute()


@pytest.mark.parametrize("layout", ["compressed", "sharded", "column-chunks"])
def test_other_layouts_read_through_zarr(tmp_path, layout):
    """Compressed, sharded, or column-chunked stores are read by zarr (Dask's from_zarr)."""
    x = data(n=60, d=4)
    kwargs = {"compressed": {}, "sharded": {"shards": (20, 4), "compressors": None},
              "column-chunks": {"compressors": None}}[layout]
    path = str(tmp_path / "a.zarr")
    z = zarr.create_array(path, shape=x.shape, dtype="f8",
                          chunks=(10, 2) if layout == "column-chunks" else (10, 4), **kwargs)
    z[:] = x
    source = as_source(path)
    assert not _direct(source)
    np.testing.assert_array_equal(source.array.compute(), x)
