"""GaussianMixture's options beyond scikit-learn's: MAP priors, classification EM, variance
regularisation, stopping criteria, collapsed components, sample weights."""

import warnings

import numpy as np
import pytest
import zarr

import dmix
from dmix.engine.stopping import WallClock
from dmix.errors import CollapseWarning, DataError, IllConditionedError, InvalidParameterError


def _data(seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    return np.concatenate([rng.normal(c, [1.0, 0.6], (150, 2)) for c in centers]) + 10.0


X = _data()


# -- MAP ------------------------------------------------------------------------------------


def test_map_fit_increases_the_log_posterior_and_shrinks():
    options = dict(weight_concentration_prior=5.0, mean_prior=[10.0, 10.0],
                   mean_precision_prior=50.0, covariance_prior=np.eye(2),
                   degrees_of_freedom_prior=10.0)
    ml = dmix.GaussianMixture(3, random_state=0, tol=1e-8).fit(X)
    mp = dmix.GaussianMixture(3, random_state=0, tol=1e-8, **options).fit(X)
    bounds = np.array(mp.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-10 * np.abs(bounds[1:]))  # log-posterior ascends
    order = np.argsort(mp.means_[:, 0])
    ml_means = ml.means_[np.argsort(ml.means_[:, 0])]
    # kappa0 = 50 pulls each mean towards m0 = (10, 10)
    m0 = np.array([10.0, 10.0])
    assert np.all(np.linalg.norm(mp.means_[order] - m0, axis=1)
                  < np.linalg.norm(ml_means - m0, axis=1))
    # lower_bound_ is the mean log-posterior: LL + log p(theta) over n
    from dmix.families.priors import log_prior

    family = mp._family
    expected = mp.score(X) + log_prior(family.covariance, mp._params, mp.prior_) / len(X)
    np.testing.assert_allclose(mp.lower_bound_, expected, rtol=1e-5)


def test_map_default_hyperparameters_use_one_pass_over_the_data():
    mp = dmix.GaussianMixture(3, covariance_type="diag", random_state=0,
                              degrees_of_freedom_prior=4.0, mean_precision_prior=0.01).fit(X)
    np.testing.assert_allclose(mp.prior_.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mp.prior_.covariance, X.var(0) / 3 ** (2 / 2), rtol=1e-10)


def test_map_resume_equals_uninterrupted(tmp_path):
    options = dict(weight_concentration_prior=2.0, degrees_of_freedom_prior=5.0,
                   covariance_type="tied", random_state=1, tol=0.0)
    full = dmix.GaussianMixture(3, max_iter=8, **options).fit(X)
    dmix.GaussianMixture(3, max_iter=3, checkpoint=tmp_path / "c", **options).fit(X)
    resumed = dmix.resume(tmp_path / "c", X, max_iter=8)
    np.testing.assert_array_equal(resumed.means_, full.means_)
    np.testing.assert_array_equal(resumed.covariances_, full.covariances_)
    assert resumed.lower_bounds_ == full.lower_bounds_


# -- classification EM ------------------------------------------------------------------------


@pytest.mark.parametrize("cov_type", dmix.COVARIANCE_TYPES)
def test_cem_hard_assignments_and_monotone_classification_likelihood(cov_type):
    gm = dmix.GaussianMixture(3, covariance_type=cov_type, cem=True, random_state=0,
                              tol=0.0, max_iter=30).fit(X)
    bounds = np.array(gm.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-12 * np.abs(bounds[1:]))
    # at the fixed point the parameters are the ML estimates of the hard partition
    labels = gm.predict(X)
    for k in range(3):
        np.testing.assert_allclose(gm.means_[k], X[labels == k].mean(0), rtol=1e-10)
    np.testing.assert_allclose(gm.weights_ * len(X), np.bincount(labels, minlength=3),
                               rtol=1e-10)
    # the lower bound is sum_i max_k log(w_k f_k(x_i)) / n
    soft = gm.predict_proba(X)
    expected = np.mean(gm.score_samples(X) + np.log(soft.max(axis=1)))
    np.testing.assert_allclose(gm.lower_bounds_[-1], expected, rtol=1e-9)


def test_cem_empty_component_is_reseeded():
    # a component placed far away gets no row: it is re-seeded, never NaN
    means = np.array([[10.0, 10.0], [15.0, 11.0], [500.0, 500.0]])
    with pytest.warns(CollapseWarning, match="re-seeded"):
        gm = dmix.GaussianMixture(3, cem=True, means_init=means, random_state=0).fit(X)
    assert gm.n_reseeded_ >= 1
    assert all(np.all(np.isfinite(getattr(gm, a))) for a in ("weights_", "means_",
                                                              "covariances_"))
    assert np.all(np.bincount(gm.predict(X), minlength=3) > 10)  # no empty component left


# -- collapse ---------------------------------------------------------------------------------


def test_collapse_raise_names_the_component():
    means = np.array([[10.0, 10.0], [15.0, 11.0], [500.0, 500.0]])
    with pytest.raises(IllConditionedError, match="component 2 collapsed.*on_collapse='reseed'"):
        dmix.GaussianMixture(3, means_init=means, on_collapse="raise").fit(X)


def test_reseed_uses_the_worst_explained_rows_and_does_not_depend_on_chunks():
    means = np.array([[10.0, 10.0], [15.0, 11.0], [500.0, 500.0]])
    fits = []
    for chunk in (450, 61):
        with pytest.warns(CollapseWarning):
            fits.append(dmix.GaussianMixture(3, means_init=means, chunk_size=chunk, tol=1e-8,
                                             random_state=0).fit(X))
    np.testing.assert_allclose(fits[0].means_, fits[1].means_, rtol=1e-9)
    assert fits[0].n_reseeded_ == fits[1].n_reseeded_ >= 1
    # the re-seeded fit finds the three clusters
    np.testing.assert_allclose(np.sort(fits[0].means_[:, 0]), [10.0, 11.0, 15.0], atol=0.3)


# -- variance regularisation --------------------------------------------------------------------


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical", "tied_diag"])
def test_var_regularization_adds_to_the_diagonal_like_reg_covar(cov_type):
    a = dmix.GaussianMixture(3, covariance_type=cov_type, random_state=0,
                             var_regularization=0.05).fit(X)
    b = dmix.GaussianMixture(3, covariance_type=cov_type, random_state=0,
                             reg_covar=1e-6 + 0.05).fit(X)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-10)
    dense = np.atleast_1d(a.covariances_)
    diag = np.diagonal(dense, axis1=-2, axis2=-1) if cov_type == "full" else dense
    assert np.all(diag > 0.05)


