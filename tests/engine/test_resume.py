"""Checkpointed fits: resumed from any checkpoint they end exactly where an uninterrupted fit
ends; other data or options are refused by name; unusable directories fail before the fit."""

import json
import shutil
import warnings

import dask
import numpy as np
import pytest

import dmix
from dmix.engine.loop import Monitor
from dmix.errors import CheckpointMismatchError, ConvergenceWarning, DmixError
from dmix.io.checkpoint import CheckpointDir
from dmix.io.store import write_blocks

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


@pytest.fixture(autouse=True)
def _local_scheduler():
    with dask.config.set(scheduler="sync"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(7)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]])
    return np.concatenate([rng.normal(c, 1.0, size=(500, 3)) for c in centers])


def _model(ckpt=None, **kw):
    opts = dict(n_components=3, n_init=2, max_iter=6, tol=1e-6, random_state=3, chunk_size=300,
                checkpoint=None if ckpt is None else str(ckpt), checkpoint_keep=100)
    opts.update(kw)
    return dmix.GaussianMixture(**opts)


def assert_same_fit(a, b):
    for name in FITTED:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.lower_bounds_ == b.lower_bounds_
    assert (a.n_iter_, a.converged_, a.lower_bound_) == (b.n_iter_, b.converged_, b.lower_bound_)


class Counter(Monitor):
    def __init__(self):
        self.iterations, self.resumes = [], []

    def resumed(self, directory, name, init, iteration):
        self.resumes.append((name, init, iteration))

    def end_iteration(self, record):
        self.iterations.append((record.init, record.iteration))


def test_checkpoints_do_not_change_the_fit(X, tmp_path):
    plain = _model().fit(X)
    checked = _model(tmp_path / "ck").fit(X)
    assert_same_fit(checked, plain)
    # The two restarts run side by side: a checkpoint after the initialisations and after
    # every pass, named by the iterations of both restarts together.
    names = checked.checkpoints_
    assert names[0] == "init000-iter000000.zarr"
    totals = [int(n[12:18]) for n in names]
    assert totals == sorted(set(totals)) and totals[-1] <= 2 * 6
    snapshot = CheckpointDir(tmp_path / "ck").load().snapshot
    assert len(snapshot.runs) == 2 and sum(r.n_iter for r in snapshot.runs) == totals[-1]


def test_resume_from_every_checkpoint_ends_exactly_as_the_uninterrupted_fit(X, tmp_path):
    whole = _model(tmp_path / "all").fit(X)
    names = whole.checkpoints_
    for name, following in zip(names, [*names[1:], None], strict=True):
        trial = tmp_path / f"from-{name}"
        shutil.copytree(tmp_path / "all", trial)
        (trial / "LATEST").write_text(json.dumps({"name": name}))  # as if killed right after
        monitor = Counter()
        resumed = _model(trial).fit(X, resume=True, monitor=monitor)
        assert_same_fit(resumed, whole)
        assert monitor.resumes == [(name, 0, int(name[12:18]))]
        done = {r.init: r.n_iter for r in CheckpointDir(trial).read(name).snapshot.runs}
        if following is None:  # the fit had ended
            assert monitor.iterations == []
        else:  # each restart goes on from its own iteration
            assert all(it == done[init] + 1 for init, it in monitor.iterations[:1])


def test_checkpoint_every_and_keep(X, tmp_path):
    est = _model(tmp_path / "ck", n_init=1, max_iter=5, tol=0, checkpoint_every=2,
                 checkpoint_keep=2).fit(X)
    # Iteration 0 (the initialisation), every 2nd, and the last one.
    assert est.checkpoints_ == [f"init000-iter{i:06d}.zarr" for i in (0, 2, 4, 5)]
    assert CheckpointDir(tmp_path / "ck").groups() == est.checkpoints_[-2:]


def test_resume_with_a_larger_max_iter_continues_the_run(X, tmp_path):
    whole = _model(n_init=1, tol=0, max_iter=8).fit(X)
    _model(tmp_path / "ck", n_init=1, tol=0, max_iter=3).fit(X)
    monitor = Counter()
    resumed = dmix.resume(tmp_path / "ck", X, max_iter=8, monitor=monitor)
    assert_same_fit(resumed, whole)
    assert monitor.iterations == [(0, i) for i in range(4, 9)]
    assert resumed.checkpoint == str(tmp_path / "ck") and resumed.max_iter == 8


def test_resume_of_a_finished_fit_runs_no_iteration(X, tmp_path):
    done = _model(tmp_path / "ck").fit(X)
    monitor = Counter()
    again = _model(tmp_path / "ck").fit(X, resume=True, monitor=monitor)
    assert_same_fit(again, done)
    assert monitor.iterations == []


def test_resume_true_on_an_empty_directory_starts_afresh(X, tmp_path):
    assert_same_fit(_model(tmp_path / "new").fit(X, resume=True), _model().fit(X))


def test_unseeded_fit_resumes_with_its_own_seed(X, tmp_path):
    first = _model(tmp_path / "ck", random_state=None, n_init=1, max_iter=2, tol=0).fit(X)
    seed = int(CheckpointDir(tmp_path / "ck").load().attrs["seed"])
    resumed = _model(tmp_path / "ck", random_state=None, n_init=1, max_iter=4, tol=0).fit(
        X, resume=True)
    whole = _model(random_state=seed, n_init=1, max_iter=4, tol=0)
    # random_state=seed reproduces the unseeded fit exactly: the seed is the checkpoint's.
    assert_same_fit(resumed, whole.fit(X))
    assert first.n_iter_ == 2


