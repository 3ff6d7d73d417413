"""The stochastic EM of the deep families (model-math section 3.2) in numbers.

* The SEM statistics of a block, averaged over many seeds, equal their expectation: the exact
  E-step's posterior sums (section 3.3) with the SEM shifts, within 5 Monte Carlo standard
  errors, for a deep mixture (h = 2) and a network (h = 3).
* A block's statistics do not depend on how the engine splits it into sub-batches: the global
  row index reaches each one (``needs_row_index``); families without the attribute are called
  without ``start``.
* The draws change with the seed and the iteration (``for_iteration`` records it), and the
  per-fit fields stay out of the family spec.
"""

import numpy as np
import pytest

from dmix.engine.loop import _estep_block, step_family
from dmix.errors import InvalidParameterError
from dmix.families import _sem
from dmix.families.base import family_spec, tree_add
from dmix.families.deep import DeepGaussian, GaussianNetwork
from dmix.xp import Workspace


def _model(family, d, seed):
    """Random parameters of ``family`` for ``d`` features."""
    rng = np.random.default_rng(seed)
    sizes, full = family.layer_sizes, (d, *family.layer_dims)
    weights = [rng.dirichlet(np.ones(k) * 3) for k in sizes]
    if isinstance(family, GaussianNetwork):
        weights = [rng.dirichlet(np.ones(sizes[i]) * 2, size=sizes[i + 1]).T
                   for i in range(len(sizes) - 1)] + [weights[-1]]
    return family.make_params(
        weights, [rng.normal(scale=1.5, size=(k, full[i])) for i, k in enumerate(sizes)],
        [rng.normal(size=(k, full[i], full[i + 1])) for i, k in enumerate(sizes)],
        [rng.uniform(0.2, 1.0, size=(k, full[i])) for i, k in enumerate(sizes)])


def _data(family, params, n, seed):
    x, _ = family.sample(params, n, np.random.default_rng(seed))
    return x[np.random.default_rng(seed + 1).permutation(n)]


@pytest.mark.parametrize("cls, sizes, dims", [
    (DeepGaussian, (2, 2), (2, 1)),
    (GaussianNetwork, (2, 2, 1), (3, 2, 1)),
])
def test_sem_statistics_average_to_the_exact_posterior_sums(cls, sizes, dims):
    exact = cls(sizes, dims)
    params = _model(exact, 4, seed=3)
    x = _data(exact, params, 25, seed=4)
    expected = _sem.expected_statistics(exact, params, exact.estep(params, x, np))
    draws = [cls(sizes, dims, fit_method="stochastic", random_state=seed).estep(
        params, x, np, Workspace(), start=1000) for seed in range(1500)]
    for key, want in expected.items():
        values = np.array([np.asarray(d[key], dtype=np.float64) for d in draws])
        mean = values.mean(axis=0)
        se = values.std(axis=0, ddof=1) / np.sqrt(len(draws))
        scale = np.max(np.abs(want)) + 1.0
        # 5 standard errors per entry (a few hundred entries: a false alarm ~1e-4), plus a
        # draw of probability p < ~2 / 1500 that never happened (a row almost surely on one
        # path: no sample variance, bias p times one row's share): 1e-3 of the scale.
        assert np.all(np.abs(mean - want) <= 5 * se + 1e-3 * scale), key
    # the test has power: one draw's spread is 10 times the bias allowance
    sab = np.array([d["sem0/sab"] for d in draws])
    assert np.max(sab.std(axis=0)) > 0.01 * np.max(np.abs(expected["sem0/sab"]))


