"""dmix.io.output: streaming row-chunked Dask arrays and generated rows into Zarr."""

import functools
import threading
import uuid

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import dmix
from dmix.errors import DataError, InvalidParameterError
from dmix.io.model import save_model
from dmix.io.output import write_arrays, write_generated, write_rows
from dmix.io.targets import check_output_target, output_group


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="sync"):
        yield


def values(n, d=None):
    x = np.arange(n * (d or 1), dtype=np.float64) * 0.5 - 3.0
    return x if d is None else x.reshape(n, d)


def test_round_trip_with_an_uneven_last_block(tmp_path):
    x = values(1000, 3)
    dx = da.from_array(x, chunks=(300, 3))  # blocks of 300, 300, 300, 100 rows
    z = write_rows(dx, tmp_path / "a.zarr")
    assert z.shape == (1000, 3) and z.chunks == (300, 3) and z.dtype == np.float64
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:], x)

    # 1-D, into a group, with stored chunks that divide the blocks, and a cast.
    v = values(1000)
    z = write_rows(da.from_array(v, chunks=300), tmp_path / "g.zarr", "v", chunk_rows=150,
                   dtype=np.float32, attributes={"unit": "nat"})
    stored = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")["v"]
    assert stored.chunks == (150,) and stored.dtype == np.float32
    assert stored.attrs["unit"] == "nat"
    np.testing.assert_array_equal(stored[:], v.astype(np.float32))

    # Blocks split along columns are merged into whole rows first.
    z = write_rows(da.from_array(x, chunks=(250, 2)), tmp_path / "cols.zarr")
    assert z.chunks == (250, 3)
    np.testing.assert_array_equal(z[:], x)

    # A single block shorter than the requested chunk is one chunk of its own size.
    z = write_rows(da.from_array(values(7), chunks=7), tmp_path / "one.zarr", chunk_rows=100)
    assert z.chunks == (7,)
    np.testing.assert_array_equal(z[:], values(7))


class _RemoteClient:
    """Stands for a client of a cluster of worker processes (only scheduler_info is asked)."""

    def scheduler_info(self):
        return {"workers": {"tcp://10.0.0.1:4000": {}, "tcp://10.0.0.2:4000": {}}}


def test_memory_url():
    url = f"memory://dmix-tests/out-{uuid.uuid4().hex}"
    x = values(50, 2)
    z = write_rows(da.from_array(x, chunks=(20, 2)), url)
    np.testing.assert_array_equal(zarr.open_array(url, mode="r")[:], x)
    assert z.chunks == (20, 2)

    # Worker processes would each write to their own memory file system: refused up front.
    other = f"memory://dmix-tests/out-{uuid.uuid4().hex}"
    with pytest.raises(InvalidParameterError, match="in-memory Zarr store"):
        write_rows(da.from_array(x, chunks=(20, 2)), other, client=_RemoteClient())
    with pytest.raises(InvalidParameterError, match="in-memory Zarr store"):
        write_arrays(zarr.open_group(zarr.storage.MemoryStore(), mode="w"),
                     {"x": da.from_array(x, chunks=(20, 2))}, client=_RemoteClient())
    with dask.config.set(scheduler="processes"), pytest.raises(InvalidParameterError):
        write_rows(da.from_array(x, chunks=(20, 2)), other)
    with pytest.raises(FileNotFoundError):
        zarr.open_array(other, mode="r")  # nothing was created


@pytest.mark.parametrize("chunks, chunk_rows, message", [
    ((300, 400, 300), None, r"block 1 \(rows 300-699\) has 400 rows, not a multiple of 300"),
    ((300, 300, 300, 100), 200, r"block 0 \(rows 0-299\) has 300 rows, not a multiple of 200"),
    ((300, 300, 300, 100), 400, r"block 0 \(rows 0-299\) has 300 rows, not a multiple of 400"),
])
def test_refuses_blocks_that_do_not_cover_whole_chunks(tmp_path, chunks, chunk_rows, message):
    dx = da.from_array(values(1000, 2), chunks=(chunks, 2))
    with pytest.raises(InvalidParameterError, match=message):
        write_rows(dx, tmp_path / "a.zarr", chunk_rows=chunk_rows)
    assert not (tmp_path / "a.zarr").exists()  # refused before anything was created


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "a.zarr"
    write_rows(da.from_array(values(10), chunks=5), path)
    with pytest.raises(DataError, match="a Zarr array already exists there"):
        write_rows(da.from_array(values(10) + 1, chunks=5), path)
    np.testing.assert_array_equal(zarr.open_array(str(path))[:], values(10))
    write_rows(da.from_array(values(10) + 1, chunks=5), path, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(path))[:], values(10) + 1)

    write_rows(da.from_array(values(10), chunks=5), tmp_path / "g.zarr", "v")
    with pytest.raises(DataError, match="Cannot write array 'v'"):
        write_rows(da.from_array(values(10), chunks=5), tmp_path / "g.zarr", "v")

    (tmp_path / "notes.txt").write_text("not zarr")
    with pytest.raises(DataError, match="is not a Zarr array or group"):
        write_rows(da.from_array(values(10), chunks=5), tmp_path / "notes.txt", overwrite=True)

    with pytest.raises(InvalidParameterError, match="dask.array.Array"):
        write_rows(values(10), tmp_path / "b.zarr")