def test_dmix_resume_reopens_a_zarr_path_and_keeps_user_init(X, tmp_path):
    path = str(tmp_path / "data.zarr")
    write_blocks(path, X.shape[0], X.shape[1], lambda lo, hi: X[lo:hi], 300, X.dtype, name=None)
    means = X[[0, 600, 1200]]
    whole = _model(n_init=1, tol=0, max_iter=5, means_init=means).fit(path)
    _model(tmp_path / "ck", n_init=1, tol=0, max_iter=2, means_init=means).fit(path)
    resumed = dmix.resume(str(tmp_path / "ck"), max_iter=5)
    assert_same_fit(resumed, whole)
    np.testing.assert_array_equal(resumed.means_init, means)


def test_memory_url_checkpoints(X):
    url = f"memory://dmix-resume-{id(X)}/ck"
    whole = _model(n_init=1, tol=0, max_iter=4).fit(X)
    _model(url, n_init=1, tol=0, max_iter=2).fit(X)
    assert_same_fit(dmix.resume(url, X, max_iter=4), whole)


# -- refusals --------------------------------------------------------------------------------


def test_fit_without_resume_refuses_a_directory_with_checkpoints(X, tmp_path):
    _model(tmp_path / "ck", n_init=1, max_iter=1).fit(X)
    with pytest.raises(DmixError, match="holds checkpoints of an earlier fit.*resume=True"):
        _model(tmp_path / "ck", n_init=1, max_iter=1).fit(X)


@pytest.mark.parametrize("change, message", [
    ({"n_components": 2}, "n_components 3 (checkpoint) vs 2 (now)"),
    ({"covariance_type": "diag"}, "'covariance_type': 'diag'"),
    ({"random_state": 4}, "seed '3' (checkpoint) vs '4' (now)"),
    ({"init_params": "random"}, "init_params 'kmeans' (checkpoint) vs 'random' (now)"),
    ({"n_init": 3}, "n_init 2 (checkpoint) vs 3 (now)"),
])
def test_incompatible_options_are_refused_by_name(X, tmp_path, change, message):
    _model(tmp_path / "ck", max_iter=1).fit(X)
    with pytest.raises(CheckpointMismatchError, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        _model(tmp_path / "ck", max_iter=1, **change).fit(X, resume=True)


def test_other_data_are_refused(X, tmp_path):
    _model(tmp_path / "ck", max_iter=1).fit(X)
    with pytest.raises(CheckpointMismatchError, match="data shape"):
        _model(tmp_path / "ck").fit(X[:-1], resume=True)
    moved = X + 1e-9
    with pytest.raises(CheckpointMismatchError, match="data content"):
        dmix.resume(tmp_path / "ck", moved)
    with pytest.raises(CheckpointMismatchError, match="data dtype"):
        dmix.resume(tmp_path / "ck", X.astype(np.float32))


def test_changed_max_iter_tol_and_chunks_are_allowed(X, tmp_path):
    first = _model(tmp_path / "ck", n_init=1, max_iter=2, tol=0).fit(X)
    shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
    est = _model(tmp_path / "ck", n_init=1, max_iter=5, tol=1e-4, chunk_size=1000).fit(
        X, resume=True)
    # The same fit made in one go with the new options: other chunks change only rounding.
    whole = _model(n_init=1, max_iter=5, tol=1e-4).fit(X)
    assert est.lower_bounds_[:2] == first.lower_bounds_
    assert est.n_iter_ == whole.n_iter_ == 3 and est.converged_ and whole.converged_
    for name in FITTED:
        np.testing.assert_allclose(getattr(est, name), getattr(whole, name), rtol=1e-10,
                                   err_msg=name)
    # A tol that the last recorded change already meets: converged, no further iteration.
    monitor = Counter()
    done = _model(tmp_path / "ck2", n_init=1, max_iter=5, tol=1e-2).fit(
        X, resume=True, monitor=monitor)
    assert monitor.iterations == [] and done.converged_ and done.n_iter_ == 2
    assert_same_fit(done, _model(n_init=1, max_iter=5, tol=1e-2).fit(X))


def test_unwritable_checkpoint_fails_before_reading_the_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DmixError, match="Cannot write checkpoints"):
        # The data path does not exist either: the checkpoint is checked first.
        _model(blocker / "ck").fit(str(tmp_path / "no-such-data.zarr"))


def test_resume_needs_a_checkpoint_and_in_memory_data(X, tmp_path):
    with pytest.raises(DmixError, match="No complete checkpoint"):
        dmix.resume(tmp_path / "empty")
    _model(tmp_path / "ck", n_init=1, max_iter=1).fit(X)
    with pytest.raises(DmixError, match="pass the same data again"):
        dmix.resume(tmp_path / "ck")


@pytest.mark.parametrize("bad", [{"checkpoint_every": 0}, {"checkpoint_keep": 0},
                                 {"checkpoint": 3}])
def test_bad_checkpoint_parameters(X, tmp_path, bad):
    opts = {"checkpoint": str(tmp_path / "ck"), **bad}
    with pytest.raises(dmix.InvalidParameterError, match=next(iter(bad))):
        dmix.GaussianMixture(2, **opts).fit(X)


def test_checkpoint_given_to_fit(X, tmp_path):
    whole = _model(n_init=1, tol=0, max_iter=4).fit(X)
    est = _model(n_init=1, tol=0, max_iter=2)
    est.fit(X, checkpoint=str(tmp_path / "ck"))
    assert est.checkpoint is None  # the constructor parameter is left alone
    est.set_params(max_iter=4)
    assert_same_fit(est.fit(X, checkpoint=tmp_path / "ck", resume=True), whole)
