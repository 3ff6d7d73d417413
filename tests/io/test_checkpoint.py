"""CheckpointDir: groups, LATEST, retention, fallback, fingerprints, compatibility."""

import json
import os

import dask.array as da
import numpy as np
import pytest

from dmix.engine.loop import EMResult, Snapshot
from dmix.errors import CheckpointMismatchError, CheckpointWarning, DmixError
from dmix.io.checkpoint import (
    CHECKPOINT_SCHEMA,
    CheckpointDir,
    check_compatible,
    data_fingerprint,
    fingerprint_rows,
)


def _snapshot(iteration, restart=0, best=False, seed=0):
    rng = np.random.default_rng(seed + iteration)
    run = EMResult(
        params={"means": rng.normal(size=(3, 2)), "weights": rng.dirichlet(np.ones(3)),
                "scale": np.float64(rng.normal())},
        lower_bound=-1.5 - iteration if iteration else -np.inf,
        lower_bounds=[-2.0 + 0.1 * i for i in range(iteration)],
        n_iter=iteration, converged=False, init=restart,
    )
    prior = EMResult(params={"means": rng.normal(size=(3, 2))}, lower_bound=-0.25,
                     lower_bounds=[-1.0, -0.25], n_iter=2, converged=True, init=0)
    return Snapshot(restart, run, {"step": np.arange(3.0)}, prior if best else None)


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://dmix-test-{os.getpid()}-{id(request)}/ckpt"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_round_trip_is_exact(url):
    ckpt = CheckpointDir(url)
    ckpt.check_writable()
    ckpt.meta = {"family": {"name": "gaussian"}, "seed": "12345678901234567890"}
    ckpt.user_init = {"means_init": np.ones((3, 2))}
    snap = _snapshot(4, restart=1, best=True)
    name = ckpt.save(snap)
    assert name == "init001-iter000004.zarr"
    loaded = CheckpointDir(url).load()
    assert loaded.name == name
    got = loaded.snapshot
    assert (got.restart, got.run.n_iter, got.run.init) == (1, 4, 1)
    for key, value in snap.run.params.items():
        assert np.array_equal(got.run.params[key], value) and got.run.params[key].dtype == np.float64
    assert got.run.lower_bounds == snap.run.lower_bounds
    assert got.run.lower_bound == snap.run.lower_bound
    assert np.array_equal(got.state["step"], np.arange(3.0))
    assert got.best.lower_bound == -0.25 and got.best.converged and got.best.n_iter == 2
    assert np.array_equal(got.best.params["means"], snap.best.params["means"])
    assert np.array_equal(loaded.user_init["means_init"], np.ones((3, 2)))
    assert loaded.attrs["seed"] == "12345678901234567890"
    assert loaded.attrs["schema"] == CHECKPOINT_SCHEMA and loaded.attrs["complete"] is True


def test_iteration_zero_keeps_minus_infinity(url):
    ckpt = CheckpointDir(url)
    ckpt.save(_snapshot(0))
    got = ckpt.load().snapshot
    assert got.run.lower_bound == -np.inf and got.run.lower_bounds == [] and got.best is None


def test_keeps_the_last_groups_and_points_latest_at_the_newest(url):
    ckpt = CheckpointDir(url, keep=2)
    names = [ckpt.save(_snapshot(i)) for i in range(5)]
    assert ckpt.groups() == names[-2:]
    assert ckpt.latest_name() == names[-1]
    assert ckpt.saved == names
    pointer = json.loads(ckpt.fs.cat_file(f"{ckpt.root}/LATEST"))
    assert pointer == {"name": names[-1], "restart": 0, "iteration": 4,
                       "schema": CHECKPOINT_SCHEMA}
    # Only groups and LATEST: no temporary files left behind.
    entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in ckpt.fs.ls(ckpt.root, detail=False)}
    assert entries == {*names[-2:], "LATEST"}


def test_groups_are_never_overwritten(url):
    ckpt = CheckpointDir(url)
    ckpt.save(_snapshot(1))
    with pytest.raises(FileExistsError):
        ckpt.save(_snapshot(1, seed=5))
    assert np.array_equal(ckpt.load().snapshot.run.params["means"],
                          _snapshot(1).run.params["means"])


def _corrupt_array(ckpt, name, path="run/params/means"):
    chunk = f"{ckpt.root}/{name}/{path}/c/0/0"
    data = bytearray(ckpt.fs.cat_file(chunk))
    data[3] ^= 0xFF
    ckpt.fs.pipe_file(chunk, bytes(data))


def _mark_incomplete(ckpt, name):
    meta_path = f"{ckpt.root}/{name}/zarr.json"
    meta = json.loads(ckpt.fs.cat_file(meta_path))
    del meta["attributes"]["complete"]
    ckpt.fs.pipe_file(meta_path, json.dumps(meta).encode())