def test_weighted_sem_statistics_average_to_the_weighted_posterior_sums():
    """With row weights (the block's last column) each row draws once and counts w_i times:
    the average over seeds is the weighted exact E-step's, and unit weights change nothing."""
    exact = DeepGaussian((2, 2), (2, 1), weighted=True)
    params = _model(exact, 3, seed=5)
    x = _data(exact, params, 20, seed=6)
    w = np.random.default_rng(7).uniform(0.0, 3.0, size=20)
    xw = np.column_stack([x, w])
    expected = _sem.expected_statistics(exact, params, exact.estep(params, xw, np))
    assert expected["n"] == pytest.approx(np.sum(w), rel=1e-14)
    draws = [DeepGaussian((2, 2), (2, 1), weighted=True, fit_method="stochastic",
                          random_state=seed).estep(params, xw, np, Workspace(), start=50)
             for seed in range(1500)]
    for key, want in expected.items():
        values = np.array([np.asarray(d[key], dtype=np.float64) for d in draws])
        se = values.std(axis=0, ddof=1) / np.sqrt(len(draws))
        scale = np.max(np.abs(want)) + 1.0
        assert np.all(np.abs(values.mean(axis=0) - want) <= 5 * se + 1e-3 * scale), key
    plain = DeepGaussian((2, 2), (2, 1), fit_method="stochastic", random_state=9)
    ones = DeepGaussian((2, 2), (2, 1), weighted=True, fit_method="stochastic", random_state=9)
    a = plain.estep(params, x, np, start=50)
    b = ones.estep(params, np.column_stack([x, np.ones(20)]), np, start=50)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.parametrize("cls", [DeepGaussian, GaussianNetwork])
def test_block_statistics_do_not_depend_on_the_sub_batches(cls):
    family = cls((3, 2), (2, 1), fit_method="stochastic", random_state=11, iteration=4)
    params = _model(family, 3, seed=1)
    x = _data(family, params, 50, seed=2)
    whole = family.estep(params, x, np, Workspace(), start=300)
    for rows in (7, 16, 50):
        split = _estep_block(x, 300, 0, family, params, rows, "the data")
        for key in whole:
            np.testing.assert_allclose(split[key], whole[key], rtol=1e-12, atol=1e-12,
                                       err_msg=key)
    # two blocks of the same rows at their global indices give the same sums
    parts = tree_add(family.estep(params, x[:20], np, start=300),
                     family.estep(params, x[20:], np, start=320))
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key], rtol=1e-12, atol=1e-12)
    # another offset draws other numbers
    moved = family.estep(params, x, np, Workspace(), start=301)
    assert not np.allclose(moved["sem0/sab"], whole["sem0/sab"])


def test_families_without_row_index_are_called_as_before():
    calls = []

    class Plain:
        def estep(self, params, x, xp, workspace=None):  # no ``start``: must not get one
            calls.append(x.shape[0])
            return {"n": float(x.shape[0]), "loglik": 0.0, "n_nonfinite": 0.0}

    stats = _estep_block(np.zeros((10, 2)), 40, 0, Plain(), {}, 4, "the data")
    assert calls == [4, 4, 2] and stats["n"] == 10
    assert not DeepGaussian((2,), (1,)).needs_row_index
    assert DeepGaussian((2,), (1,), fit_method="stochastic").needs_row_index


def test_draws_are_keyed_by_seed_and_iteration():
    base = DeepGaussian((2, 2), (2, 1), fit_method="stochastic", random_state=5)
    params = _model(base, 3, seed=0)
    x = _data(base, params, 40, seed=1)

    def sab(family):
        return family.estep(params, x, np, Workspace(), start=0)["sem0/sab"]

    step = step_family(base, 7)
    assert step.iteration == 7 and base.iteration == 0
    np.testing.assert_array_equal(sab(step), sab(step_family(base, 7)))
    assert not np.allclose(sab(step), sab(step_family(base, 8)))
    assert not np.allclose(sab(step), sab(step_family(DeepGaussian(
        (2, 2), (2, 1), fit_method="stochastic", random_state=6), 7)))
    # exact EM: for_iteration leaves the family as it is (no annealing)
    exact = DeepGaussian((2, 2), (2, 1))
    assert exact.for_iteration(7) is exact


def test_spec_keeps_per_fit_fields_out():
    exact = family_spec(DeepGaussian((2, 1), (2, 1)))
    assert not {"fit_method", "random_state", "iteration"} & set(exact)
    sem = DeepGaussian((2, 1), (2, 1), fit_method="stochastic")
    spec = family_spec(sem)
    assert spec["fit_method"] == "stochastic" and "iteration" not in spec
    stepped = step_family(sem.__class__((2, 1), (2, 1), fit_method="stochastic",
                                        random_state=3), 5)
    assert family_spec(stepped)["iteration"] == 5  # the step family is never saved


def test_bad_values_raise():
    with pytest.raises(InvalidParameterError, match="'exact' or 'stochastic'"):
        DeepGaussian((2,), (1,), fit_method="sem")
    with pytest.raises(InvalidParameterError, match="random_state.*must be an int"):
        DeepGaussian((2,), (1,), fit_method="stochastic", random_state=1.5)
