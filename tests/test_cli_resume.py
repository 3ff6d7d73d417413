"""`dmix fit --checkpoint`, `dmix fit --resume` and `dmix resume` on a real LocalCluster."""

import numpy as np
import pytest
from distributed import LocalCluster

from dmix.cli import main
from dmix.io.checkpoint import CheckpointDir
from dmix.io.store import read_model


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "data.zarr")
    assert main(["make-data", path, "-n", "6000", "-d", "3", "-k", "3", "--chunk-size",
                 "1000", "--seed", "2"]) == 0
    return path


def _fit(data, cluster, *extra):
    return main(["fit", data, "-k", "3", "--seed", "4", "--tol", "0", "--n-init", "2",
                 "--scheduler", cluster, *extra])


def _same_model(a, b):
    _, pa, aa = read_model(a)
    _, pb, ab = read_model(b)
    for key in pb:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)
    assert aa["lower_bounds_"] == ab["lower_bounds_"] and aa["n_iter_"] == ab["n_iter_"]


def test_resume_command_ends_as_the_uninterrupted_fit(data, cluster, tmp_path, capsys):
    whole, resumed, ckpt = (str(tmp_path / n) for n in ("whole", "resumed", "ckpt"))
    one = ("--n-init", "1")
    assert _fit(data, cluster, *one, "--max-iter", "5", "-o", whole) == 0
    assert _fit(data, cluster, *one, "--max-iter", "2", "--checkpoint", ckpt) == 0
    assert CheckpointDir(ckpt).latest_name() == "init000-iter000002.zarr"
    capsys.readouterr()
    assert main(["resume", ckpt, "--max-iter", "5", "--scheduler", cluster, "-o",
                 resumed]) == 0
    out = capsys.readouterr().out
    assert "Resuming from the checkpoint init000-iter000002.zarr" in out
    assert "Initialization 1/1 (resumed from the checkpoint)..." in out
    assert "Saved the model to" in out
    _same_model(resumed, whole)


def test_fit_resume_flag_on_a_finished_fit_gives_its_model(data, cluster, tmp_path):
    whole, again, ckpt = (str(tmp_path / n) for n in ("whole", "again", "ckpt"))
    assert _fit(data, cluster, "--max-iter", "4", "-o", whole) == 0
    assert _fit(data, cluster, "--max-iter", "4", "--checkpoint", ckpt) == 0
    # The restarts run side by side: the last checkpoint holds both, each at iteration 4.
    snapshot = CheckpointDir(ckpt).load().snapshot
    assert [r.n_iter for r in snapshot.runs] == [4] * len(snapshot.runs)
    # The same command, requeued with --resume, gives the same model as the plain fit.
    assert _fit(data, cluster, "--max-iter", "4", "--checkpoint", ckpt, "--resume", "-o",
                again) == 0
    _same_model(again, whole)


def test_fit_refuses_an_unwritable_checkpoint_before_fitting(data, cluster, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _fit(data, cluster, "--checkpoint", str(blocker / "ck")) == 1
    captured = capsys.readouterr()
    assert "Cannot write checkpoints" in captured.err
    assert "iter" not in captured.out  # no iteration ran


def test_fit_refuses_a_used_directory_without_resume(data, cluster, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert _fit(data, cluster, "--max-iter", "1", "--checkpoint", ckpt) == 0
    capsys.readouterr()
    assert _fit(data, cluster, "--max-iter", "1", "--checkpoint", ckpt) == 1
    assert "--resume" in capsys.readouterr().err


def test_resume_errors(data, cluster, tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nothing"), "--scheduler", cluster]) == 1
    assert "No complete checkpoint" in capsys.readouterr().err
    ckpt = str(tmp_path / "ckpt")
    assert _fit(data, cluster, "--max-iter", "1", "--checkpoint", ckpt) == 0
    other = str(tmp_path / "other.zarr")
    assert main(["make-data", other, "-n", "6000", "-d", "3", "-k", "3", "--seed", "9"]) == 0
    capsys.readouterr()
    assert main(["resume", ckpt, "--data", other, "--scheduler", cluster]) == 1
    assert "data content" in capsys.readouterr().err