@pytest.mark.parametrize("damage", ["checksum", "incomplete", "truncated", "missing"])
def test_latest_naming_a_bad_group_falls_back_with_a_warning(url, damage):
    ckpt = CheckpointDir(url, keep=3)
    names = [ckpt.save(_snapshot(i)) for i in range(3)]
    if damage == "checksum":
        _corrupt_array(ckpt, names[-1])
    elif damage == "incomplete":
        _mark_incomplete(ckpt, names[-1])
    elif damage == "truncated":
        ckpt.fs.pipe_file(f"{ckpt.root}/{names[-1]}/zarr.json", b'{"zarr_format": 3, "no')
    else:
        ckpt.fs.rm(f"{ckpt.root}/{names[-1]}", recursive=True)
    with pytest.warns(CheckpointWarning, match=names[-1] if damage != "missing" else "LATEST"):
        loaded = CheckpointDir(url).load()
    assert loaded.name == names[-2]
    assert np.array_equal(loaded.snapshot.run.params["means"], _snapshot(1).run.params["means"])


def test_two_bad_groups_fall_back_twice(url):
    ckpt = CheckpointDir(url, keep=3)
    names = [ckpt.save(_snapshot(i)) for i in range(3)]
    _corrupt_array(ckpt, names[2])
    _mark_incomplete(ckpt, names[1])
    with pytest.warns(CheckpointWarning) as record:
        loaded = CheckpointDir(url).load()
    assert loaded.name == names[0] and len(record) == 2


def test_no_latest_uses_the_newest_complete_group(url):
    ckpt = CheckpointDir(url, keep=3)
    names = [ckpt.save(_snapshot(i)) for i in range(2)]
    ckpt.fs.rm(f"{ckpt.root}/LATEST")
    with pytest.warns(CheckpointWarning, match="no LATEST"):
        assert CheckpointDir(url).load().name == names[-1]


def test_groups_newer_than_latest_are_ignored_and_discarded(url):
    ckpt = CheckpointDir(url, keep=5)
    names = [ckpt.save(_snapshot(i)) for i in range(3)]
    latest = json.dumps({"name": names[0]}).encode()
    ckpt.fs.pipe_file(f"{ckpt.root}/LATEST", latest)  # as if the crash came before LATEST moved
    loaded = CheckpointDir(url).load()
    assert loaded.name == names[0]
    assert ckpt.discard_after(loaded.name) == names[1:]
    assert ckpt.groups() == names[:1]


def test_empty_directory_loads_nothing(url):
    ckpt = CheckpointDir(url)
    assert ckpt.load() is None and ckpt.is_empty()
    ckpt.check_writable()
    assert ckpt.is_empty()  # the probe file is gone


def test_unwritable_directory_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DmixError, match="Cannot write checkpoints to .*a-file"):
        CheckpointDir(blocker).check_writable()
    with pytest.raises(DmixError, match="Cannot write checkpoints to .*a-file/ckpt"):
        CheckpointDir(blocker / "ckpt").check_writable()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DmixError, match="Cannot write checkpoints to .*locked"):
            CheckpointDir(locked / "ckpt").check_writable()


# -- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_does_not_depend_on_chunking_or_container():
    x = np.random.default_rng(0).normal(size=(1001, 4))
    ref = data_fingerprint(x, "X")
    for chunks in [(1001, 4), (100, 4), (7, 4)]:
        assert data_fingerprint(da.from_array(x, chunks=chunks), "X") == ref
    assert ref["shape"] == [1001, 4] and ref["dtype"] == "float64"
    assert ref["sample_rows"] == len(fingerprint_rows(1001)) == 16


def test_fingerprint_sees_a_changed_sampled_row_and_a_changed_dtype():
    x = np.random.default_rng(0).normal(size=(1001, 4))
    ref = data_fingerprint(x, "X")["sample_sha256"]
    y = x.copy()
    y[fingerprint_rows(1001)[5], 2] += 1e-12
    assert data_fingerprint(y, "X")["sample_sha256"] != ref
    assert data_fingerprint(x.astype(np.float32), "X")["sample_sha256"] != ref
    assert fingerprint_rows(1001)[0] == 0 and fingerprint_rows(1001)[-1] == 1000
    assert fingerprint_rows(3) == [0, 1, 2]


def test_check_compatible_names_every_difference():
    x = np.random.default_rng(0).normal(size=(100, 3))
    fp = data_fingerprint(x, "the old data")
    saved = {"family": {"name": "gaussian", "covariance_type": "full"},
             "options": {"n_components": 3, "seed": "1"}, "data": fp}
    check_compatible(saved, family=saved["family"], options=saved["options"], fingerprint=fp,
                     where="D")
    other = data_fingerprint(x[::-1].copy(), "the new data")
    with pytest.raises(CheckpointMismatchError) as info:
        check_compatible(saved, family={"name": "gaussian", "covariance_type": "diag"},
                         options={"n_components": 4, "seed": "1"}, fingerprint=other, where="D")
    message = str(info.value)
    assert "covariance_type" in message and "diag" in message
    assert "n_components 3 (checkpoint) vs 4 (now)" in message
    assert "the old data" in message and "the new data" in message
    assert "seed" not in message