def test_write_arrays_shares_blocks_and_adds_summaries(tmp_path):
    calls = []
    lock = threading.Lock()

    def proba_of(block):
        if block.shape[0]:  # not dask's call on an empty block to infer the output
            with lock:
                calls.append(block.shape[0])
        e = np.exp(block - block.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    x = np.random.default_rng(0).normal(size=(1001, 4))
    proba = da.from_array(x, chunks=(250, 4)).map_blocks(proba_of, dtype=np.float64)
    labels = proba.argmax(axis=1)
    written = write_arrays(
        tmp_path / "out.zarr", {"labels": labels, "proba": proba},
        dtypes={"labels": np.int32},
        summaries={"labels": functools.partial(np.bincount, minlength=4), "proba": np.sum})
    assert sorted(calls) == [1, 250, 250, 250, 250]  # each block computed once
    expected = proba_of(x)
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert group["labels"].dtype == np.int32 and group["labels"].chunks == (250,)
    np.testing.assert_array_equal(group["labels"][:], expected.argmax(axis=1))
    np.testing.assert_allclose(group["proba"][:], expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(written.summaries["labels"],
                                  np.bincount(expected.argmax(axis=1), minlength=4))
    assert written.summaries["proba"] == pytest.approx(1001, rel=1e-12)
    assert written.n_blocks == 5 and written.chunk_rows == 250

    with pytest.raises(InvalidParameterError, match="different row blocks"):
        write_arrays(tmp_path / "other.zarr",
                     {"a": da.zeros(10, chunks=5), "b": da.zeros(10, chunks=2)})


def _rows(start, stop, d=2):
    i = np.arange(start, stop)
    return np.sin(i[:, None] * (1.0 + np.arange(d))), i % 3


def test_write_generated_does_not_depend_on_the_block_size(tmp_path):
    columns = {"X": ((2,), np.float64), "labels": ((), np.int64)}
    counts = functools.partial(np.bincount, minlength=3)
    out = {}
    for rows in (1000, 3000, 10_001):
        written = write_generated(tmp_path / f"g{rows}.zarr", 10_001, _rows, columns, rows,
                                  summaries={"labels": counts})
        group = zarr.open_group(str(tmp_path / f"g{rows}.zarr"), mode="r")
        assert group["X"].chunks == (rows, 2)
        out[rows] = group["X"][:], group["labels"][:]
        assert written.n_blocks == -(-10_001 // rows)
        np.testing.assert_array_equal(written.summaries["labels"], counts(out[rows][1]))
    x, labels = _rows(0, 10_001)
    for got_x, got_labels in out.values():
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_labels, labels)

    with pytest.raises(DataError, match=r"have shape \(5, 3\); expected \(5, 2\)"):
        write_generated(tmp_path / "bad.zarr", 5, functools.partial(_rows, d=3), columns, 5)


def test_output_group_checks_the_target_and_removes_a_failed_output(tmp_path):
    data = tmp_path / "data.zarr"
    write_rows(da.from_array(values(10, 2), chunks=(5, 2)), data, "X")
    model = tmp_path / "model"
    save_model(dmix.GaussianMixture(1).fit(values(10, 2)), model)

    for inside in (data, f"{data}/X"):
        with pytest.raises(DataError, match="it is, or contains, the input"):
            check_output_target(data, True, inputs=(inside,))
    with pytest.raises(DataError, match="Refusing to overwrite .*: it holds a dmix model"):
        check_output_target(model, True)
    with pytest.raises(DataError, match="a Zarr group already exists there"):
        check_output_target(data, False, what="the scores")
    check_output_target(data, True, inputs=(tmp_path / "other.zarr",))  # replaceable

    out = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError, match="boom"), output_group(out) as group:
        write_rows(da.from_array(values(10), chunks=5), group, "v")
        raise RuntimeError("boom")
    assert not out.exists()
    with output_group(out) as group:
        write_rows(da.from_array(values(10), chunks=5), group, "v")
    np.testing.assert_array_equal(zarr.open_group(str(out))["v"][:], values(10))
