"""A fit killed with SIGKILL at any moment, then resumed, ends with exactly the parameters of
an uninterrupted fit with the same seed.

The driver runs in a subprocess (the script below). It kills itself with SIGKILL at the n-th
call of a chosen function: during an E-step, during the M-step, during the k-means
initialisation of the second restart, and at every step of writing a checkpoint (among the
arrays, before the attributes that mark the group complete, before ``LATEST`` moves, between
writing the temporary ``LATEST`` and renaming it, before old groups are pruned). Another
test kills it after random delays, several times in a row. Then the same command runs to
the end and its parameters are compared bit for bit with an uninterrupted run's.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dmix.datasets import make_mixture
from dmix.io.checkpoint import CheckpointDir, group_name
from dmix.io.store import write_blocks

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")

DRIVER = textwrap.dedent("""
    import os, signal, sys, warnings
    import dask
    import numpy as np

    dask.config.set(scheduler="threads", num_workers=2)
    import zarr
    import dmix
    from dmix.engine import init as init_module
    from dmix.families.gaussian import Gaussian
    from dmix.io import checkpoint

    data, ckpt, out, target, at = sys.argv[1:6]
    at = int(at)
    targets = {
        "estep": (Gaussian, "estep"),
        "mstep": (Gaussian, "mstep"),
        "init": (init_module, "kmeans_centers"),
        "array": (zarr.Group, "create_array"),
        "attrs": (checkpoint, "_jsonable"),
        "latest": (checkpoint.CheckpointDir, "_point_latest"),
        "rename": (checkpoint.os, "replace"),
        "prune": (checkpoint.CheckpointDir, "_prune"),
    }
    # Zarr's local store renames files too: count only the renames onto LATEST.
    counts = {"rename": lambda args: str(args[1]).endswith("LATEST")}
    if target != "none":
        owner, name = targets[target]
        original, calls = getattr(owner, name), [0]
        counted = counts.get(target, lambda args: True)

        def trap(*args, **kwargs):
            calls[0] += counted(args)
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, trap)
    warnings.simplefilter("ignore")
    est = dmix.GaussianMixture(3, n_init=2, max_iter=6, tol=0, random_state=11,
                               chunk_size=400, checkpoint=ckpt, checkpoint_keep=2)
    est.fit(data, resume=True)
    np.savez(out, lower_bounds=est.lower_bounds_, n_iter=est.n_iter_,
             **{k: getattr(est, k) for k in %r})
""" % (FITTED,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    data = make_mixture(4000, 3, 3, seed=5)
    path = str(root / "data.zarr")
    write_blocks(path, 4000, 3, data.rows, 400, np.float64)
    script = root / "driver.py"
    script.write_text(DRIVER)
    tic = time.perf_counter()
    reference = _run(script, path, root / "ref-ckpt", root / "ref.npz", "none", 0)
    seconds = time.perf_counter() - tic
    assert reference.returncode == 0, reference.stderr
    return script, path, np.load(root / "ref.npz"), seconds


def _run(script, data, ckpt, out, target, at, timeout=120):
    return subprocess.run([sys.executable, str(script), data, str(ckpt), str(out), target,
                           str(at)], capture_output=True, text=True, timeout=timeout)


def _assert_equal(npz_path, reference):
    got = np.load(npz_path)
    for key in reference.files:
        np.testing.assert_array_equal(got[key], reference[key], err_msg=key)


# (function, which call, LATEST and the groups left by the kill): 10 blocks per pass, 2
# restarts side by side x 6 iterations (each pass calls the E-step twice per block and the
# M-step twice), a checkpoint after the initialisations and after every pass, named by the
# iterations of both restarts together (0, 2, ..., 12), 8 arrays each, keep=2.
MOMENTS = [
    # in the E-step pass of iteration 4 (the passes before made 60 calls)
    ("estep", 65, 6, [4, 6]),
    # in the first M-step of iteration 2
    ("mstep", 3, 2, [0, 2]),
    # in k-means|| of restart 1: no checkpoint yet
    ("init", 2, None, []),
    # among the arrays of the third checkpoint (its 20th array overall)
    ("array", 20, 2, [0, 2, 4]),
    # the arrays of the fifth checkpoint written, its attributes (``complete``) not yet
    ("attrs", 5, 6, [4, 6, 8]),
    # the third checkpoint complete, LATEST not yet written
    ("latest", 3, 2, [0, 2, 4]),
    # LATEST's temporary file for the fourth checkpoint written, not yet renamed
    ("rename", 4, 4, [2, 4, 6]),
    # LATEST moved to the sixth checkpoint, the old groups not yet deleted
    ("prune", 6, 10, [6, 8, 10]),
]


@pytest.mark.parametrize("target, at, latest, left", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_killed_then_resumed_equals_uninterrupted(setup, tmp_path, target, at, latest, left):
    script, data, reference, _ = setup
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    killed = _run(script, data, ckpt, out, target, at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    # The kill came at the intended moment.
    directory = CheckpointDir(ckpt)
    assert directory.latest_name() == (None if latest is None else group_name(0, latest))
    assert directory.groups() == [group_name(0, g) for g in left]
    finished = _run(script, data, ckpt, out, "none", 0)
    assert finished.returncode == 0, finished.stderr
    _assert_equal(out, reference)
    assert directory.groups() == [group_name(0, 10), group_name(0, 12)]


def test_killed_at_random_moments_again_and_again(setup, tmp_path):
    script, data, reference, seconds = setup
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    rng = np.random.default_rng(0)
    kills = 0
    # Random moments within the time an uninterrupted run takes (start-up included).
    for delay in rng.uniform(0.3, 0.9, size=4) * seconds:
        proc = subprocess.Popen([sys.executable, str(script), data, str(ckpt), str(out),
                                 "none", "0"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if out.exists():
            break
    if not out.exists():
        assert _run(script, data, ckpt, out, "none", 0).returncode == 0
    assert kills >= 1
    _assert_equal(out, reference)
