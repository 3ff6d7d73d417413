"""The 2-D demonstration shapes of dmix.datasets: the same rows whatever the blocks, the
shape's defining statistics, and ``dmix make-data --shape``."""

import numpy as np
import pytest
import zarr

from dmix.cli import main
from dmix.datasets import SHAPES, make_shape, shape_rows
from dmix.errors import InvalidParameterError

N = 200_000


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rows_do_not_depend_on_the_blocks_and_the_seed_matters(shape):
    whole = shape_rows(shape, 3, 0, 5000)
    pieces = np.concatenate([shape_rows(shape, 3, a, b) for a, b in
                             ((0, 1), (1, 1777), (1777, 1777), (1777, 5000))])
    np.testing.assert_array_equal(pieces, whole)
    assert whole.shape == (5000, 2) and np.all(np.isfinite(whole))
    assert not np.allclose(shape_rows(shape, 4, 0, 5000), whole)
    assert shape_rows(shape, 3, 0, 10, dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("shape, width", [("ring", 0.25), ("donut", 0.5)])
def test_ring_radius_and_angle(shape, width):
    x = make_shape(shape, N, seed=1).rows(0, N)
    radius, angle = np.hypot(x[:, 0], x[:, 1]), np.arctan2(x[:, 1], x[:, 0])
    # radius ~ N(3, width^2): standard errors width / 447 and width / 632
    assert radius.mean() == pytest.approx(3.0, abs=width / 80)
    assert radius.std() == pytest.approx(width, abs=width / 120)
    counts = np.histogram(angle, bins=8, range=(-np.pi, np.pi))[0]
    # uniform angle: 25000 per octant, sd 150
    assert np.all(np.abs(counts - N / 8) < 800)


def test_banana_cosine_funnel_spiral_statistics():
    x = shape_rows("banana", 0, 0, N)
    residual = x[:, 1] - (x[:, 0] ** 2 / 4 - 1)
    assert x[:, 0].std() == pytest.approx(2.0, abs=0.02)
    assert residual.std() == pytest.approx(0.5, abs=0.005)
    assert abs(np.corrcoef(x[:, 0], residual)[0, 1]) < 0.01

    x = shape_rows("cosine", 0, 0, N)
    assert x[:, 0].min() >= -2 * np.pi and x[:, 0].max() <= 2 * np.pi
    assert (x[:, 1] - np.cos(x[:, 0])).std() == pytest.approx(0.2, abs=0.002)

    x = shape_rows("funnel", 0, 0, N)
    assert x[:, 1].std() == pytest.approx(1.5, abs=0.015)
    # x | v ~ N(0, e^v): x e^{-v/2} is standard normal whatever v
    np.testing.assert_allclose((x[:, 0] * np.exp(-x[:, 1] / 2)).std(), 1.0, atol=0.01)

    x = shape_rows("spiral", 0, 0, N)
    # the arm r = t / pi at angle t: the distance to the arm is the 0.1 noise
    t = np.linspace(0, 3 * np.pi, 20_000)
    arm = np.stack([t / np.pi * np.cos(t), t / np.pi * np.sin(t)], axis=1)
    sub = x[:2000]
    gap = np.min(np.linalg.norm(sub[:, None, :] - arm[None, ::4, :], axis=2), axis=1)
    assert np.median(gap) < 0.12


def test_errors_name_the_value():
    with pytest.raises(InvalidParameterError, match=r"'torus'.*\['banana'"):
        make_shape("torus", 10)
    with pytest.raises(InvalidParameterError, match="n_samples must be >= 1"):
        make_shape("ring", 0)
    with pytest.raises(InvalidParameterError, match="stop must be <= n_samples"):
        make_shape("ring", 10).rows(0, 11)


def test_make_data_shape_writes_zarr(tmp_path, capsys):
    out = str(tmp_path / "donut.zarr")
    assert main(["make-data", out, "-n", "7000", "--shape", "donut", "--seed", "5",
                 "--chunk-size", "1000"]) == 0
    group = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(group["X"][:], shape_rows("donut", 5, 0, 7000))
    assert group["X"].chunks == (1000, 2)
    assert group.attrs["dmix_dataset"]["shape"] == "donut"
    assert main(["make-data", str(tmp_path / "x.zarr"), "-n", "10"]) != 0
    assert "--shape" in capsys.readouterr().err
