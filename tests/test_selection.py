"""dmix.select and the shared passes of n_init: the same models as fitted alone, one read of
every block per iteration for the whole grid."""

import collections

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dmix
from dmix.errors import InvalidParameterError

X = load_iris().data
READS = collections.Counter()


def _counted(block, block_info=None):
    READS[block_info[0]["chunk-location"][0]] += 1
    return block


def _counting_array(x, rows):
    base = da.from_array(x, chunks=(rows, x.shape[1]))
    return base.map_blocks(_counted, dtype=x.dtype)


def test_select_equals_fitting_each_model_alone():
    grid = dict(n_components=[2, 3], covariance_types=["full", "diag", "tied_spherical"])
    sel = dmix.select(X, **grid, n_init=2, random_state=3, tol=1e-4)
    assert len(sel.table) == 6
    for row in sel.table:
        alone = dmix.GaussianMixture(row["n_components"], covariance_type=row["covariance_type"],
                                     n_init=2, random_state=3, tol=1e-4).fit(X)
        model = sel.models[(row["n_components"], row["covariance_type"])]
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_array_equal(getattr(model, name), getattr(alone, name))
        assert model.lower_bounds_ == alone.lower_bounds_ and row["n_iter"] == alone.n_iter_
        np.testing.assert_allclose(row["bic"], alone.bic(X), rtol=1e-12)
        np.testing.assert_allclose(row["aic"], alone.aic(X), rtol=1e-12)
        np.testing.assert_allclose(row["log_likelihood"], alone.score(X) * len(X), rtol=1e-12)
        # ICL = BIC + 2 * entropy of the responsibilities
        resp = alone.predict_proba(X)
        entropy = -np.sum(resp * np.log(np.where(resp > 0, resp, 1.0)))
        np.testing.assert_allclose(row["icl"], row["bic"] + 2 * entropy, rtol=1e-10)
    best = min(sel.table, key=lambda r: r["bic"])
    assert (sel.best.n_components, sel.best.covariance_type) == (
        best["n_components"], best["covariance_type"])
    table, model = sel  # unpacks as (table, best)
    assert model is sel.best and "*" in sel.to_string()


def test_select_bic_agrees_with_sklearn_on_iris():
    sel = dmix.select(X, [1, 2, 3, 4], ["full", "diag"], n_init=5, random_state=0)
    sk_best = min(
        ((k, t) for k in (1, 2, 3, 4) for t in ("full", "diag")),
        key=lambda kt: SkGaussianMixture(kt[0], covariance_type=kt[1], n_init=5,
                                         random_state=0).fit(X).bic(X))
    assert (sel.best.n_components, sel.best.covariance_type) == sk_best == (2, "full")


def test_the_grid_reads_each_block_once_per_iteration():
    READS.clear()
    data = _counting_array(X, 30)  # 5 blocks
    with dask.config.set(scheduler="sync"):
        sel = dmix.select(data, [2, 3], ["full", "diag"], random_state=0,
                          init_params="random_from_data", persist=False, tol=1e-4)
    n_runs = 2 * 2
    iterations = max(r.n_iter_ for r in sel.models.values())
    # per block: one summary pass per run's initialisation, one pass per iteration of the
    # longest run (the others leave the pass when they end), one pass to score the models
    assert set(READS) == set(range(5))
    assert set(READS.values()) == {n_runs + iterations + 1}
    alone = sum(m.n_iter_ for m in sel.models.values())
    assert iterations + 1 < alone  # fitted one by one, the iterations alone read more


def test_n_init_shares_the_passes_and_equals_sequential_restarts(tmp_path):
    READS.clear()
    data = _counting_array(X, 50)
    with dask.config.set(scheduler="sync"):
        shared = dmix.GaussianMixture(3, n_init=3, random_state=1, persist=False,
                                      init_params="random_from_data").fit(data)
    reads = READS[0]
    # with a checkpoint the restarts run one after the other: same result
    sequential = dmix.GaussianMixture(3, n_init=3, random_state=1, init_params="random_from_data",
                                      chunk_size=50,
                                      checkpoint=tmp_path / "c").fit(X)
    np.testing.assert_array_equal(shared.means_, sequential.means_)
    assert shared.lower_bounds_ == sequential.lower_bounds_
    assert reads < 3 + 3 * shared.n_iter_


def test_select_errors():
    with pytest.raises(InvalidParameterError, match="criterion must be one of"):
        dmix.select(X, [2], criterion="hqc")
    with pytest.raises(InvalidParameterError, match="unknown covariance type 'round'"):
        dmix.select(X, [2], ["round"])
    with pytest.raises(InvalidParameterError, match="n_components must be ints >= 1"):
        dmix.select(X, [0, 2])
    with pytest.raises(InvalidParameterError, match="does not take 'means_init'"):
        dmix.select(X, [2], means_init=X[:2])


def test_select_checkpoints_and_resumes_exactly(tmp_path):
    grid = dict(n_components=[2, 3], covariance_types=["full", "diag"], n_init=2,
                random_state=7, tol=1e-6)
    whole = dmix.select(X, **grid, max_iter=40)
    ckpt = tmp_path / "grid"
    dmix.select(X, **grid, max_iter=3, checkpoint=ckpt)
    resumed = dmix.select(X, **grid, max_iter=40, checkpoint=ckpt, resume=True)
    for a, b in zip(whole.table, resumed.table, strict=True):
        assert a == b
    np.testing.assert_array_equal(resumed.best.means_, whole.best.means_)
    with pytest.raises(dmix.DmixError, match="holds checkpoints of an earlier run"):
        dmix.select(X, **grid, checkpoint=ckpt)
    with pytest.raises(dmix.CheckpointMismatchError, match="grid"):
        dmix.select(X, **dict(grid, n_components=[2, 4]), checkpoint=ckpt, resume=True)


def test_select_with_default_priors_equals_fitting_alone():
    # the data moments behind the default hyperparameters are computed once for the grid
    options = dict(random_state=0, degrees_of_freedom_prior=6.0, mean_precision_prior=0.05)
    sel = dmix.select(X, [2, 3], ["full", "spherical"], **options)
    for (k, t), model in sel.models.items():
        alone = dmix.GaussianMixture(k, covariance_type=t, **options).fit(X)
        assert model.prior_ == alone.prior_
        np.testing.assert_array_equal(model.means_, alone.means_)
        assert model.lower_bounds_ == alone.lower_bounds_
