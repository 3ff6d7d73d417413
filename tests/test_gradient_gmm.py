"""GaussianMixture(fit_method='gradient'): the gradient of the EM statistics against central
differences, L-BFGS reaching EM's optimum, Adam, chunk invariance, exact resumes, held-out
early stopping, re-seeding of components that become non-finite, and the option checks."""

import warnings

import numpy as np
import pytest

import dmix
from dmix import GaussianMixture
from dmix.engine.loop import Monitor, estep_pass
from dmix.errors import CollapseWarning, ConvergenceWarning, InvalidParameterError
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.gaussian_gradient import GaussianGradient
from dmix.testing import FamilyTests, structured_covariances

TYPES = list(COVARIANCE_TYPES)
#: A criterion that never fires within a test (so fits run ``max_iter`` steps) and can be
#: saved with a checkpoint.
NEVER = "wall_clock:3600"


def blobs(d, seed=0):
    """Three well-separated, well-conditioned clusters of 200, 150 and 100 rows."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.normal(size=(3, d))
    scales = (1.0, 0.6, 0.3)
    parts = [c + s * rng.normal(size=(m, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
             for c, s, m in zip(centres, scales, (200, 150, 100), strict=True)]
    return np.concatenate(parts) + 10.0  # away from the origin: the shift matters


def start_params(family, x, k=3, seed=0):
    rng = np.random.default_rng(seed)
    dense = np.stack([np.cov(x.T) * s + 0.1 * np.eye(x.shape[1]) for s in (0.3, 0.6, 1.0)])
    means = x[rng.choice(x.shape[0], k, replace=False)]
    return family.start(family.make_params([0.2, 0.3, 0.5], means,
                                           structured_covariances(dense[:k],
                                                                  family.covariance_type)))


# -- the maths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", TYPES)
def test_scatter_identity(covariance_type):
    """estimate(nk, b, 0, 0) is minus the structure's outer product, so
    N Sigma_hat = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T in the structure's form."""
    cov = get_covariance(covariance_type)
    rng = np.random.default_rng(1)
    nk, b = rng.uniform(1, 5, 3), rng.normal(size=(3, 4))
    zero = cov.from_quadratic(np.zeros((cov.n_quadratic(4), 3)))
    dense_outer = np.einsum("ka,kb->kab", b, b) * (nk / nk.sum())[:, None, None]
    expected = {"full": -b[:, :, None] * b[:, None, :], "tied": -dense_outer.sum(0),
                "diag": -b * b, "spherical": -np.mean(b * b, axis=1),
                "tied_diag": -np.diagonal(dense_outer, axis1=1, axis2=2).sum(0),
                "tied_spherical": -np.trace(dense_outer.sum(0)) / 4}[cov.name]
    np.testing.assert_allclose(cov.estimate(nk, b, zero, 0.0), expected, rtol=1e-13)

    family = GaussianGradient(covariance_type=covariance_type)
    x = blobs(3)
    params = start_params(family, x)
    sigma_hat, weight = family.scatter(params, family.estep(params, x, np))
    resp = family.predict_proba(params, x, np)
    diff = x[:, None, :] - params["means"][None]
    scat = np.einsum("nk,nka,nkb->kab", resp, diff, diff)
    diag = np.diagonal(scat, axis1=1, axis2=2)
    expected = {"full": scat, "tied": scat.sum(0), "diag": diag, "spherical": diag.sum(1),
                "tied_diag": diag.sum(0), "tied_spherical": diag.sum()}[covariance_type]
    np.testing.assert_allclose(weight * sigma_hat, expected, rtol=1e-12,
                               atol=1e-12 * np.max(np.abs(expected)))


@pytest.mark.parametrize("covariance_type", TYPES)
def test_gradient_matches_central_differences(covariance_type):
    family = GaussianGradient(covariance_type=covariance_type, reg_covar=1e-3)
    x = blobs(3)
    params = start_params(family, x)
    theta = family._pack(params)
    value, grad = family._value_and_gradient(params, family.estep(params, x, np))

    def f(t):
        p, bad = family._unpack(t, params)
        assert bad.size == 0
        return float(np.mean(family.log_density(p, x, np)))

    assert value == pytest.approx(f(theta), rel=1e-13)
    h = 1e-5
    fd = np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h)
                   for e in np.eye(theta.size)])
    err = np.max(np.abs(fd - grad)) / np.max(np.abs(grad))
    assert err < 1e-6, err  # measured 2e-10 .. 5e-10
    # theta round-trips (the logits' gauge is pinned to zero mean)
    again, _ = family._unpack(theta, params)
    np.testing.assert_allclose(family._pack(again), theta, rtol=0, atol=1e-12)
    owners = family._owners(params)
    assert owners.shape == theta.shape
    assert np.all(owners[-1:] == (-1 if family.covariance.tied else 2))


class TestGaussianGradientFamily(FamilyTests):
    """The conformance properties (chunk invariance of the summed statistics included)."""

    monotone = False

    @pytest.fixture(params=["full", "tied_diag"])
    def family(self, request):
        return GaussianGradient(covariance_type=request.param, reg_covar=1e-6)

    @pytest.fixture
    def data(self):
        return blobs(2)

    @pytest.fixture
    def params(self, family, data):
        return start_params(family, data)