# -- stopping criteria ------------------------------------------------------------------------


def test_stopping_criterion_in_fit():
    exact = dmix.GaussianMixture(3, random_state=0, tol=1e-12, max_iter=1000).fit(X)
    aitken = dmix.GaussianMixture(3, random_state=0, tol=1e-6, max_iter=1000,
                                  stopping_criterion="aitken").fit(X)
    # Aitken stops when its estimate of the limit is within tol of the bound
    assert aitken.converged_
    assert abs(aitken.lower_bound_ - exact.lower_bound_) < 1e-6
    custom = dmix.GaussianMixture(3, random_state=0, stopping_criterion=lambda h: h.n_iter >= 3
                                  ).fit(X)
    assert custom.n_iter_ == 3 and custom.converged_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget = dmix.GaussianMixture(3, random_state=0, tol=0.0, max_iter=500,
                                      stopping_criterion=WallClock(1e-9)).fit(X)
    assert budget.n_iter_ == 1 and not budget.converged_


def test_unknown_stopping_criterion():
    with pytest.raises(InvalidParameterError, match="'fast'"):
        dmix.GaussianMixture(2, stopping_criterion="fast").fit(X)


# -- sample weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("cov_type", ["full", "tied_spherical"])
def test_integer_weights_equal_repeated_rows(cov_type, tmp_path):
    rng = np.random.default_rng(1)
    w = rng.integers(0, 4, size=len(X)).astype(float)
    init = dmix.GaussianMixture(3, covariance_type=cov_type, random_state=0, max_iter=1).fit(X)
    start = dict(weights_init=init.weights_, means_init=init.means_,
                 precisions_init=init.precisions_, covariance_type=cov_type, tol=0.0,
                 max_iter=15)
    weighted = dmix.GaussianMixture(3, **start).fit(X, sample_weight=w)
    repeated = dmix.GaussianMixture(3, **start).fit(np.repeat(X, w.astype(int), axis=0))
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(weighted, name), getattr(repeated, name),
                                   rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weighted.lower_bounds_, repeated.lower_bounds_, rtol=1e-10)
    # the same weights from a Zarr array beside the data, in other chunks
    store = zarr.create_array(tmp_path / "w.zarr", shape=w.shape, chunks=(100,), dtype="f8")
    store[:] = w
    from_zarr = dmix.GaussianMixture(3, chunk_size=50, **start).fit(
        X, sample_weight=str(tmp_path / "w.zarr"))
    np.testing.assert_allclose(from_zarr.means_, weighted.means_, rtol=1e-10)


