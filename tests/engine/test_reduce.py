"""Tests of dmix.engine.reduce: map_reduce results, the shape and names of its graph."""

from __future__ import annotations

import math
import re

import dask
import dask.array as da
import distributed  # a core dependency: its absence must fail, not skip
import numpy as np
import pytest

import dmix.engine.reduce as reduce_module
from dmix.engine.reduce import (
    DEFAULT_SPLIT_EVERY,
    map_blocks,
    map_reduce,
    resolve_client,
    tree_depth,
)

KEY = re.compile(r"^dmix-(?P<label>[a-z]+)-(?P<call>\d+-[0-9a-f]{8})(?:-(?P<rest>[\d-]+))?$")


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


@pytest.fixture(scope="module")
def client():
    """A small in-process cluster (threads) for the task-name checks."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        with distributed.Client(cluster, set_as_default=False) as c:
            yield c


class RecordingScheduler:
    """Dask's synchronous scheduler that also keeps the graph it was asked to run."""

    def __init__(self):
        self.graphs = []

    def __call__(self, expr, keys, **kwargs):
        self.graphs.append(dict(expr.__dask_graph__()))
        return dask.get(expr, keys, **kwargs)


def _block_stats(block, start, index, scale):
    """Per-block summary that makes every detail of the call checkable."""
    return {
        "sum": scale * block.sum(axis=0),
        "n": block.shape[0],
        "starts": [start],
        "indices": [index],
        "first": [block[0, 0] if block.shape[0] else None],
    }


def _combine(a, b):
    return {k: a[k] + b[k] for k in a}


def _data(chunks, d=3, seed=0):
    n = sum(chunks)
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x, da.from_array(x, chunks=(tuple(chunks), (d,)))


UNEVEN = [5, 1, 17, 2, 1, 9, 30, 1, 3, 11, 7, 1, 13]  # 13 blocks, 101 rows


@pytest.mark.parametrize("split_every", [2, 3, 4, 13, 16, 100])
@pytest.mark.parametrize("chunks", [UNEVEN, [1] * 37, [50], [20, 20, 20, 20, 3]],
                         ids=["uneven", "1-row", "one-block", "even+tail"])
def test_map_reduce_equals_python_sum(chunks, split_every):
    x, data = _data(chunks)
    out = map_reduce(data, _block_stats, 2.0, combine=_combine, split_every=split_every)
    # plain Python over the same blocks, in order
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).tolist()
    expected_sum = np.zeros(x.shape[1])
    for s, c in zip(starts, chunks, strict=True):
        expected_sum = expected_sum + 2.0 * x[s:s + c].sum(axis=0)
    np.testing.assert_allclose(out["sum"], expected_sum, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(out["sum"], 2.0 * x.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert out["n"] == x.shape[0]
    # every block once, in order, with its global first row
    assert out["indices"] == list(range(len(chunks)))
    assert out["starts"] == starts
    assert out["first"] == [x[s, 0] for s in starts]


def _levels(graph):
    """The dmix keys of one map_reduce graph, grouped: {label: [...], 'reduce': {level: n}}."""
    calls = {KEY.match(k).group("call") for k in graph if isinstance(k, str) and KEY.match(k)}
    assert len(calls) == 1, calls
    estep, params, levels, fanin = [], [], {}, []
    for key, task in graph.items():
        m = KEY.match(key) if isinstance(key, str) else None
        if m is None:
            continue
        if m.group("label") == "reduce":
            level, j = map(int, m.group("rest").split("-"))
            levels.setdefault(level, []).append(j)
            fanin.append(len(task.dependencies))
        elif m.group("label") == "params":
            params.append(key)
        else:
            estep.append((key, task))
    return estep, params, levels, fanin


@pytest.mark.parametrize(
    "n_blocks,split_every",
    [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (8, 2), (9, 2), (16, 4), (17, 4), (13, 4),
     (13, 13), (13, 16), (37, 3), (37, 6), (64, 4), (65, 4), (20, None)],
)
@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "shared-node"])
def test_graph_tree_depth_and_shape(n_blocks, split_every, embed, monkeypatch):
    if not embed:
        monkeypatch.setattr(reduce_module, "EMBED_BYTES", -1)
    _, data = _data([2] * n_blocks)
    rec = RecordingScheduler()
    with dask.config.set(scheduler=rec):
        out = map_reduce(data, _block_stats, 1.0, combine=_combine, split_every=split_every)
    assert out["indices"] == list(range(n_blocks))
    (graph,) = rec.graphs
    estep, params, levels, fanin = _levels(graph)
    s = DEFAULT_SPLIT_EVERY if split_every is None else split_every
    # the explicit count: smallest depth with s**depth >= n_blocks; the last level of
    # combining happens on the caller's side, the others are tasks
    depth = next(d for d in range(64) if s**d >= n_blocks)
    assert depth == tree_depth(n_blocks, s)
    assert len(levels) == max(depth - 1, 0)
    # level l has ceil(n / s**(l+1)) nodes, numbered 0.., each with at most s inputs
    for level, js in levels.items():
        assert sorted(js) == list(range(math.ceil(n_blocks / s ** (level + 1))))
    assert all(1 <= f <= s for f in fanin)
    # what the caller combines: the top level, at most s parts (the blocks if depth <= 1)
    top = levels[depth - 2] if depth >= 2 else list(range(n_blocks))
    assert 1 <= len(top) <= s
    # one estep task per block; the parameters ride inside each task, or in one shared node
    assert len(estep) == n_blocks
    assert len(params) == (0 if embed else 1)
    for _, task in estep:
        assert len(task.dependencies) == (1 if embed else 2)  # the block (and the node)
        if not embed:
            assert params[0] in task.dependencies


