"""Conjugate priors of the Gaussian mixture and its MAP M-step (model-math.md section 1.4).

Priors: weights ``pi ~ Dirichlet(alpha)``; means ``mu_k | Sigma_k ~ N(m0, Sigma_k / kappa0)``;
covariances inverse-Wishart ``W^-1(Psi0, nu0)`` for the full and tied structures, and for the
others one inverse-gamma ``IG(nu0 / 2, s^2 / 2)`` per variance (``s^2`` the matching entry of
``Psi0``). Each group is optional; with both the mean and the covariance prior it is
Normal-inverse-Wishart. EM then increases the log-posterior ``LL + log p(theta)``.

With ``xbar_k = c + b_k`` the weighted mean of component ``k``, ``W_k`` its weighted scatter
about ``xbar_k`` and ``C_k = kappa0 N_k / (kappa0 + N_k) (xbar_k - m0)(xbar_k - m0)^T``, the
posterior mode is, with ``m = 1`` if the mean prior is on and ``v = 1`` if the covariance prior
is (else 0)::

    pi_k    = max(0, N_k + alpha_k - 1) / sum_j max(0, N_j + alpha_j - 1)
    mu_k    = (kappa0 m0 + N_k xbar_k) / (kappa0 + N_k)
    Sigma_k = (v Psi0 + R(W_k) + m R(C_k)) / (v a + u N_k + m u)

where ``R`` reduces a matrix to the structure (itself, its diagonal, or its trace), ``u`` is
the number of squared coordinates one row adds to one variance (``D`` for the spherical types,
else 1) and ``a = nu0 + D + 1`` for the matrix structures, ``nu0 + 2`` for the variances. Tied
structures sum numerator and denominator over the components (``N`` and ``K u`` in place of
``N_k`` and ``u``). These are the exponents of ``|Sigma|`` (or ``sigma^2``) in the
log-posterior; the tests check every case against a numerical maximisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, multigammaln

from dmix.errors import InvalidParameterError
from dmix.xp import Workspace

__all__ = ["GaussianPrior", "log_prior", "map_estimate", "resolve_prior"]

#: mclust's ``defaultPrior`` shrinkage (kappa0); its other defaults are nu0 = D + 2 and a scale
#: of the data covariance divided by K^(2/D).
DEFAULT_MEAN_PRECISION = 0.01


@dataclass(frozen=True, eq=False)
class GaussianPrior:
    """Resolved prior hyperparameters (float64; None where a group is off).

    Attributes
    ----------
    weight_concentration : ndarray of shape (K,) or None
    mean : ndarray of shape (D,) or None
    mean_precision : float or None
    covariance : ndarray shaped like one covariance of the structure, or None
    degrees_of_freedom : float or None
    """

    weight_concentration: np.ndarray | None = None
    mean: np.ndarray | None = None
    mean_precision: float | None = None
    covariance: np.ndarray | None = None
    degrees_of_freedom: float | None = None

    @classmethod
    def from_spec(cls, spec: dict) -> GaussianPrior:
        """The prior of a family spec (``dmix.families.base.family_spec``: lists for arrays)."""
        def value(v, scalar=False):
            return None if v is None else float(v) if scalar else np.asarray(v, np.float64)

        return cls(value(spec.get("weight_concentration")), value(spec.get("mean")),
                   value(spec.get("mean_precision"), True), value(spec.get("covariance")),
                   value(spec.get("degrees_of_freedom"), True))

    def _key(self) -> tuple:
        return tuple(None if v is None else (np.shape(v), np.asarray(v, np.float64).tobytes())
                     for v in (self.weight_concentration, self.mean, self.mean_precision,
                               self.covariance, self.degrees_of_freedom))

    def __eq__(self, other) -> bool:  # by value (arrays compared exactly)
        return isinstance(other, GaussianPrior) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def has_mean(self) -> bool:
        return self.mean is not None

    @property
    def has_covariance(self) -> bool:
        return self.covariance is not None


def _structure(cov, d: int) -> tuple[bool, int]:
    """(whether the structure is a matrix, ``u``: squared coordinates per variance per row)."""
    nq = cov.n_quadratic(d)
    return nq == d * (d + 1) // 2 and d > 1, d if nq == 1 else 1


def _reduce(cov, vectors: np.ndarray) -> np.ndarray:
    """``R(sum_j v_j v_j^T)`` per component: the structure's reduction of outer products of the
    rows of ``vectors`` (K, D), as ``from_quadratic`` reduces second moments."""
    q = np.empty((cov.n_quadratic(vectors.shape[1]), vectors.shape[0]))
    cov.quadratic_features(np.ascontiguousarray(vectors.T), q, np)
    return cov.from_quadratic(q)


def _number(name, value, low, *, above=True):
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not (value > low if above else value >= low):
        raise InvalidParameterError(
            f"{name} must be a finite number > {low:g}. Got {value!r} instead.")
    return float(value)


def _array(name, value, shape) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be numeric. Got {value!r} instead.") from None
    if a.ndim == 0 and shape != ():
        a = np.full(shape, float(a)) if len(shape) == 1 else float(a) * np.eye(shape[0])
    if a.shape != shape:
        raise InvalidParameterError(f"{name} must have shape {shape}. Got {a.shape} instead.")
    if not np.all(np.isfinite(a)):
        raise InvalidParameterError(f"{name} must be finite; it has NaN or infinity.")
    return a


def resolve_prior(covariance_type, n_components, n_features, *, weight_concentration_prior=None,
                  mean_prior=None, mean_precision_prior=None, covariance_prior=None,
                  degrees_of_freedom_prior=None, data_mean=None, data_covariance=None):
    """The prior of the estimator's options, validated, with defaults; None if none is set.

    Setting either mean option turns the mean prior on, either covariance option the
    covariance prior. Defaults (mclust's ``defaultPrior``): ``mean_prior`` the data mean,
    ``mean_precision_prior`` 0.01, ``degrees_of_freedom_prior`` ``D + 2``, ``covariance_prior``
    the data covariance divided by ``K^(2/D)`` (its diagonal for the diagonal structures, the
    mean of its diagonal for the spherical ones). A scalar ``weight_concentration_prior`` is
    used for every component; a scalar ``covariance_prior`` means that value times the
    identity.

    Raises
    ------
    InvalidParameterError
        Naming the option, for a wrong shape, a non-finite value, ``alpha <= 0``,
        ``kappa0 <= 0``, a covariance prior that is not positive definite, or ``nu0`` too small
        for a proper prior (``nu0 > D - 1`` for the matrix structures, ``> 0`` otherwise).
    ValueError
        If a default needs ``data_mean`` or ``data_covariance`` and it is not given.
    """
    from dmix.families.covariance import get_covariance

    cov = get_covariance(covariance_type)
    k, d = int(n_components), int(n_features)
    matrix, u = _structure(cov, d)
    alpha = None
    if weight_concentration_prior is not None:
        alpha = _array("weight_concentration_prior", weight_concentration_prior, (k,))
        if np.any(alpha <= 0):
            raise InvalidParameterError(
                f"weight_concentration_prior must be > 0. Got {alpha.min()!r} as its minimum.")
    mean = kappa = None
    if mean_prior is not None or mean_precision_prior is not None:
        if mean_prior is None and data_mean is None:
            raise ValueError("The default mean_prior needs the data mean (data_mean).")
        mean = _array("mean_prior", data_mean if mean_prior is None else mean_prior, (d,))
        kappa = (DEFAULT_MEAN_PRECISION if mean_precision_prior is None
                 else _number("mean_precision_prior", mean_precision_prior, 0.0))
    scale = dof = None
    if covariance_prior is not None or degrees_of_freedom_prior is not None:
        dof = (d + 2.0 if degrees_of_freedom_prior is None
               else _number("degrees_of_freedom_prior", degrees_of_freedom_prior,
                            d - 1.0 if matrix else 0.0))
        shape = (d, d) if matrix else (d,) if u == 1 and d > 1 and cov.n_quadratic(d) == d else ()
        if covariance_prior is None:
            if data_covariance is None:
                raise ValueError("The default covariance_prior needs the data covariance.")
            full = np.asarray(data_covariance, dtype=np.float64) / k ** (2.0 / d)
            default = full if shape == (d, d) else (
                np.diagonal(full).copy() if shape == (d,) else np.trace(full) / d)
            scale = _array("covariance_prior", default, shape)
        else:
            scale = _array("covariance_prior", covariance_prior, shape)
        ok = (np.all(np.linalg.eigvalsh(scale) > 0) if scale.ndim == 2
              else np.all(scale > 0))
        if not ok:
            raise InvalidParameterError(
                "covariance_prior must be positive definite (all variances > 0).")
    if alpha is None and mean is None and scale is None:
        return None
    return GaussianPrior(alpha, mean, kappa, scale, dof)


def map_estimate(cov, nk, b, s2, shift, prior: GaussianPrior, reg_covar: float):
    """The posterior mode (weights, means, covariances) from the M-step's statistics.

    ``nk`` (K,) carries ``10 eps``; ``b = s1 / nk``; ``s2`` the structure-shaped second moments
    about ``shift``; ``reg_covar`` is added to the diagonal of the result.
    """
    k, d = b.shape
    xbar = shift + b
    if prior.weight_concentration is not None:
        w = np.maximum(0.0, nk + prior.weight_concentration - 1.0)
        if not np.sum(w) > 0:
            raise InvalidParameterError(
                "The Dirichlet prior's mode has every weight at 0 (N_k + alpha_k - 1 <= 0 for "
                "all components): raise weight_concentration_prior.")
        weights = w / np.sum(w)
    else:
        weights = nk / np.sum(nk)
    if not (prior.has_mean or prior.has_covariance):
        return weights, xbar, cov.estimate(nk, b, s2, reg_covar)
    matrix, u = _structure(cov, d)
    scatter = s2 - _reduce(cov, b * np.sqrt(nk)[:, None])  # R(W_k), W_k about xbar_k
    counts, mean_counts = nk * u, np.full(k, float(u))
    means = xbar
    if prior.has_mean:
        kappa = prior.mean_precision
        shrink = kappa * nk / (kappa + nk)
        scatter = scatter + _reduce(cov, (xbar - prior.mean) * np.sqrt(shrink)[:, None])
        means = (kappa * prior.mean + nk[:, None] * xbar) / (kappa + nk)[:, None]
    if cov.tied:
        count = np.sum(counts) + (np.sum(mean_counts) if prior.has_mean else 0.0)
    else:
        count = counts + (mean_counts if prior.has_mean else 0.0)
        count = count.reshape((k,) + (1,) * (np.ndim(scatter) - 1))
    if prior.has_covariance:
        scatter = scatter + prior.covariance
        count = count + prior.degrees_of_freedom + (d + 1.0 if matrix else 2.0)
    covariances = scatter / count
    if matrix:
        covariances = 0.5 * (covariances + np.swapaxes(covariances, -1, -2))
        covariances = covariances + reg_covar * np.eye(d)
    else:
        covariances = covariances + reg_covar
    return weights, means, np.asarray(covariances)


def log_prior(cov, params, prior: GaussianPrior) -> float:
    """``log p(theta)`` with every normalising constant."""
    weights, means = params["weights"], params["means"]
    k, d = means.shape
    total = 0.0
    if prior.weight_concentration is not None:
        a = prior.weight_concentration
        total += gammaln(np.sum(a)) - np.sum(gammaln(a)) + np.sum((a - 1) * np.log(weights))
    prec_chol = params.get("precisions_cholesky")
    if prec_chol is None:
        prec_chol = cov.precision_cholesky(params["covariances"])
    if prior.has_mean:
        # log N(mu_k; m0, Sigma_k / kappa0) = log N(sqrt(kappa0)(mu_k - m0); 0, Sigma_k)
        #                                     + D/2 log kappa0
        z = np.sqrt(prior.mean_precision) * (means - prior.mean)
        lp = cov.log_prob(z, np.zeros_like(means), prec_chol, np, Workspace())
        total += float(np.sum(np.diagonal(lp))) + 0.5 * k * d * math.log(prior.mean_precision)
    if prior.has_covariance:
        nu, psi = prior.degrees_of_freedom, prior.covariance
        matrix, _ = _structure(cov, d)
        covariances = np.asarray(params["covariances"])
        if matrix:
            mats = covariances.reshape(-1, d, d)
            precisions = np.asarray(cov.precisions(prec_chol)).reshape(-1, d, d)
            _, logdet_psi = np.linalg.slogdet(psi)
            _, logdet = np.linalg.slogdet(mats)
            total += float(np.sum(
                0.5 * nu * logdet_psi - 0.5 * nu * d * math.log(2) - multigammaln(nu / 2, d)
                - 0.5 * (nu + d + 1) * logdet
                - 0.5 * np.einsum("ab,kba->k", psi, precisions)))
        else:
            a, scale, var = nu / 2, psi / 2, covariances  # IG(a, scale) per variance
            total += float(np.sum(a * np.log(scale) - gammaln(a) - (a + 1) * np.log(var)
                                  - scale / var))
    return float(total)