@pytest.mark.parametrize("weights, match", [
    (np.ones(10), r"must have shape \(450,\)"),
    (np.r_[-1.0, np.ones(449)], "non-negative"),
    (np.r_[np.nan, np.ones(449)], "non-finite"),
    (np.zeros(450), "positive sum"),
])
def test_bad_sample_weight(weights, match):
    with pytest.raises(DataError, match=match):
        dmix.GaussianMixture(2).fit(X, sample_weight=weights)


def test_option_errors_name_the_value():
    with pytest.raises(InvalidParameterError, match="'on_collapse' parameter"):
        dmix.GaussianMixture(2, on_collapse="ignore").fit(X)
    with pytest.raises(InvalidParameterError, match="annealing_start"):
        dmix.GaussianMixture(2, annealing=True, annealing_start=0.0).fit(X)
    with pytest.raises(InvalidParameterError, match="var_regularization"):
        dmix.GaussianMixture(2, var_regularization=-1.0).fit(X)


# -- sampling and persistence with the options -----------------------------------------------


def test_sample_inside_a_confidence_region_of_one_component():
    from scipy.stats import chi2

    gm = dmix.GaussianMixture(3, random_state=0).fit(X)
    x, labels = gm.sample(2000, component=1, confidence=0.5)
    assert np.all(labels == 1)
    diff = x - gm.means_[1]
    r2 = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(gm.covariances_[1]), diff)
    assert np.all(r2 <= chi2.ppf(0.5, 2) * (1 + 1e-12))
    x, _ = gm.sample(500, std_range=(2.0, 3.0))
    assert x.shape == (500, 2)
    with pytest.raises(InvalidParameterError, match="confidence"):
        gm.sample(10, confidence=1.5)


def test_save_and_load_keep_the_prior_and_the_stopping_criterion(tmp_path):
    gm = dmix.GaussianMixture(3, covariance_type="diag", random_state=0,
                              degrees_of_freedom_prior=5.0, mean_precision_prior=0.1,
                              stopping_criterion=WallClock(3600.0)).fit(X)
    gm.save(tmp_path / "m")
    loaded = dmix.load(tmp_path / "m")
    assert loaded.prior_ == gm.prior_
    assert loaded.stopping_criterion == {"name": "wall_clock", "seconds": 3600.0}
    np.testing.assert_array_equal(loaded.score_samples(X), gm.score_samples(X))
    assert loaded.lower_bound_ == gm.lower_bound_
    # refitting the loaded model gives the same fit (the options came back)
    refit = loaded.fit(X)
    np.testing.assert_array_equal(refit.means_, gm.means_)
    with pytest.raises(InvalidParameterError, match="is a function"):
        dmix.GaussianMixture(2, stopping_criterion=lambda h: True).fit(X).save(tmp_path / "f")


def test_missing_values_in_process_are_chunk_invariant():
    rng = np.random.default_rng(4)
    holes = X.copy()
    holes[rng.random(X.shape) < 0.2] = np.nan
    a = dmix.GaussianMixture(3, missing="marginalize", random_state=0, tol=1e-8).fit(holes)
    b = dmix.GaussianMixture(3, missing="marginalize", random_state=0, tol=1e-8,
                             chunk_size=37).fit(holes)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9)
    # the means are close to those of the complete data
    full = dmix.GaussianMixture(3, random_state=0).fit(X)
    order = [int(np.argmin(np.linalg.norm(a.means_ - m, axis=1))) for m in full.means_]
    np.testing.assert_allclose(a.means_[order], full.means_, atol=0.15)
    with pytest.raises(InvalidParameterError, match="missing='marginalize'"):
        dmix.GaussianMixture(3, missing="marginalize", cem=True).fit(holes)
