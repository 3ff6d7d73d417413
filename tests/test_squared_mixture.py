"""dmix.SquaredGaussianMixture: the donut a Gaussian mixture cannot fit, gradient training on
the engine (full batch and stochastic, Adam and L-BFGS, held-out early stopping, exact
resume), and the estimator's surface (inference, save/load, errors, the CLI)."""

import warnings

import dask.array as da
import numpy as np
import pytest
import zarr

import dmix
from dmix.cli import main as cli_main
from dmix.datasets import make_shape
from dmix.engine.loop import History, Monitor
from dmix.families.squared import SquaredGaussian
from dmix.rng import seed_sequence_int


@pytest.fixture(scope="module")
def donut():
    x = make_shape("donut", 6000, seed=0).rows(0, 6000)
    return x[:4000], x[4000:]


def _fit(x, **options):
    options = {"n_components": 3, "random_state": 0, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dmix.SquaredGaussianMixture(**options).fit(x)


def _true_log_density(x):
    """The donut's own density: radius ~ N(3, 0.5^2), uniform angle, so
    ``p(x) = N(|x|; 3, 0.5^2) / (2 pi |x|)``."""
    r = np.hypot(x[:, 0], x[:, 1])
    return -0.5 * ((r - 3.0) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi)) - np.log(2 * np.pi * r)


def test_three_squared_components_fit_a_donut_that_three_gaussians_cannot(donut):
    train, test = donut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm = dmix.GaussianMixture(3, n_init=5, random_state=0, max_iter=300, tol=1e-6)
        gmm.fit(train)
    squared = _fit(train, init_params="nested", optimizer="lbfgs", n_init=3, max_iter=300)
    assert squared.converged_
    # Held-out mean log-likelihood per row, measured: squared -3.668, Gaussian mixture -3.892,
    # the donut's own density -3.641 (squared - truth: -0.027 with a standard error of 0.004;
    # squared - GMM: 0.224, standard error 0.012).
    truth = _true_log_density(test).mean()
    assert squared.score(test) == pytest.approx(truth, abs=0.05)
    gain = squared.score_samples(test) - gmm.score_samples(test)
    se = gain.std() / np.sqrt(gain.size)
    assert gain.mean() > 0.15 and gain.mean() > 10 * se
    assert gmm.score(test) < truth - 0.2
    assert np.sum(squared.weights_ < 0) >= 1  # the hole is a subtracted component


def test_lbfgs_converges_where_adam_gets_to(donut):
    train, _ = donut
    lbfgs = _fit(train, init_params="nested", optimizer="lbfgs", max_iter=300)
    assert lbfgs.converged_
    adam = _fit(train, init_params="nested", learning_rate=0.03, max_iter=300, tol=0.0)
    # Full-batch Adam keeps the best iterate; L-BFGS reaches at least as high.
    assert lbfgs.lower_bound_ >= adam.lower_bound_ - 1e-3
    assert adam.lower_bound_ == pytest.approx(max(adam.lower_bounds_), rel=1e-15)


def test_inference_and_criteria(donut):
    train, test = donut
    model = _fit(train, max_iter=40, covariance_type="diag")
    assert model.covariances_.shape == (3, 2)
    proba = model.predict_proba(test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.predict(test), proba.argmax(axis=1))
    lp = model.score_samples(test)
    family = SquaredGaussian(covariance_type="diag")
    np.testing.assert_allclose(lp, family.log_density(model._params, test, np), rtol=1e-13)
    assert model.score(test) == pytest.approx(lp.mean(), rel=1e-12)
    n, p = len(test), 2 + 6 + 6  # K - 1 weights (scale-free), means, variances
    assert model._n_parameters() == p
    assert model.bic(test) == pytest.approx(-2 * lp.sum() + p * np.log(n), rel=1e-12)
    assert model.aic(test) == pytest.approx(-2 * lp.sum() + 2 * p, rel=1e-12)
    assert model.log_normalizer_ == pytest.approx(
        float(family.make_params(model.weights_, model.means_, model.covariances_)
              ["log_normalizer"]), rel=1e-14)


