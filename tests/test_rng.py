"""Tests of dmix.rng: counter-based uniforms keyed by (seed, stream, row), seed conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dmix.rng import keyed_uniform, seed_sequence_int

N = 200_000


def test_keyed_uniform_in_open_unit_interval_and_float64():
    u = keyed_uniform(12345, 7, np.arange(N))
    assert u.dtype == np.float64
    assert u.shape == (N,)
    assert u.min() > 0.0
    assert u.max() < 1.0
    # 53-bit resolution: every value is (j + 1/2) * 2**-53 for an integer j.
    j = u * 2.0**53 - 0.5
    np.testing.assert_array_equal(j, np.floor(j))


def test_keyed_uniform_extreme_values_stay_inside_open_interval():
    # The largest value the formula can produce, (2**53 - 1 + 0.5) * 2**-53, is < 1 and the
    # smallest, 0.5 * 2**-53, is > 0: check over many keys, including huge row indices.
    rows = np.concatenate([np.arange(1000, dtype=np.uint64),
                           np.arange(2**63 - 1000, 2**63 + 1000, dtype=np.uint64),
                           np.arange(2**64 - 1000, 2**64 - 1, dtype=np.uint64)])
    for seed in (0, 1, 2**64 - 1, -1):
        u = keyed_uniform(seed, 0, rows)
        assert np.all((u > 0) & (u < 1))


def test_keyed_uniform_moments():
    u = keyed_uniform(2024, 3, np.arange(N))
    # mean 1/2 with standard error sqrt(1/12 / N); allow 5 standard errors.
    se_mean = np.sqrt(1 / 12 / N)
    assert abs(u.mean() - 0.5) < 5 * se_mean
    # variance 1/12; Var of the sample variance for U(0,1) is (1/80 - 1/144) / N.
    se_var = np.sqrt((1 / 80 - 1 / 144) / N)
    assert abs(u.var() - 1 / 12) < 5 * se_var
    # third central moment 0, fourth central moment 1/80.
    assert abs(((u - 0.5) ** 3).mean()) < 5 * np.sqrt(1 / 448 / N)
    assert abs(((u - 0.5) ** 4).mean() - 1 / 80) < 5 * np.sqrt((1 / 2304 - 1 / 6400) / N)
    # distribution and serial correlation of neighbouring rows
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    lag1 = np.corrcoef(u[:-1], u[1:])[0, 1]
    assert abs(lag1) < 5 / np.sqrt(N)


def test_keyed_uniform_columns_moments_and_shape():
    u = keyed_uniform(5, 9, np.arange(N // 4), 4)
    assert u.shape == (N // 4, 4)
    assert np.all((u > 0) & (u < 1))
    se_mean = np.sqrt(1 / 12 / (N // 4))
    np.testing.assert_array_less(np.abs(u.mean(axis=0) - 0.5), 5 * se_mean)
    # columns are not correlated with each other
    c = np.corrcoef(u.T)
    off = c[~np.eye(4, dtype=bool)]
    assert np.abs(off).max() < 5 / np.sqrt(N // 4)
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-4


@pytest.mark.parametrize("n_columns", [None, 3])
def test_keyed_uniform_chunk_invariance(n_columns):
    """A block's numbers depend only on the global row indices, not on the chunking."""
    rows = np.arange(1000)
    whole = keyed_uniform(77, 11, rows, n_columns)
    for bounds in ([0, 1000], [0, 1, 2, 500, 999, 1000], [0, 333, 334, 700, 1000],
                   list(range(0, 1001, 1))):
        parts = [keyed_uniform(77, 11, rows[a:b], n_columns)
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    # the order in which rows are asked for does not matter either
    perm = np.random.default_rng(0).permutation(1000)
    np.testing.assert_array_equal(keyed_uniform(77, 11, rows[perm], n_columns), whole[perm])
    # and python ints, int32 and uint64 row indices give the same numbers
    np.testing.assert_array_equal(keyed_uniform(77, 11, list(range(1000)), n_columns), whole)
    for dtype in (np.int32, np.uint64):
        typed = keyed_uniform(77, 11, rows.astype(dtype), n_columns)
        np.testing.assert_array_equal(typed, whole)


def test_keyed_uniform_deterministic_and_key_sensitive():
    rows = np.arange(5000)
    base = keyed_uniform(1, 2, rows)
    np.testing.assert_array_equal(base, keyed_uniform(1, 2, rows))
    others = [keyed_uniform(2, 2, rows), keyed_uniform(1, 3, rows), keyed_uniform(0, 2, rows),
              keyed_uniform(1, 2, rows + 1)]
    for other in others:
        # independent streams: almost no equal values and no correlation
        assert np.count_nonzero(other == base) == 0
        assert abs(np.corrcoef(base, other)[0, 1]) < 5 / np.sqrt(rows.size)
    # seeds and streams are taken modulo 2**64
    np.testing.assert_array_equal(keyed_uniform(-1, 2, rows), keyed_uniform(2**64 - 1, 2, rows))
    np.testing.assert_array_equal(keyed_uniform(1 + 2**64, 2, rows), base)
    np.testing.assert_array_equal(keyed_uniform(1, 2 + 2**64, rows), base)


def test_keyed_uniform_empty_rows():
    assert keyed_uniform(0, 0, np.arange(0)).shape == (0,)
    assert keyed_uniform(0, 0, np.arange(0), 3).shape == (0, 3)


def test_seed_sequence_int_int_passthrough():
    assert seed_sequence_int(0) == 0
    assert seed_sequence_int(42) == 42
    assert seed_sequence_int(2**40 + 3) == 2**40 + 3
    value = seed_sequence_int(np.int64(7))
    assert value == 7 and type(value) is int
    assert type(seed_sequence_int(np.uint32(9))) is int


def test_seed_sequence_int_none_draws_fresh_entropy():
    draws = {seed_sequence_int(None) for _ in range(20)}
    assert len(draws) == 20
    assert all(type(s) is int and 0 <= s < 2**64 for s in draws)


def test_seed_sequence_int_random_state_like_sklearn():
    # scikit-learn estimators draw randint(np.iinfo(np.int32).max) from a RandomState.
    rs = np.random.RandomState(3)
    expected = np.random.RandomState(3)
    a = seed_sequence_int(rs)
    b = seed_sequence_int(rs)
    assert a == expected.randint(np.iinfo(np.int32).max)
    assert b == expected.randint(np.iinfo(np.int32).max)
    assert a != b  # the RandomState advances
    assert type(a) is int and 0 <= a < np.iinfo(np.int32).max


def test_seed_sequence_int_generator_advances():
    g = np.random.default_rng(11)
    expected = np.random.default_rng(11)
    a, b = seed_sequence_int(g), seed_sequence_int(g)
    assert a == int(expected.integers(2**63))
    assert b == int(expected.integers(2**63))
    assert a != b
    assert type(a) is int


@pytest.mark.parametrize("bad", ["0", 1.5, True, False, [1], object()])
def test_seed_sequence_int_rejects_other_types(bad):
    with pytest.raises(ValueError, match=r"random_state must be None, an int, a numpy "
                                         r"RandomState or Generator\. Got .* instead\."):
        seed_sequence_int(bad)