def test_large_arguments_travel_in_one_node():
    """Arguments are copied into every task only while the copies total at most EMBED_BYTES."""
    x, data = _data([4] * 8)
    small = np.full(3, 2.0)
    large = np.full(3 + reduce_module.EMBED_BYTES // 8 // 8, 2.0)  # 8 copies pass the limit
    for scale, n_nodes in ((small, 0), (large, 1)):
        rec = RecordingScheduler()
        with dask.config.set(scheduler=rec):
            out = map_reduce(data, lambda b, s, i, a: _block_stats(b, s, i, a[:3]), scale,
                             combine=_combine, split_every=2)
        np.testing.assert_allclose(out["sum"], 2.0 * x.sum(axis=0), rtol=1e-12)
        assert len(_levels(rec.graphs[0])[1]) == n_nodes


def test_tree_depth_matches_integer_count():
    for s in range(2, 21):
        for n in range(1, 3000):
            expected = next(d for d in range(64) if s**d >= n)
            assert tree_depth(n, s) == expected, (n, s)
    # exact powers, where a floating-point log could round the wrong way
    for s in (2, 3, 4, 5, 7, 8, 10, 16, 32):
        for e in range(1, 30):
            if s**e > 10**9:  # far beyond any real number of blocks
                break
            assert tree_depth(s**e, s) == e, (s, e)
            assert tree_depth(s**e + 1, s) == e + 1, (s, e)
    assert tree_depth(0, 2) == 0


@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, 2.5, True, "4", [4]])
def test_invalid_split_every(bad):
    _, data = _data([3, 3])
    message = f"split_every must be an int >= 2. Got {bad!r} instead."
    with pytest.raises(ValueError, match=re.escape(message)):
        map_reduce(data, _block_stats, 1.0, combine=_combine, split_every=bad)


def test_split_every_numpy_integer_accepted():
    """The estimator validates split_every as numbers.Integral, so NumPy ints must work here."""
    x, data = _data([3, 3, 3, 3, 3])
    out = map_reduce(data, _block_stats, 1.0, combine=_combine, split_every=np.int64(2))
    assert out["n"] == 15
    np.testing.assert_allclose(out["sum"], x.sum(axis=0), rtol=1e-12)