def test_the_fit_does_not_depend_on_the_chunking(donut):
    train, _ = donut
    a = _fit(train, max_iter=12, tol=0.0, chunk_size=333)
    b = _fit(da.from_array(train, chunks=(1000, 2)), max_iter=12, tol=0.0)
    for key in ("weights", "means", "covariances"):
        np.testing.assert_allclose(getattr(a, f"{key}_"), getattr(b, f"{key}_"), rtol=1e-9)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)


class _Crash(Exception):
    pass


class _CrashAfter(Monitor):
    """Stops the process's fit by an exception after ``n`` iterations (a killed job)."""

    def __init__(self, n):
        self.n = n

    def end_iteration(self, record):
        if record.iteration == self.n:
            raise _Crash


@pytest.mark.parametrize("options", [
    dict(optimizer="adam", learning_rate_schedule="cosine"),
    dict(optimizer="lbfgs"),
    dict(optimizer="adam", batch_fraction=0.5, validation_fraction=0.2),
], ids=["adam", "lbfgs", "stochastic-heldout"])
def test_resume_continues_the_optimizer_exactly(donut, tmp_path, options):
    train, _ = donut
    x = da.from_array(train, chunks=(500, 2))
    full = _fit(x, max_iter=14, tol=0.0, **options)
    with pytest.raises(_Crash), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dmix.SquaredGaussianMixture(3, random_state=0, max_iter=14, tol=0.0,
                                    checkpoint=tmp_path / "c", **options).fit(
            x, monitor=_CrashAfter(6))
    resumed = dmix.resume(tmp_path / "c", x)
    assert type(resumed) is dmix.SquaredGaussianMixture
    for key in ("weights", "means", "covariances"):
        np.testing.assert_array_equal(getattr(resumed, f"{key}_"), getattr(full, f"{key}_"))
    assert resumed.lower_bounds_ == full.lower_bounds_


def test_stochastic_steps_read_a_keyed_subset_of_chunks(donut):
    train, _ = donut
    family = SquaredGaussian(batch_fraction=0.25, random_state=7)
    picks = [tuple(family.for_iteration(t).block_subset(8)) for t in range(20)]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks)
    assert len(set(picks)) > 5  # they change with the step
    assert picks == [tuple(family.for_iteration(t).block_subset(8)) for t in range(20)]
    assert SquaredGaussian().block_subset(8) is None
    x = da.from_array(train, chunks=(500, 2))
    nested = dict(init_params="nested", max_iter=40, tol=0.0)
    a = _fit(x, batch_fraction=0.25, **nested)
    b = _fit(x, batch_fraction=0.25, **nested)
    np.testing.assert_array_equal(a.means_, b.means_)
    whole = _fit(x, **nested)
    assert not np.allclose(a.means_, whole.means_)
    start = _fit(x, init_params="nested", max_iter=0).score(train)
    # It learns about as fast per step as full batches do.
    assert a.score(train) - start > 0.5 * (whole.score(train) - start) > 0.02


def test_heldout_rows_stop_early_and_keep_the_best(donut):
    train, _ = donut
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dmix.SquaredGaussianMixture(
            3, random_state=0, validation_fraction=0.25, learning_rate=0.2, max_iter=400,
            n_iter_no_change=5, tol=1e-3).fit(train, monitor=history)
    bounds = np.array(model.lower_bounds_)
    assert model.converged_ and model.n_iter_ < 400
    assert model.lower_bound_ == bounds.max()
    best = int(np.argmax(bounds))
    assert len(bounds) - 1 - best >= 5  # stopped after 5 steps without a gain of tol
    # The held-out rows are the same for every chunking and are about a quarter.
    family = SquaredGaussian(validation_fraction=0.25, random_state=3)
    held = family.heldout_rows(0, 4000)
    np.testing.assert_array_equal(np.concatenate([family.heldout_rows(0, 1234),
                                                  family.heldout_rows(1234, 4000 - 1234)]),
                                  held)
    assert abs(held.mean() - 0.25) < 0.03
    # The recorded objective is the held-out rows' mean log-likelihood.
    params = model._params
    rows = SquaredGaussian(validation_fraction=0.25,
                           random_state=seed_sequence_int(0)).heldout_rows(0, 4000)
    lp = SquaredGaussian().log_density(params, train[rows], np)
    assert model.lower_bound_ == pytest.approx(lp.mean(), rel=1e-10)