# -- fits ----------------------------------------------------------------------------------


def _same_start(x, covariance_type, k=3):
    """EM's k-means start, as user parameters (the same start for both fits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        s = GaussianMixture(k, covariance_type=covariance_type, max_iter=0,
                            random_state=0).fit(x)
    return dict(covariance_type=covariance_type, weights_init=s.weights_ / s.weights_.sum(),
                means_init=s.means_, precisions_init=s.precisions_)


@pytest.mark.parametrize("d, covariance_type", [(2, "full"), (2, "spherical"), (5, "full"),
                                                (5, "diag"), (5, "tied")])
def test_lbfgs_reaches_the_em_optimum(d, covariance_type):
    x = blobs(d)
    start = _same_start(x, covariance_type)
    em = GaussianMixture(3, max_iter=1000, tol=1e-12, reg_covar=1e-9, **start).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gd = GaussianMixture(3, max_iter=300, reg_covar=1e-9, fit_method="gradient",
                             optimizer="lbfgs", stopping_criterion=NEVER, **start).fit(x)
    assert abs(gd.score(x) - em.score(x)) < 1e-4
    np.testing.assert_allclose(gd.weights_, em.weights_, atol=1e-4)
    np.testing.assert_allclose(gd.means_, em.means_, atol=1e-3)
    np.testing.assert_allclose(gd.covariances_, em.covariances_, atol=1e-3)


def test_adam_improves_the_likelihood():
    x = blobs(2)
    start = _same_start(x, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gd = GaussianMixture(3, max_iter=60, fit_method="gradient", learning_rate=0.02,
                             stopping_criterion=NEVER, chunk_size=100, **start).fit(x)
    initial = gd.lower_bounds_[0]
    assert gd.n_iter_ == 60
    assert gd.lower_bound_ == max(gd.lower_bounds_)  # full batch: the best iterate
    assert gd.score(x) > initial + 0.01
    em = GaussianMixture(3, max_iter=500, tol=1e-10, **start).fit(x)
    assert gd.score(x) > em.score(x) - 0.02


class _Interrupt(Exception):
    pass


class _InterruptAt(Monitor):
    def __init__(self, iteration):
        self.iteration = iteration

    def end_iteration(self, record):
        if record.iteration == self.iteration:
            raise _Interrupt


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_resume_is_exact(optimizer, tmp_path):
    x = blobs(2)
    kw = dict(n_components=3, fit_method="gradient", optimizer=optimizer, random_state=3,
              stopping_criterion=NEVER, chunk_size=90, learning_rate=0.03)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = GaussianMixture(max_iter=12, **kw).fit(x)
        # Interrupted during its 6th step (max_iter spans the schedule: it stays 12).
        with pytest.raises(_Interrupt):
            GaussianMixture(max_iter=12, checkpoint=tmp_path / "c", **kw).fit(
                x, monitor=_InterruptAt(6))
        resumed = dmix.resume(tmp_path / "c", x)
    assert resumed.n_iter_ == whole.n_iter_ == 12
    assert resumed.lower_bounds_ == whole.lower_bounds_
    for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(resumed, attr), getattr(whole, attr))


def test_save_and_load(tmp_path):
    x = blobs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, covariance_type="diag", fit_method="gradient", max_iter=5,
                             learning_rate=0.02, stopping_criterion=NEVER,
                             random_state=0).fit(x)
    gm.save(tmp_path / "m.zarr")
    back = dmix.load(tmp_path / "m.zarr")
    assert back.fit_method == "gradient" and back.learning_rate == 0.02
    np.testing.assert_array_equal(back.score_samples(x), gm.score_samples(x))


def test_heldout_early_stopping_returns_the_best():
    x = blobs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, fit_method="gradient", validation_fraction=0.3,
                             learning_rate=0.3, max_iter=25, stopping_criterion=NEVER,
                             random_state=5, **{k: v for k, v in _same_start(x, "full").items()
                                                if k != "covariance_type"}).fit(x)
    bounds = np.array(gm.lower_bounds_)
    assert np.any(np.diff(bounds) < 0)  # a large step overshoots: the last is not the best
    assert bounds[-1] < bounds.max()
    assert gm.lower_bound_ == bounds.max()
    family = gm._family.__class__(**{**gm._family.__dict__, "random_state": 5})
    held = family.heldout_rows(0, x.shape[0])
    assert 0.2 < held.mean() < 0.4
    np.testing.assert_allclose(np.mean(gm.score_samples(x[held])), gm.lower_bound_,
                               rtol=1e-12)


def _outlier_start(x):
    """The EM start with component 1's variances at 1e-300 and no floor: its precision
    squared overflows, so its gradient is not finite (a real overflow, no mock)."""
    start = _same_start(x, "diag")
    prec = start["precisions_init"].copy()
    prec[1] = 1e300
    return {**start, "precisions_init": prec}


def test_nonfinite_component_is_reset_and_reseeded():
    x = blobs(2)
    start = _outlier_start(x)
    family = GaussianGradient(covariance_type="diag", reg_covar=0.0)
    params = family.make_params(start["weights_init"], start["means_init"],
                                precisions=start["precisions_init"])
    import dask.array as da

    stats = estep_pass(family, da.from_array(x, chunks=(150, 2)), params)
    assert stats["nk"][1] < 1e-290  # it explains no row
    _, grad = family._value_and_gradient(params, stats)
    owners = family._owners(params)
    assert not np.all(np.isfinite(grad[owners == 1]))
    assert np.all(np.isfinite(grad[owners != 1]))
    new, state = family.mstep(params, stats, {})
    np.testing.assert_array_equal(state["collapsed"], [1])
    np.testing.assert_allclose(new["covariances"][1], params["covariances"][1], rtol=1e-12)
    for key in ("adam_m", "adam_v"):  # only component 1's moments were zeroed
        assert np.all(state[key][owners == 1] == 0)
        assert np.all(state[key][owners != 1] != 0)
        assert np.all(np.isfinite(state[key]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(CollapseWarning, match=r"components \[1\]"):
            gm = GaussianMixture(3, reg_covar=0.0, fit_method="gradient", max_iter=30,
                                 stopping_criterion=NEVER, **start).fit(x)
    assert gm.n_reseeded_ == 1
    assert np.isfinite(gm.score(x)) and gm.score(x) > gm.lower_bounds_[1]
    assert all(np.all(np.isfinite(getattr(gm, a))) for a in
               ("weights_", "means_", "covariances_", "precisions_cholesky_"))


def test_seed_based_starts_take_one_em_step():
    x = blobs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, init_params="k-means++", fit_method="gradient", max_iter=1,
                             stopping_criterion=NEVER, random_state=0).fit(x)
    assert np.all(np.diagonal(gm.covariances_, axis1=1, axis2=2) > 1e-3)  # not reg_covar: the scatter of the seeds' rows


@pytest.mark.parametrize("options, match", [
    ({"cem": True}, "cem=True belong to EM"),
    ({"annealing": True}, "annealing=True"),
    ({"missing": "marginalize"}, "missing='marginalize'"),
    ({"mean_precision_prior": 1.0}, "mean_precision_prior"),
    ({"optimizer": "sgd"}, "'optimizer' parameter"),
    ({"optimizer": "lbfgs", "batch_fraction": 0.5}, "needs full batches"),
    ({"validation_fraction": 1.0}, r"'validation_fraction' parameter .* \[0, 1\)"),
    ({"learning_rate": 0}, "'learning_rate'"),
])
def test_invalid_gradient_options(options, match):
    with pytest.raises(InvalidParameterError, match=match):
        GaussianMixture(2, fit_method="gradient", **options).fit(blobs(2))


def test_invalid_fit_method_and_em_with_gradient_options():
    with pytest.raises(InvalidParameterError, match="'fit_method' parameter"):
        GaussianMixture(2, fit_method="sgd").fit(blobs(2))
    with pytest.raises(InvalidParameterError, match=r"\['learning_rate'\] are options of "
                                                    "fit_method='gradient'"):
        GaussianMixture(2, learning_rate=0.1).fit(blobs(2))


def test_family_rejects_em_options():
    with pytest.raises(ValueError, match="cem is an option of EM"):
        GaussianGradient(cem=True)
    with pytest.raises(ValueError, match="learning_rate"):
        GaussianGradient(learning_rate=-1.0)


def test_cli_fit_gradient(tmp_path, capsys):
    import zarr

    from dmix.cli import main

    data = str(tmp_path / "x.zarr")
    zarr.create_array(data, data=blobs(2), chunks=(150, 2))
    out = tmp_path / "m"
    assert main(["fit", data, "-k", "3", "--model", "gmm", "--fit-method", "gradient",
                 "--max-iter", "5", "--output", str(out), "--seed", "0"]) == 0
    assert dmix.load(out).fit_method == "gradient"


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag"])
def test_a_covariance_at_the_floor_still_packs(covariance_type):
    """``Sigma - floor I`` of rank 1 (flat against the floor): the free coordinates are still
    finite and give the covariance back (the factor is repaired, not refused)."""
    family = GaussianGradient(covariance_type=covariance_type, reg_covar=1e-3)
    v = np.array([[1.0, 2.0], [0.5, -1.0]])
    dense = v[:, :, None] * v[:, None, :] + 1e-3 * np.eye(2)
    cov = {"full": dense, "tied": dense[0],
           "diag": np.array([[1.0, 1e-3], [2.0, 0.5]])}[covariance_type]
    params = family.make_params([0.4, 0.6], np.zeros((2, 2)), cov)
    theta = family._pack(params)
    assert np.all(np.isfinite(theta))
    back, invalid = family._unpack(theta, params)
    assert invalid.size == 0
    np.testing.assert_allclose(back["covariances"], cov, rtol=0, atol=1e-12)
