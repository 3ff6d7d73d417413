"""The Gaussian mixture family: E-step statistics per block, closed-form M-step on the driver.

Parameters (``Params``): ``weights`` (K,), ``means`` (K, D), ``covariances`` and
``precisions_cholesky`` (shapes in :mod:`dmix.families.covariance`).

Statistics of a block, about the shift ``c = sum_k w_k mu_k`` of the current parameters (known
before the pass, close to the data mean, so nothing cancels for data far from the origin)::

    n, loglik, n_nonfinite      rows, sum_i log p(x_i), rows whose log p(x_i) is not finite
    nk  (K,)                    sum_i r_ik
    s1  (K, D)                  sum_i r_ik (x_i - c)
    s2  (covariance-shaped)     second moments about c, see covariance.py

M-step (shared/notes/model-math.md section 1.3): with ``b_k = s1_k / N_k``, ``mu_k = c + b_k``
and, for full covariances, ``Sigma_k = s2_k / N_k - b_k b_k^T + reg_covar I``. As scikit-learn
does, ``N_k`` carries ``10 * eps`` so an empty component does not divide by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dmix.families.base import Params, State, Stats, tree_add
from dmix.families.covariance import get_covariance
from dmix.xp import Workspace, asarray_f64, normalize_log, to_host

__all__ = ["Gaussian"]

_EPS10 = 10 * np.finfo(np.float64).eps


def _shift(params: Params) -> np.ndarray:
    """The centring shift ``c = sum_k w_k mu_k`` (a fixed summation order on every process)."""
    return np.sum(params["weights"][:, None] * params["means"], axis=0)


@dataclass(frozen=True)
class Gaussian:
    """Gaussian mixture family.

    Parameters
    ----------
    covariance_type : {'full', 'tied', 'diag', 'spherical', 'tied_diag', 'tied_spherical'}
        Structure of the component covariances (``'tied_full'`` is an alias of ``'tied'``).
    reg_covar : float
        Non-negative value added to the diagonal of every covariance estimate.
    """

    name: ClassVar[str] = "gaussian"

    covariance_type: str = "full"
    reg_covar: float = 1e-6

    def __post_init__(self):
        cov = get_covariance(self.covariance_type)  # raises on an unknown name
        object.__setattr__(self, "covariance_type", cov.name)
        if not (isinstance(self.reg_covar, int | float) and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a float >= 0. Got {self.reg_covar!r} instead.")

    @property
    def covariance(self):
        """The covariance structure object (from the table in covariance.py)."""
        return get_covariance(self.covariance_type)

    # -- parameters -------------------------------------------------------------------------

    def make_params(self, weights, means, covariances=None, precisions=None) -> Params:
        """Complete parameters from weights, means and either covariances or precisions."""
        cov = self.covariance
        weights = np.asarray(weights, dtype=np.float64)
        means = np.asarray(means, dtype=np.float64)
        if covariances is None:
            precisions = np.asarray(precisions, dtype=np.float64)
            prec_chol = cov.cholesky_from_precisions(precisions)
            covariances = cov.covariances_from_precisions(precisions)
        else:
            covariances = np.asarray(covariances, dtype=np.float64)
            prec_chol = cov.precision_cholesky(covariances)
        return {
            "weights": weights,
            "means": means,
            "covariances": covariances,
            "precisions_cholesky": prec_chol,
        }

    def n_parameters(self, params: Params) -> int:
        k, d = params["means"].shape
        return self.covariance.n_parameters(k, d) + k * d + k - 1

    # -- worker side ------------------------------------------------------------------------

    def _weighted_log_prob(self, params: Params, x, xp, ws: Workspace):
        """Centred rows ``x - c`` and ``log w_k + log N(x | mu_k, Sigma_k)`` (n, K) of a block."""
        shift = _shift(params)
        xc = xp.subtract(x, xp.asarray(shift), out=ws.take("xc", x.shape, xp))
        means_c = xp.asarray(params["means"] - shift)
        wlp = self.covariance.log_prob(xc, means_c, params["precisions_cholesky"], xp, ws)
        wlp += xp.asarray(np.log(params["weights"]))
        return xc, wlp

    def estep(self, params: Params, x, xp, workspace: Workspace | None = None) -> Stats:
        ws = workspace or Workspace()
        xc, resp = self._weighted_log_prob(params, x, xp, ws)
        log_norm = normalize_log(resp, resp, xp)  # resp now holds the responsibilities
        ok = xp.isfinite(log_norm)
        n_bad = int(x.shape[0] - int(xp.count_nonzero(ok)))
        if n_bad:  # keep the sums finite; the engine reports the rows
            xc[~ok] = 0.0
            resp[~ok] = 0.0
            log_norm = xp.where(ok, log_norm, 0.0)
        return {
            "n": float(x.shape[0]),
            "loglik": float(xp.sum(log_norm)),
            "n_nonfinite": float(n_bad),
            "nk": to_host(xp.sum(resp, axis=0)),
            "s1": to_host(resp.T @ xc),
            "s2": to_host(self.covariance.second_moment(resp, xc, xp, ws)),
        }

    def combine(self, a: Stats, b: Stats) -> Stats:
        return tree_add(a, b)

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        return self.covariance.temp_bytes_per_row(n_features, n_components)

    def log_density(self, params: Params, x, xp):
        _, wlp = self._weighted_log_prob(params, x, xp, Workspace())
        return normalize_log(wlp, wlp, xp)

    def predict_proba(self, params: Params, x, xp):
        _, wlp = self._weighted_log_prob(params, x, xp, Workspace())
        normalize_log(wlp, wlp, xp)
        return wlp

    # -- driver side ------------------------------------------------------------------------

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10
        b = stats["s1"] / nk[:, None]
        covariances = self.covariance.estimate(nk, b, stats["s2"], self.reg_covar)
        new = {
            "weights": nk / np.sum(nk),
            "means": _shift(params) + b,
            "covariances": covariances,
            "precisions_cholesky": self.covariance.precision_cholesky(covariances),
        }
        return new, state

    def params_from_stats(self, stats: Stats, shift: np.ndarray) -> Params:
        """Initial parameters from statistics gathered with given responsibilities about ``shift``.

        This is scikit-learn's ``_initialize`` from ``resp``: weights ``N_k / N`` (not
        renormalised), means and covariances as in the M-step.
        """
        nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10
        b = stats["s1"] / nk[:, None]
        covariances = self.covariance.estimate(nk, b, stats["s2"], self.reg_covar)
        return {
            "weights": nk / stats["n"],
            "means": shift + b,
            "covariances": covariances,
            "precisions_cholesky": self.covariance.precision_cholesky(covariances),
        }

    def params_from_points(self, points: np.ndarray, n_samples: int) -> Params:
        """Initial parameters where each row of ``points`` alone has responsibility 1 for its
        component (scikit-learn's ``k-means++`` and ``random_from_data`` inits).

        The means are the points, each covariance is ``reg_covar`` (one point has no scatter),
        and the weights are ``(1 + 10 eps) / n_samples``, unnormalised as in scikit-learn.
        """
        k, d = points.shape
        nk = np.full(k, 1.0 + _EPS10)
        zero_s2 = self.covariance.second_moment(np.zeros((1, k)), np.zeros((1, d)), np)
        covariances = self.covariance.estimate(nk, np.zeros((k, d)), zero_s2, self.reg_covar)
        return {
            "weights": nk / n_samples,
            "means": np.array(points, dtype=np.float64),
            "covariances": covariances,
            "precisions_cholesky": self.covariance.precision_cholesky(covariances),
        }

    def stats_from_resp(self, resp, x, shift, xp) -> Stats:
        """Statistics of a block for given responsibilities ``resp`` (n, K), about ``shift``."""
        xc = asarray_f64(x, xp) - xp.asarray(shift)
        return {
            "n": float(x.shape[0]),
            "nk": to_host(xp.sum(resp, axis=0)),
            "s1": to_host(resp.T @ xc),
            "s2": to_host(self.covariance.second_moment(resp, xc, xp)),
        }

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator):
        """Draw ``n_samples`` rows: component counts from a multinomial, then Gaussian noise.

        Returns ``(X, labels)`` with rows grouped by component, as scikit-learn does.
        """
        means = params["means"]
        k, d = means.shape
        counts = rng.multinomial(n_samples, params["weights"] / np.sum(params["weights"]))
        chol = np.linalg.cholesky(self.covariance.dense(params["covariances"], k, d))
        x = np.empty((n_samples, d))
        labels = np.repeat(np.arange(k), counts)
        start = 0
        for j, c in enumerate(counts):  # K draws; each is one vectorised block
            z = rng.standard_normal((c, d))
            x[start : start + c] = means[j] + z @ chol[j].T
            start += c
        return x, labels