def test_map_blocks_rows_and_columns():
    x, data = _data(UNEVEN)
    col = map_blocks(data, lambda b, a, start, index: b.sum(axis=1) * a, 3.0,
                     out_columns=None, dtype=np.float64, label="rowsum")
    two = map_blocks(data, lambda b, a, start, index: b[:, :2] + a, 1.0, out_columns=2,
                     dtype=np.float64, label="firsttwo")
    # Each block learns its first row and its index, for error messages.
    where = map_blocks(data, lambda b, start, index: np.full(len(b), 1000.0 * index + start),
                       out_columns=None, dtype=np.float64, label="where")
    starts = np.repeat(np.cumsum([0, *UNEVEN[:-1]]), UNEVEN)
    np.testing.assert_array_equal(where.compute(),
                                  1000.0 * np.repeat(np.arange(len(UNEVEN)), UNEVEN) + starts)
    assert col.chunks == (tuple(UNEVEN),)
    assert two.chunks == (tuple(UNEVEN), (2,))
    np.testing.assert_allclose(col.compute(), 3.0 * x.sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(two.compute(), x[:, :2] + 1.0, rtol=1e-14)
    assert col.name.startswith("dmix-rowsum")
    assert two.name.startswith("dmix-firsttwo")


def test_map_blocks_calls_never_share_keys():
    """Two results of the same function with other arguments are different graphs: their
    difference is computed, not taken from one shared key."""
    x, data = _data(UNEVEN)
    a = map_blocks(data, lambda b, s, start, index: b.sum(axis=1) * s, 2.0, out_columns=None,
                   dtype=np.float64, label="scaled")
    b = map_blocks(data, lambda b, s, start, index: b.sum(axis=1) * s, 5.0, out_columns=None,
                   dtype=np.float64, label="scaled")
    assert a.name != b.name
    np.testing.assert_allclose((b - a).compute(), 3.0 * x.sum(axis=1), rtol=1e-13)


def test_task_prefixes_on_distributed(client):
    x, data = _data(UNEVEN)
    out = map_reduce(data, _block_stats, 1.0, combine=_combine, split_every=3, client=client)
    np.testing.assert_allclose(out["sum"], x.sum(axis=0), rtol=1e-12)
    assert out["indices"] == list(range(len(UNEVEN)))
    prefixes = client.run_on_scheduler(
        lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "dmix-estep" in prefixes
    assert "dmix-reduce" in prefixes
    # the task stream of one call: 13 estep tasks and, with fan-in 3, 5 + 2 reduce tasks (the
    # client combines the last 2)
    with distributed.get_task_stream(client) as ts:
        out = map_reduce(data, _block_stats, 1.0, combine=_combine, split_every=3,
                         client=client)
    assert out["n"] == x.shape[0]
    names = [distributed.utils.key_split(t["key"]) for t in ts.data]
    assert names.count("dmix-estep") == len(UNEVEN)
    assert names.count("dmix-reduce") == 5 + 2
    assert "dmix-params" not in names  # a scalar argument rides inside the tasks


def test_shared_parameters_node_on_distributed(client, monkeypatch):
    monkeypatch.setattr(reduce_module, "EMBED_BYTES", -1)
    x, data = _data(UNEVEN)
    with distributed.get_task_stream(client) as ts:
        out = map_reduce(data, _block_stats, 1.0, combine=_combine, client=client)
    np.testing.assert_allclose(out["sum"], x.sum(axis=0), rtol=1e-12)
    names = [distributed.utils.key_split(t["key"]) for t in ts.data]
    assert names.count("dmix-params") == 1


def test_resolve_client_explicit_and_local_scheduler(client):
    assert resolve_client(client) is client
    with dask.config.set(scheduler="sync"):
        assert resolve_client() is None
    with dask.config.set(scheduler="threads"):
        assert resolve_client() is None


def test_resolve_client_uses_default_client():
    """The docstring: with no local scheduler configured, the default distributed client."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        with dask.config.set(scheduler=None):
            with distributed.Client(cluster) as default:
                assert resolve_client() is default


def test_direct_zarr_reads_happen_inside_the_block_tasks(tmp_path, client):
    """An uncompressed local Zarr source is read by the tasks that use its blocks: the graph
    has no separate read tasks, and the result equals the in-memory one, locally and on a
    cluster; persisted, the same array's blocks are used as they are."""
    import zarr

    from dmix.io.source import as_source, direct_reads

    x, _ = _data(UNEVEN, d=3, seed=4)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, chunks=(7, 3), dtype="f8",
                          compressors=None)
    z[:] = x
    data = as_source(str(tmp_path / "x.zarr"), chunk_size=10).array
    assert direct_reads(data) is not None
    expected = map_reduce(da.from_array(x, chunks=(10, 3)), _block_stats, 2.0,
                          combine=_combine, split_every=3)
    rec = RecordingScheduler()
    with dask.config.set(scheduler=rec):
        local = map_reduce(data, _block_stats, 2.0, combine=_combine, split_every=3)
    assert not any(isinstance(k, tuple) or "read" in k for k in rec.graphs[0])
    with distributed.get_task_stream(client) as ts:
        remote = map_reduce(data, _block_stats, 2.0, combine=_combine, split_every=3,
                            client=client)
    assert {distributed.utils.key_split(t["key"]) for t in ts.data} == {"dmix-estep",
                                                                        "dmix-reduce"}
    # With a shared parameters node the blocks stay tasks of their own, so that placement
    # follows them (a task whose only input is the node would run where the node is).
    rec = RecordingScheduler()
    with dask.config.set(scheduler=rec), pytest.MonkeyPatch.context() as mp:
        mp.setattr(reduce_module, "EMBED_BYTES", -1)
        shared = map_reduce(data, _block_stats, 2.0, combine=_combine, split_every=3)
    assert sum(isinstance(k, tuple) and k[0].startswith("dmix-read-") for k in rec.graphs[0]) \
        == data.numblocks[0] == 11
    persisted = client.persist(data)
    assert direct_reads(persisted) is None
    again = map_reduce(persisted, _block_stats, 2.0, combine=_combine, split_every=3,
                       client=client)
    for out in (local, remote, shared, again):
        assert out["starts"] == expected["starts"] and out["indices"] == expected["indices"]
        np.testing.assert_array_equal(out["sum"], expected["sum"])
        assert out["first"] == expected["first"]
