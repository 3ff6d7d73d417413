"""Tests of the statistics helpers in dmix.families.base."""

import numpy as np
import pytest

from dmix.families.base import tree_accumulate, tree_add


def _parts(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"n": float(rng.integers(1, 9)), "loglik": rng.normal(),
             "nk": rng.normal(size=3), "s1": rng.normal(size=(4, 3)).T,  # a transposed view
             "zero_d": np.float64(rng.normal())} for _ in range(n)]


def test_tree_accumulate_equals_tree_add_and_leaves_parts_alone():
    parts = _parts()
    frozen = [{k: np.copy(v) for k, v in p.items()} for p in parts]
    total = None
    for p in parts:
        total = tree_accumulate(total, p)
    expected = parts[0]
    for p in parts[1:]:
        expected = tree_add(expected, p)
    assert total.keys() == expected.keys()
    for key in expected:  # the same additions in the same order: bit for bit
        np.testing.assert_array_equal(total[key], expected[key], err_msg=key)
    for p, f in zip(parts, frozen, strict=True):
        for key in p:
            np.testing.assert_array_equal(p[key], f[key], err_msg=key)
    assert total["nk"] is not parts[0]["nk"]


def test_tree_accumulate_rejects_other_keys():
    a, b = _parts(2)
    del b["nk"]
    with pytest.raises(ValueError, match=r"Cannot add statistics with keys"):
        tree_accumulate(tree_accumulate(None, a), b)
