"""Each covariance structure against dense full-covariance maths.

Every structure is checked through its dense (K, D, D) form: Mahalanobis distances against an
explicit solve with Sigma_k, log-determinants against ``slogdet``, the M-step estimate against
directly computed weighted covariances (also about a shift 1e4 away), and the precision
conversions against each other. Tolerances are 1e-10 relative (the computations are a few
float64 operations on well-conditioned matrices; measured errors are ~1e-15).
"""

import re

import numpy as np
import pytest

from dmix.errors import IllConditionedError
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.gaussian import Gaussian
from dmix.testing import assert_rel, structured_covariances

K, D = 3, 4
TYPES = list(COVARIANCE_TYPES)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + np.diag(rng.uniform(0.5, 2.0, size=d))


def random_covariances(name, rng, k=K, d=D):
    """Random valid ``covariances_`` of structure ``name`` (shape from the table)."""
    return {
        "full": lambda: np.stack([random_spd(rng, d) for _ in range(k)]),
        "tied": lambda: random_spd(rng, d),
        "diag": lambda: rng.uniform(0.3, 3.0, size=(k, d)),
        "spherical": lambda: rng.uniform(0.3, 3.0, size=k),
        "tied_diag": lambda: rng.uniform(0.3, 3.0, size=d),
        "tied_spherical": lambda: np.asarray(rng.uniform(0.3, 3.0)),
    }[name]()


def second_moment(cov, resp, xc):
    """The statistic ``s2`` of rows ``xc`` (n, D) with responsibilities (n, K), as the E-step
    forms it: the quadratic row statistics summed with the responsibilities, unpacked."""
    quad = np.empty((cov.n_quadratic(xc.shape[1]), xc.shape[0]))
    cov.quadratic_features(np.ascontiguousarray(xc.T), quad, np)
    return cov.from_quadratic(quad @ resp)