def test_user_initial_parameters_with_negative_weights(donut):
    train, _ = donut
    c = np.cov(train.T)
    start = dict(weights_init=[1.0, -1.0, 0.2], means_init=np.zeros((3, 2)),
                 covariances_init=np.array([c, 0.5 * c, 0.7 * c]))
    model = _fit(train, max_iter=0, **start)
    np.testing.assert_array_equal(model.weights_, [1.0, -1.0, 0.2])
    np.testing.assert_allclose(model.covariances_[1], 0.5 * c, rtol=1e-14)
    with pytest.raises(dmix.DataError, match="weights_init"):
        _fit(train, weights_init=[0.0, 0.0, 0.0])
    with pytest.raises(dmix.DataError, match="covariances_init"):
        _fit(train, covariances_init=np.ones((3, 2, 2)))


@pytest.mark.parametrize("options, match", [
    (dict(covariance_type="tied"), "covariance_type"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(optimizer="lbfgs", batch_fraction=0.5), "full batches"),
    (dict(batch_fraction=0.0), "batch_fraction"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate_schedule="step"), "learning_rate_schedule"),
    (dict(init_params="nestd"), "init_params"),
])
def test_invalid_options_are_named(donut, options, match):
    with pytest.raises(dmix.InvalidParameterError, match=match):
        _fit(donut[0][:100], **options)


def test_save_load_and_the_cli(donut, tmp_path, capsys):
    train, test = donut
    store = tmp_path / "donut.zarr"
    assert cli_main(["make-data", str(store), "--shape", "donut", "-n", "4000",
                     "--chunk-size", "1000", "--seed", "0"]) == 0
    x = zarr.open_group(store, mode="r")["X"][:]
    np.testing.assert_array_equal(x, train)
    out = tmp_path / "model"
    assert cli_main(["fit", str(store), "-k", "3", "--model", "squared", "--seed", "0",
                     "--max-iter", "15", "--tol", "0", "--init-params", "nested",
                     "--learning-rate", "0.03", "--output", str(out)]) == 0
    loaded = dmix.load(out)
    assert type(loaded) is dmix.SquaredGaussianMixture
    expected = _fit(str(store), max_iter=15, tol=0.0, init_params="nested",
                    learning_rate=0.03)
    np.testing.assert_allclose(loaded.weights_, expected.weights_, rtol=1e-10)
    np.testing.assert_array_equal(loaded.score_samples(test), loaded.score_samples(test))
    assert cli_main(["sample", "--model", str(out), "--n-samples", "300", "--seed", "1",
                     "--output", str(tmp_path / "s")]) == 0
    drawn = zarr.open_group(tmp_path / "s", mode="r")
    assert drawn["X"].shape == (300, 2)
    expected.save(tmp_path / "m2")
    again = dmix.load(tmp_path / "m2")
    np.testing.assert_array_equal(again.score_samples(test), expected.score_samples(test))
    assert cli_main(["fit", str(store), "-k", "3", "--model", "skew", "--optimizer",
                     "adam"]) != 0
    assert "--optimizer is an option of gradient training" in capsys.readouterr().err


def test_heldout_sums_with_row_weights(donut):
    """With sample weights (the block's last column), the held-out rows add their weighted
    log-likelihood and weight; the others the weighted training sums."""
    train, _ = donut
    x = train[:500]
    w = np.random.default_rng(3).uniform(0.0, 2.0, size=len(x))
    family = SquaredGaussian(validation_fraction=0.3, random_state=11, weighted=True)
    params = _fit(train, max_iter=5)._params
    stats = family.estep(params, np.column_stack([x, w]), np, start=100)
    held = family.heldout_rows(100, len(x))
    lp = SquaredGaussian().log_density(params, x, np)
    assert float(stats["val_n"]) == pytest.approx(w[held].sum(), rel=1e-14)
    assert float(stats["val_loglik"]) == pytest.approx(np.sum(w[held] * lp[held]), rel=1e-12)
    assert float(stats["n"]) == pytest.approx(w[~held].sum(), rel=1e-14)
    assert float(stats["loglik"]) == pytest.approx(np.sum(w[~held] * lp[~held]), rel=1e-12)