@pytest.fixture(params=TYPES)
def cov(request):
    return get_covariance(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- the shapes table --------------------------------------------------------------------------

SHAPES = {
    # name: (shape of covariances_ for K=3, D=4, free parameters, tied)
    "full": ((3, 4, 4), 3 * 10, False),
    "tied": ((4, 4), 10, True),
    "diag": ((3, 4), 12, False),
    "spherical": ((3,), 3, False),
    "tied_diag": ((4,), 4, True),
    "tied_spherical": ((), 1, True),
}


def test_table_has_six_structures():
    assert list(COVARIANCE_TYPES) == list(SHAPES)


@pytest.mark.parametrize("name", TYPES)
def test_shapes_table(name, rng):
    cov = get_covariance(name)
    shape, n_params, tied = SHAPES[name]
    assert cov.name == name
    assert cov.shape(K, D) == shape
    assert cov.n_parameters(K, D) == n_params
    assert cov.tied is tied
    c = random_covariances(name, rng)
    assert c.shape == shape
    u = cov.precision_cholesky(c)
    assert u.shape == shape
    assert cov.precisions(u).shape == shape
    assert cov.dense(c, K, D).shape == (K, D, D)
    assert np.shape(second_moment(cov, np.full((5, K), 1 / K), rng.normal(size=(5, D)))) == shape
    assert cov.expansion(u, rng.normal(size=(K, D)))[0].shape == (K, cov.n_quadratic(D))


# -- distances and determinants ----------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 1e4])
def test_mahalanobis_matches_explicit_solve(cov, rng, shift):
    """(x - mu)^T Sigma^-1 (x - mu) by an explicit solve with the dense Sigma_k."""
    c = random_covariances(cov.name, rng)
    dense = cov.dense(c, K, D)
    x = rng.normal(scale=2.0, size=(200, D)) + shift
    means = rng.normal(size=(K, D)) + shift
    centre = np.full(D, shift)  # the caller centres both by the same shift
    got = cov.mahalanobis(x - centre, means - centre, cov.precision_cholesky(c), np)
    diff = x[:, None, :] - means[None, :, :]  # (n, K, D)
    want = np.einsum("nkd,nkd->nk", diff, np.linalg.solve(dense[None], diff[..., None])[..., 0])
    assert got.shape == (200, K)
    assert_rel(got, want, 1e-10)


def test_mahalanobis_far_from_the_centre(cov, rng):
    """Components 1e4 from the centring shift: each row's distance to its own component.

    The rows and means are centred by one shift (the family uses ``sum_k w_k mu_k``), which
    can be far from every component. Distances of order D must then not be formed as
    ``x^2 - 2 x mu + mu^2`` (terms ~1e8 cancelling), but from ``x - mu`` directly.
    """
    c = random_covariances(cov.name, rng)
    dense = cov.dense(c, K, D)
    means = np.array([[-1e4] * D, [1e4] * D, [1e4, -1e4] * (D // 2)])
    labels = np.arange(300) % K
    x = means[labels] + rng.normal(size=(300, D))
    got = cov.mahalanobis(x, means, cov.precision_cholesky(c), np)[np.arange(300), labels]
    diff = x - means[labels]
    want = np.einsum("nd,nd->n", diff, np.linalg.solve(dense[labels], diff[..., None])[..., 0])
    assert_rel(got, want, 1e-10)


def test_log_det_matches_slogdet(cov, rng):
    c = random_covariances(cov.name, rng)
    got = cov.log_det(cov.precision_cholesky(c), D)
    sign, logdet = np.linalg.slogdet(cov.dense(c, K, D))
    assert np.all(sign > 0)
    if cov.tied:
        assert np.ndim(got) == 0
        assert_rel(got, -0.5 * logdet[0], 1e-12)
    else:
        assert np.shape(got) == (K,)
        assert_rel(got, -0.5 * logdet, 1e-12)


def test_log_prob_matches_formula(cov, rng):
    c = random_covariances(cov.name, rng)
    dense = cov.dense(c, K, D)
    x, means = rng.normal(size=(50, D)), rng.normal(size=(K, D))
    got = cov.log_prob(x, means, cov.precision_cholesky(c), np)
    diff = x[:, None, :] - means[None]
    maha = np.einsum("nkd,nkd->nk", diff, np.linalg.solve(dense[None], diff[..., None])[..., 0])
    want = -0.5 * (D * np.log(2 * np.pi) + np.linalg.slogdet(dense)[1] + maha)
    assert_rel(got, want, 1e-12)


# -- second moments and the M-step estimate -------------------------------------------------


def direct_covariances(name, x, resp, reg):
    """Weighted covariances about the weighted means, computed directly (two passes)."""
    nk = resp.sum(axis=0)
    means = resp.T @ x / nk[:, None]
    diff = x[:, None, :] - means[None]  # (n, K, D)
    full = np.einsum("nk,nkd,nke->kde", resp, diff, diff) / nk[:, None, None]
    tied = np.einsum("nk,nkd,nke->de", resp, diff, diff) / nk.sum()
    diag = np.diagonal(full, axis1=1, axis2=2)
    tdiag = np.diag(tied)
    out = {
        "full": full + reg * np.eye(x.shape[1]),
        "tied": tied + reg * np.eye(x.shape[1]),
        "diag": diag + reg,
        "spherical": diag.mean(axis=1) + reg,
        "tied_diag": tdiag + reg,
        "tied_spherical": np.asarray(tdiag.mean() + reg),
    }
    return out[name], means


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_estimate_matches_direct_weighted_covariances(cov, rng, offset):
    """Second moments about a shift, then estimate == direct two-pass weighted covariances.

    With the data 1e4 from the origin and the shift at the data mean, nothing cancels: the
    agreement stays at 1e-10 (raw moments about 0 would lose ~8 digits here).
    """
    x = rng.normal(size=(300, D)) * rng.uniform(0.5, 2.0, size=D) + offset
    resp = rng.dirichlet(np.ones(K), size=300)
    reg = 1e-3
    shift = x.mean(axis=0)
    xc = x - shift
    nk = resp.sum(axis=0)
    b = resp.T @ xc / nk[:, None]
    got = cov.estimate(nk, b, second_moment(cov, resp, xc), reg)
    want, means = direct_covariances(cov.name, x, resp, reg)
    assert got.shape == cov.shape(K, D)
    assert_rel(got, want, 1e-10)
    # The means are ~1e4 when offset: their own rounding is ~2e-12, so measure the error of
    # the means against the spread of the data (~1), not against their centred size.
    assert np.max(np.abs(shift + b - means)) <= 1e-10 * x.std(axis=0).min()


def test_second_moment_matches_einsum(cov, rng):
    """Summing ``Q(x) r^T`` and unpacking (``from_quadratic``) gives each structure's ``s2``."""
    xc, resp = rng.normal(size=(100, D)), rng.dirichlet(np.ones(K), size=100)
    full = np.einsum("nk,nd,ne->kde", resp, xc, xc)
    diag = np.diagonal(full, axis1=1, axis2=2)
    want = {
        "full": full,
        "tied": full.sum(axis=0),
        "diag": diag,
        "spherical": diag.sum(axis=1),
        "tied_diag": diag.sum(axis=0),
        "tied_spherical": np.asarray(diag.sum()),
    }[cov.name]
    assert np.shape(second_moment(cov, resp, xc)) == cov.shape(K, D)
    assert_rel(second_moment(cov, resp, xc), want, 1e-12)


# -- the expanded form of the E-step ------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 30.0])
def test_expansion_matches_direct_distances(cov, rng, shift):
    """``coef . Q(x) - 2 (P mu) . x + mu^T P mu`` equals the direct ``|U^T (x - mu)|^2``."""
    c = random_covariances(cov.name, rng)
    u = cov.precision_cholesky(c)
    xc = rng.normal(scale=2.0, size=(200, D)) + shift
    means_c = rng.normal(size=(K, D)) + shift
    quad = np.empty((cov.n_quadratic(D), 200))
    cov.quadratic_features(np.ascontiguousarray(xc.T), quad, np)
    coef, pmu = cov.expansion(u, means_c)
    got = (coef @ quad).T - 2 * xc @ pmu.T + np.sum(pmu * means_c, axis=1)
    # The terms are ~shift^2 / var, so the expansion's rounding is relative to those.
    scale = 1.0 + shift**2 * np.max(cov.precisions(u))
    assert np.max(np.abs(got - cov.mahalanobis(xc, means_c, u, np))) <= 1e-13 * scale * D


# -- precision conversions ---------------------------------------------------------------------


def test_precision_cholesky_is_factor_of_inverse(cov, rng):
    c = random_covariances(cov.name, rng)
    u = cov.precision_cholesky(c)
    dense_cov = cov.dense(c, K, D)
    if cov.name in ("full", "tied"):
        mats = u.reshape(-1, D, D)
        assert np.all(np.tril(mats, -1) == 0), "the factor must be upper triangular"
        assert np.all(np.diagonal(mats, axis1=1, axis2=2) > 0)
        # U U^T Sigma = I
        prod = (mats @ np.swapaxes(mats, 1, 2)) @ dense_cov[: len(mats)]
        assert_rel(prod, np.broadcast_to(np.eye(D), prod.shape), 1e-10)
    else:
        assert_rel(u, 1.0 / np.sqrt(c), 1e-14)
    prec = cov.precisions(u)
    assert_rel(cov.dense(prec, K, D), np.linalg.inv(dense_cov), 1e-10)


def test_precision_round_trips(cov, rng):
    c = random_covariances(cov.name, rng)
    u = cov.precision_cholesky(c)
    prec = cov.precisions(u)
    assert_rel(cov.cholesky_from_precisions(prec), u, 1e-10)
    assert_rel(cov.covariances_from_precisions(prec), c, 1e-10)
    assert_rel(cov.precision_cholesky(cov.covariances_from_precisions(prec)), u, 1e-10)


def test_apply_precision_and_sandwich_match_dense(cov, rng):
    """``P_k v_k`` and ``P S P`` (the gradient of a Gaussian in its covariance) against the
    dense (K, D, D) products."""
    u = cov.precision_cholesky(random_covariances(cov.name, rng))
    prec = cov.precisions(u)
    v = rng.normal(size=(K, D))
    dense_prec = cov.dense(prec, K, D)
    assert_rel(cov.apply_precision(prec, v), np.einsum("kab,kb->ka", dense_prec, v), 1e-12)
    s = random_covariances(cov.name, rng)
    got = cov.sandwich(prec, s)
    assert np.shape(got) == cov.shape(K, D)
    assert_rel(cov.dense(got, K, D), dense_prec @ cov.dense(s, K, D) @ dense_prec, 1e-12)


def test_scatter_counts_times_estimate_is_the_summed_scatter(cov, rng):
    """``N * estimate`` is the responsibility-weighted scatter summed over what each
    covariance entry stands for: components when tied, coordinates when spherical."""
    x = rng.normal(size=(200, D))
    resp = rng.dirichlet(np.ones(K), size=200)
    nk = resp.sum(axis=0)
    b = resp.T @ x / nk[:, None]
    diff = x[:, None, :] - b[None]
    full = np.einsum("nk,nkd,nke->kde", resp, diff, diff)
    diag = np.diagonal(full, axis1=1, axis2=2)
    want = {"full": full, "tied": full.sum(axis=0), "diag": diag, "spherical": diag.sum(axis=1),
            "tied_diag": diag.sum(axis=0), "tied_spherical": np.asarray(diag.sum())}[cov.name]
    got = cov.scatter_counts(nk, D) * cov.estimate(nk, b, second_moment(cov, resp, x), 0.0)
    assert np.shape(got) == cov.shape(K, D)
    assert_rel(got, want, 1e-10)


def test_make_params_from_precisions_equals_from_covariances(cov, rng):
    family = Gaussian(covariance_type=cov.name)
    c = random_covariances(cov.name, rng)
    w, m = np.full(K, 1 / K), rng.normal(size=(K, D))
    a = family.make_params(w, m, covariances=c)
    b = family.make_params(w, m, precisions=cov.precisions(a["precisions_cholesky"]))
    for key in a:
        assert_rel(b[key], a[key], 1e-10, key)


# -- names and errors --------------------------------------------------------------------------


def test_unknown_name_lists_options():
    options = ("'full', 'tied', 'diag', 'spherical', 'tied_diag', 'tied_spherical', "
               "'tied_full'")
    with pytest.raises(ValueError, match=re.escape(f"Unknown covariance_type 'ful'; valid "
                                                   f"options are {options}.")):
        get_covariance("ful")
    with pytest.raises(ValueError, match=re.escape(f"valid options are {options}")):
        Gaussian(covariance_type="VVV")
    with pytest.raises(ValueError, match=re.escape(f"valid options are {options}")):
        get_covariance(None)


def test_unhashable_name_raises_value_error():
    """get_covariance catches TypeError, so an unhashable name must give the same ValueError."""
    with pytest.raises(ValueError, match=r"Unknown covariance_type \['full'\]; valid options"):
        get_covariance(["full"])


def test_tied_full_alias():
    assert get_covariance("tied_full") is get_covariance("tied")
    family = Gaussian(covariance_type="tied_full")
    assert family.covariance_type == "tied"
    assert family == Gaussian(covariance_type="tied")
    assert "tied_full" not in COVARIANCE_TYPES


def _singular(name, bad):
    """Valid covariances of structure ``name`` with component ``bad`` made singular."""
    c = random_covariances(name, np.random.default_rng(5))
    v = np.arange(1.0, D + 1)
    if name == "full":
        c[bad] = np.outer(v, v)  # rank 1
    elif name == "tied":
        c = np.outer(v, v)
    elif name == "diag":
        c[bad, D - 1] = 0.0  # last feature of component ``bad``
    elif name == "spherical":
        c[bad] = -1e-3
    elif name == "tied_diag":
        c[1] = 0.0
    else:
        c = np.asarray(0.0)
    return c


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("bad", [0, 2])
def test_ill_conditioned_error_names_the_component(name, bad):
    """A singular covariance raises IllConditionedError naming the component (or 'tied')."""
    cov = get_covariance(name)
    what = r"the shared \(tied\) covariance" if cov.tied else f"component {bad}"
    with pytest.raises(IllConditionedError, match=f"because {what} has an ill-defined "
                       r"empirical covariance .* increase reg_covar"):
        cov.precision_cholesky(_singular(name, bad))
    assert issubclass(IllConditionedError, ValueError)


@pytest.mark.parametrize("name", TYPES)
def test_collapsed_component_in_mstep_is_named(name):
    """With reg_covar=0, an exactly collapsed estimate stops the M-step with a named error.

    The collapsed rows sit exactly at the shift ``c = sum_k w_k mu_k`` (both means are at
    (8, 8)), so their centred values and hence the estimate are exactly zero. For the tied
    structures the data are constant in the last feature (all features for tied_spherical).
    """
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 2)), np.full((5, 2), 8.0)])
    if name in ("tied", "tied_diag"):
        x[:, 1] = 8.0
    elif name == "tied_spherical":
        x[:] = 8.0
    resp = np.zeros((45, 2))
    resp[:40, 0] = 1.0
    resp[40:, 1] = 1.0
    params = {"weights": np.array([0.5, 0.5]), "means": np.full((2, 2), 8.0)}
    params["covariances"] = structured_covariances(np.array([np.eye(2), np.eye(2)]), name)
    family = Gaussian(covariance_type=name, reg_covar=0.0, on_collapse="raise")
    stats = family.stats_from_resp(resp, x, np.full(2, 8.0), np)
    stats.update(loglik=0.0, n_nonfinite=0.0)
    what = (r"because the shared \(tied\) covariance has an ill-defined"
            if family.covariance.tied else "because component 1 collapsed")
    with pytest.raises(IllConditionedError, match=what):
        family.mstep(params, stats, {})
    if not family.covariance.tied:  # re-seeding: the component keeps its previous values
        new, state = Gaussian(covariance_type=name, reg_covar=0.0).mstep(params, stats, {})
        assert state["collapsed"].tolist() == [1]
        assert_rel(new["covariances"][1], params["covariances"][1], 0)
        assert np.all(np.isfinite(new["precisions_cholesky"]))
    new = Gaussian(covariance_type=name, reg_covar=1e-6).mstep(params, stats, {})[0]
    assert_rel(new["means"][1], np.array([8.0, 8.0]), 1e-12)
    assert np.min(family.covariance.dense(new["covariances"], 2, 2)) >= -1e-300
