"""The multivariate skew-normal mixture family: streaming E-step, closed-form ECM M-step.

Two forms (shared/notes/model-math.md section 2), each with full scale matrices:

``form="restricted"`` (the default; Azzalini and Dalla Valle, fitted as R's mixsmsn does)
    ``f(y) = 2 phi_D(y; mu, Sigma) Phi(lambda^T Sigma^{-1/2} (y - mu))``, one scalar latent:
    ``Y = mu + Delta T + Gamma^{1/2} T_1`` with ``T ~ HN(0, 1)``, ``delta = lambda / sqrt(1 +
    lambda^T lambda)``, ``Delta = Sigma^{1/2} delta``, ``Gamma = Sigma - Delta Delta^T``.
    ``Sigma^{1/2}`` is the symmetric square root (mixsmsn's convention). In one dimension this
    is ``scipy.stats.skewnorm(a=lambda, loc=mu, scale=sqrt(Sigma))``.
``form="unrestricted"`` (Sahu, Dey and Branco; Lin 2009)
    ``f(y) = 2^D phi_D(y; xi, Omega) Phi_D(q; 0, Theta)`` with ``Omega = Sigma + Delta^2``,
    ``Delta = diag(delta)``, ``Theta = I - Delta Omega^{-1} Delta``, ``q = Delta Omega^{-1}
    (y - xi)``, a D-dimensional latent: ``Y = xi + delta * |U_0| + U_1``, ``U_1 ~ N(0,
    Sigma)``. Its E-step needs truncated multivariate normal moments (:mod:`._truncated`):
    exact for ``D <= 2``, a lattice rule for ``3 <= D <=`` :data:`MAX_UNRESTRICTED_FEATURES`.

Parameters (``Params``), float64: ``weights`` (K,), ``means`` (K, D) (``mu`` or ``xi``, the
location), ``covariances`` (K, D, D) (``Sigma``, the scale; not the covariance of the
component, which is ``Sigma - (2/pi) Delta Delta^T`` restricted), ``shapes`` (K, D)
(``lambda``, restricted) or ``skewness`` (K, D) (``delta``, unrestricted), and
``precisions_cholesky`` (K, D, D), the upper Cholesky factor of ``Sigma^{-1}`` (derived, from
:meth:`SkewNormal.make_params`).

Statistics of a block, about the shift ``c_k`` = the current means (``y = x - c_k``)::

    n, loglik, n_nonfinite    rows, sum_i log p(x_i), rows whose log p(x_i) is not finite
    nk       (K,)             sum_i r_ik                     (W_0)
    y_sum    (K, D)           sum_i r_ik y                   (S_y)
    yy_sum   (K, D, D)        sum_i r_ik y y^T               (S_yy)
    y3_sum   (K, D)           sum_i r_ik y^3 (elementwise)   (for the moment start below)
    t1_sum   (K,) | (K, D)    sum_i r_ik t1                  (S_t1; restricted | unrestricted)
    yt1_sum  (K, D) | (K, D, D)  sum_i r_ik t1 y | y t1^T    (S_yt1)
    t2_sum   (K,) | (K, D, D) sum_i r_ik t2                  (S_t2)

with ``t1, t2`` the posterior moments of the latent given ``x_i`` in component ``k``.

M-step: the ECM updates of model-math 2.2 (restricted: ``mu`` with the old ``Delta``, then
``Delta`` and ``Gamma`` jointly) and 2.1 (unrestricted: ``xi`` with the old ``delta``, then
``Sigma``, then ``delta`` given the new ``Sigma``); each maximises the expected complete-data
log-likelihood over its block, so EM never decreases the likelihood (with the exact E-step).
``reg_covar + var_regularization`` is added to the diagonal of ``Gamma`` (restricted: the same
as adding it to ``Sigma`` with ``Delta`` fixed) or of ``Sigma`` (unrestricted).

Zero skewness is a stationary point of ECM in both forms (the latent's posterior moments are
then the same for every row, so the skewness update is zero again): an M-step that receives a
component with exactly zero skewness (from :meth:`SkewNormal.params_from_gaussian`, or a
re-seed) starts it by the method of moments from ``y3_sum`` instead
(:func:`dmix.families._skew_ecm.zero_skew_start`); that one step need not increase the
likelihood.

Annealing (``inverse_temperature < 1``) follows :class:`~dmix.families.gaussian.Gaussian`:
responsibilities ``softmax_k(nu l_ik)`` with the untempered log-likelihood reported, and while
tempered every scale matrix is the kernel ``annealing_start * C + reg`` (``C`` the covariance of
all the data, from the same statistics), the skewness keeps its value (zero from a Gaussian
start), and only the locations and weights move. Measured (docs/bench/skew_annealing.md, 20
random starts on two data sets): holding the skewness reached the best fit from 12/12 and 7/8
starts (``annealing_start`` 0.5 and 0.3) where plain EM did from 0/12 and 1/8; letting the
skewness follow the ECM update while tempered ended every start at one worse fit; and
``annealing_start = 0.1`` ended below the best on both, so 0.3 to 0.5 suit this family better.

A component *collapses* when ``N_k < 1`` or its scale estimate is not positive definite:
``on_collapse="raise"`` stops with :class:`~dmix.errors.IllConditionedError`; ``"reseed"`` keeps
its previous parameters, lists it in the M-step state under ``"collapsed"`` and the engine
re-seeds it with :meth:`SkewNormal.reseed`.

Everything is computed in float64, whatever the data or workspace dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from dmix.errors import DataError, IllConditionedError, InvalidParameterError
from dmix.families._skew_ecm import (
    data_covariance,
    ecm_update,
    not_positive_definite,
    precision_cholesky,
    sqrt_and_inverse_sqrt,
    zero_skew_start,
)
from dmix.families._truncated import (
    LATTICE_POINTS,
    MAX_LATTICE_DIM,
    tallis_moments,
    truncated_normal_moments,
)
from dmix.families.base import Params, State, Stats, tree_add
from dmix.kernels import normalize_log
from dmix.xp import Workspace, asarray_f64, quiet_nonfinite, to_host

__all__ = ["MAX_UNRESTRICTED_FEATURES", "SkewNormal"]

_EPS10 = 10 * np.finfo(np.float64).eps
_LOG_2PI = math.log(2.0 * math.pi)
#: Largest D of the unrestricted form (see dmix.families._truncated for the accuracy).
MAX_UNRESTRICTED_FEATURES = MAX_LATTICE_DIM
_FORMS = ("restricted", "unrestricted")


@dataclass(frozen=True)
class SkewNormal:
    """Mixture of multivariate skew-normal distributions with full scale matrices.

    Parameters
    ----------
    form : {'restricted', 'unrestricted'}
        ``'restricted'``: Azzalini's form, one scalar latent, closed-form E-step; parameters
        ``shapes`` (``lambda``). ``'unrestricted'``: Sahu-Dey-Branco's form with a
        D-dimensional latent; parameters ``skewness`` (``delta``), at most
        :data:`MAX_UNRESTRICTED_FEATURES` features.
    reg_covar : float
        Non-negative value added to the diagonal of every scale estimate (``Gamma`` or
        ``Sigma``, see the module docstring).
    var_regularization : float
        Non-negative value added the same way (the ``mixes`` package's option).
    inverse_temperature : float in (0, 1]
        Tempering of the responsibilities (deterministic annealing); 1 is plain EM.
    annealing_start, annealing_iter : float, int
        The annealing schedule of :meth:`for_iteration` (``annealing_iter = 0``: none).
    on_collapse : {'reseed', 'raise'}
        What the M-step does with a collapsed component.
    weighted : bool
        Blocks carry the rows' weights ``w_i >= 0`` as their last column: statistics are
        ``sum_i w_i ...`` and ``n`` is ``sum_i w_i``.
    """

    name: ClassVar[str] = "skew_normal"

    form: str = "restricted"
    reg_covar: float = 1e-6
    var_regularization: float = 0.0
    inverse_temperature: float = 1.0
    annealing_start: float = 1.0
    annealing_iter: int = 0
    on_collapse: str = "reseed"
    weighted: bool = False

    def __post_init__(self):
        if self.form not in _FORMS:
            raise InvalidParameterError(
                f"The 'form' parameter of SkewNormal must be one of {_FORMS}. Got "
                f"{self.form!r} instead.")
        for name in ("reg_covar", "var_regularization"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InvalidParameterError(
                    f"The '{name}' parameter of SkewNormal must be a float >= 0. Got "
                    f"{value!r} instead.")
        for name in ("inverse_temperature", "annealing_start"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise InvalidParameterError(
                    f"The '{name}' parameter of SkewNormal must be a float in (0, 1]. Got "
                    f"{value!r} instead.")
        if not (isinstance(self.annealing_iter, int) and self.annealing_iter >= 0):
            raise InvalidParameterError(
                "The 'annealing_iter' parameter of SkewNormal must be an int >= 0. Got "
                f"{self.annealing_iter!r} instead.")
        if self.on_collapse not in ("reseed", "raise"):
            raise InvalidParameterError(
                "The 'on_collapse' parameter of SkewNormal must be 'reseed' or 'raise'. Got "
                f"{self.on_collapse!r} instead.")

    @property
    def skew_key(self) -> str:
        """The name of the skewness parameter: ``'shapes'`` or ``'skewness'``."""
        return "shapes" if self.form == "restricted" else "skewness"

    @property
    def _restricted(self) -> bool:
        return self.form == "restricted"

    # -- parameters -------------------------------------------------------------------------

    def make_params(self, weights, means, covariances, skew=None) -> Params:
        """Complete, validated parameters.

        Parameters
        ----------
        weights : array-like of shape (K,)
            Positive mixing weights summing to 1.
        means : array-like of shape (K, D)
            Locations ``mu`` (restricted) or ``xi`` (unrestricted).
        covariances : array-like of shape (K, D, D)
            Symmetric positive definite scale matrices ``Sigma``.
        skew : array-like of shape (K, D), optional
            ``shapes`` ``lambda`` (restricted) or ``skewness`` ``delta`` (unrestricted); zeros
            (Gaussian components) if None.

        Returns
        -------
        dict
            ``weights``, ``means``, ``covariances``, :attr:`skew_key` and
            ``precisions_cholesky``.

        Raises
        ------
        InvalidParameterError
            For inconsistent shapes, non-finite values, weights that are not a distribution, a
            scale matrix that is not positive definite, or too many features for the
            unrestricted form.
        """
        weights = np.array(weights, dtype=np.float64)
        means = np.array(means, dtype=np.float64)
        covariances = np.array(covariances, dtype=np.float64)
        if means.ndim != 2:
            raise InvalidParameterError(
                f"means must have shape (n_components, n_features). Got {means.shape}.")
        k, d = means.shape
        skew = np.zeros((k, d)) if skew is None else np.array(skew, dtype=np.float64)
        for name, value, shape in (("weights", weights, (k,)),
                                   ("covariances", covariances, (k, d, d)),
                                   (self.skew_key, skew, (k, d))):
            if value.shape != shape:
                raise InvalidParameterError(
                    f"{name} must have shape {shape} for means of shape {means.shape}. Got "
                    f"{value.shape} instead.")
        for name, value in (("weights", weights), ("means", means),
                            ("covariances", covariances), (self.skew_key, skew)):
            if not np.all(np.isfinite(value)):
                raise InvalidParameterError(f"{name} must be finite. Got {value!r}.")
        if np.any(weights <= 0) or abs(np.sum(weights) - 1.0) > 1e-6:
            raise InvalidParameterError(
                f"weights must be positive and sum to 1. Got {weights!r} instead.")
        self.check_n_features(d)
        asymmetry = np.abs(covariances - np.swapaxes(covariances, 1, 2)).max(axis=(1, 2))
        bad = not_positive_definite(covariances) | (
            asymmetry > 1e-10 * np.abs(covariances).max(axis=(1, 2)))
        if np.any(bad):
            raise InvalidParameterError(
                f"covariances[{int(np.argmax(bad))}] is not symmetric positive definite.")
        covariances = 0.5 * (covariances + np.swapaxes(covariances, 1, 2))
        return {"weights": weights, "means": means, "covariances": covariances,
                self.skew_key: skew, "precisions_cholesky": precision_cholesky(covariances)}

    def params_from_gaussian(self, weights, means, covariances) -> Params:
        """Parameters with zero skewness from a Gaussian mixture's (k-means or a GMM fit):
        the skew-normal components are then exactly those Gaussians. The first M-step starts
        their skewness from the data's third moments (zero skewness is a fixed point of ECM;
        see the module docstring)."""
        return self.make_params(weights, means, covariances)

    def n_parameters(self, params: Params) -> int:
        """``K (2 D + D (D + 1) / 2) + K - 1`` (mixsmsn's count; the same for both forms)."""
        k, d = np.shape(params["means"])
        return int(k * (2 * d + d * (d + 1) // 2) + k - 1)

    # -- worker side ------------------------------------------------------------------------

    def _constants(self, params: Params):
        """Per-parameter constants of the E-step (computed once per block, on the host).

        Restricted: ``U`` (precision Cholesky of Sigma), ``a = Sigma^{-1/2} lambda`` (so
        ``A = a^T y``), ``M = 1 / sqrt(1 + |lambda|^2)`` (the latent's posterior scale) and
        the constant ``log w + log 2 - D/2 log 2 pi + log |U|``. Unrestricted: ``U`` of
        ``Omega``, ``G = Omega^{-1} Delta`` (so ``q = G^T y``), ``Theta = I - Delta G`` and
        ``log w + D log 2 - D/2 log 2 pi + log |U|``.
        """
        weights, cov = params["weights"], params["covariances"]
        k, d = params["means"].shape
        if self._restricted:
            shapes = params["shapes"]
            _, inv_root = sqrt_and_inverse_sqrt(cov)
            a = np.einsum("kij,kj->ki", inv_root, shapes)
            scale = 1.0 / np.sqrt(1.0 + np.sum(shapes * shapes, axis=1))
            prec = params["precisions_cholesky"]
            log_two = math.log(2.0)
        else:
            delta = params["skewness"]
            omega = cov + delta[:, :, None] ** 2 * np.eye(d)
            prec = precision_cholesky(omega)
            a = (prec @ np.swapaxes(prec, 1, 2)) * delta[:, None, :]  # Omega^{-1} Delta
            theta = np.eye(d) - delta[:, :, None] * a
            scale = 0.5 * (theta + np.swapaxes(theta, 1, 2))
            log_two = d * math.log(2.0)
        log_det = np.sum(np.log(np.diagonal(prec, axis1=1, axis2=2)), axis=1)
        const = np.log(weights) + log_two - 0.5 * d * _LOG_2PI + log_det
        return params["means"], prec, a, scale, const

    def _component_terms(self, params: Params, x, xp, ws: Workspace, latent: bool):
        """``y = x - c_k`` (K, n, D), ``l_ik = log w_k + log f_k(x_i)`` (K, n) and, with
        ``latent``, the latent moments ``t1, t2`` ((K, n) each, or (K, n, D) and
        (K, n, D, D) unrestricted)."""
        if not self._restricted and xp is not np:
            raise NotImplementedError(
                "form='unrestricted' computes its E-step with NumPy and SciPy only (Owen's T, "
                f"ndtri_exp and the lattice rule); got arrays of {getattr(xp, '__name__', xp)}."
                " Use device='cpu' or form='restricted'.")
        means, prec, a, scale, const = (
            xp.asarray(v) for v in ws.memo("skew_normal", params,
                                             lambda: self._constants(params)))
        k, d = means.shape
        x = asarray_f64(x, xp)
        if x.ndim != 2 or x.shape[1] != d:
            raise DataError(f"Expected data of shape (n_samples, {d}) for parameters with "
                            f"{d} features. Got shape {tuple(x.shape)}.")
        y = x[None, :, :] - means[:, None, :]
        z = xp.matmul(y, prec)  # U^T y per row
        wlp = const[:, None] - 0.5 * xp.sum(z * z, axis=2)
        if self._restricted:
            proj = xp.matmul(y, a[:, :, None])[:, :, 0]  # A = lambda^T Sigma^{-1/2} y
            log_cdf, e1, e2 = truncated_normal_moments(proj, xp)
            wlp += log_cdf
            if not latent:
                return y, wlp, None, None
            return y, wlp, scale[:, None] * e1, (scale * scale)[:, None] * e2
        q = xp.matmul(y, a)  # Delta Omega^{-1} y per row
        n = x.shape[0]
        t1 = np.empty((k, n, d))
        t2 = np.empty((k, n, d, d))
        for j in range(k):
            log_alpha, t1[j], t2[j] = tallis_moments(q[j], scale[j])
            wlp[j] += log_alpha
        return y, wlp, t1, t2

    def check_n_features(self, n_features: int) -> None:
        """Raise if the form cannot handle ``n_features`` features."""
        if not self._restricted and n_features > MAX_UNRESTRICTED_FEATURES:
            raise InvalidParameterError(
                f"form='unrestricted' supports at most {MAX_UNRESTRICTED_FEATURES} features "
                f"(its E-step integrates a D-dimensional truncated normal per row); got "
                f"D = {n_features}. Use form='restricted'.")

    def estep(self, params: Params, x, xp, workspace: Workspace | None = None) -> Stats:
        """Statistics of block ``x`` (n, D) at ``params`` (see the module docstring), float64
        NumPy arrays whatever the namespace of ``x``."""
        ws = workspace or Workspace()
        weights = None
        if self.weighted:  # the last column holds the rows' weights
            x, weights = x[:, :-1], x[:, -1]
        with quiet_nonfinite(xp):  # non-finite rows are counted below and reported
            y, wlp, t1, t2 = self._component_terms(params, x, xp, ws, latent=True)
            if self.inverse_temperature < 1:  # softmax(nu l), and the untempered loglik
                resp = self.inverse_temperature * wlp
                normalize_log(resp, resp, xp, axis=0)
                log_norm = normalize_log(wlp, wlp, xp, axis=0)
            else:
                resp = wlp
                log_norm = normalize_log(resp, resp, xp, axis=0)
        ok = xp.isfinite(log_norm)
        n_bad = int(y.shape[1] - int(xp.count_nonzero(ok)))
        if n_bad:  # zero the rows so that no NaN reaches a sum; the engine reports them
            resp = xp.where(ok[None, :], resp, 0.0)
            y = xp.where(ok[None, :, None], y, 0.0)
            log_norm = xp.where(ok, log_norm, 0.0)
            t1 = xp.where(ok.reshape((1, -1) + (1,) * (t1.ndim - 2)), t1, 0.0)
            t2 = xp.where(ok.reshape((1, -1) + (1,) * (t2.ndim - 2)), t2, 0.0)
        n, loglik = float(y.shape[1]), float(xp.sum(log_norm))
        if weights is not None:
            weights = asarray_f64(weights, xp)
            resp = resp * weights[None, :]
            n, loglik = float(xp.sum(weights)), float(xp.sum(weights * log_norm))
        ry = y * resp[:, :, None]
        stats = {
            "n": n,
            "loglik": loglik,
            "n_nonfinite": float(n_bad),
            "nk": xp.sum(resp, axis=1),
            "y_sum": xp.sum(ry, axis=1),
            "yy_sum": xp.matmul(xp.swapaxes(ry, 1, 2), y),
            "y3_sum": xp.sum(ry * y * y, axis=1),
        }
        if self._restricted:
            stats["t1_sum"] = xp.sum(resp * t1, axis=1)
            stats["yt1_sum"] = xp.sum(ry * t1[:, :, None], axis=1)
            stats["t2_sum"] = xp.sum(resp * t2, axis=1)
        else:
            stats["t1_sum"] = xp.sum(resp[:, :, None] * t1, axis=1)
            stats["yt1_sum"] = xp.matmul(xp.swapaxes(ry, 1, 2), t1)
            stats["t2_sum"] = xp.sum(resp[:, :, None, None] * t2, axis=1)
        return {key: (value if isinstance(value, float) else
                      np.asarray(to_host(value), dtype=np.float64))
                for key, value in stats.items()}

    def combine(self, a: Stats, b: Stats) -> Stats:
        """Key-wise sum: every statistic is additive over rows."""
        return tree_add(a, b)

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        """Bytes of E-step temporaries per row (float64), for the engine's sub-batches."""
        # y, z, y * r, the (K, n) terms; unrestricted also t1, t2, q and the integration of
        # one component's latent per row: the lattice (w, tau, tau * weight and about eight
        # (n, points) arrays, D >= 3) or the bivariate tail rule (about eight 141-node arrays).
        d, k = n_features, n_components
        per_row = k * (3 * d + 10)
        if not self._restricted:
            per_row += k * (3 * d + 2 * d * d)
            per_row += LATTICE_POINTS * (3 * d + 8) if d >= 3 else 8 * 141
        return 8 * per_row

    def log_density(self, params: Params, x, xp, workspace: Workspace | None = None):
        """``log p(x)`` per row, shape (n,)."""
        with quiet_nonfinite(xp):  # the caller reports non-finite rows
            _, wlp, _, _ = self._component_terms(params, x, xp, workspace or Workspace(),
                                                 latent=False)
            return normalize_log(wlp, wlp, xp, axis=0)

    def predict_proba(self, params: Params, x, xp, workspace: Workspace | None = None):
        """Posterior component probabilities per row, shape (n, K) (untempered)."""
        with quiet_nonfinite(xp):  # the caller reports non-finite rows
            _, wlp, _, _ = self._component_terms(params, x, xp, workspace or Workspace(),
                                                 latent=False)
            normalize_log(wlp, wlp, xp, axis=0)
        return xp.ascontiguousarray(wlp.T)

    def row_scores(self, params: Params, x, xp, workspace: Workspace | None = None):
        """Each row's log-density, for re-seeding collapsed components at the lowest; rows
        with missing values score ``+inf`` (never chosen)."""
        scores = self.log_density(params, x, xp, workspace)
        return xp.where(xp.isnan(x).any(axis=1), xp.inf, scores)

    # -- driver side ------------------------------------------------------------------------

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        """The ECM update from the summed statistics (:func:`~dmix.families._skew_ecm.
        ecm_update`), the annealing kernel while tempered, the moment start for components of
        zero skewness, and the collapse policy (see the module docstring)."""
        reg = self.reg_covar + self.var_regularization
        means, sigma, skew, bad = ecm_update(self._restricted, params, stats, reg)
        nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10
        weights = nk / np.sum(nk)
        k, d = means.shape
        if self.tempered:  # the hot phase: locations and weights move, the kernel stays
            kernel = self.annealing_start * data_covariance(params, stats) + reg * np.eye(d)
            sigma = np.broadcast_to(kernel, (k, d, d)).copy()
            skew, bad = params[self.skew_key], not_positive_definite(sigma)
        else:
            means, sigma, skew = zero_skew_start(self._restricted, self.skew_key, params, stats,
                                                 means, sigma, skew, reg)
        bad |= (nk < 1) | ~np.all(np.isfinite(means), axis=1) | ~np.all(np.isfinite(skew), axis=1)
        collapsed = np.flatnonzero(bad)
        if collapsed.size and (self.on_collapse == "raise" or collapsed.size == k):
            j = int(collapsed[0])
            why = "its scale estimate is not positive definite" if nk[j] >= 1 else (
                "it is (nearly) empty")
            raise IllConditionedError(
                f"Fitting the skew-normal mixture failed because component {j} collapsed: it "
                f"holds {nk[j]:.3g} rows' worth of responsibility and {why} ({collapsed.size} "
                f"of {k} components collapsed). Use fewer components, increase reg_covar or "
                "scale the input data" + (", or pass on_collapse='reseed'."
                                          if collapsed.size < k else "."))
        if collapsed.size:
            means, sigma, skew = means.copy(), sigma.copy(), np.array(skew, copy=True)
            for key, value in (("means", means), ("covariances", sigma), (self.skew_key, skew)):
                value[collapsed] = params[key][collapsed]
            state = {**state, "collapsed": collapsed}
        sigma = 0.5 * (sigma + np.swapaxes(sigma, 1, 2))
        new = {"weights": weights, "means": means, "covariances": sigma,
               self.skew_key: np.asarray(skew, dtype=np.float64),
               "precisions_cholesky": precision_cholesky(sigma)}
        return new, state

    def objective(self, params: Params, stats: Stats) -> float:
        """What EM increases, per row: the mean log-likelihood of ``params``."""
        return float(stats["loglik"]) / float(stats["n"])

    @property
    def tempered(self) -> bool:
        """Whether the E-step tempers the responsibilities (then EM has not converged)."""
        return self.inverse_temperature < 1

    def for_iteration(self, iteration: int) -> SkewNormal:
        """The family for the E-step of iteration ``iteration`` (0 for the first): as
        :meth:`Gaussian.for_iteration <dmix.families.gaussian.Gaussian.for_iteration>`,
        ``nu_t = annealing_start ** (1 - t / annealing_iter)``, then 1."""
        if not self.annealing_iter:
            return self
        frac = max(0.0, 1.0 - iteration / self.annealing_iter)
        return replace(self, inverse_temperature=float(self.annealing_start ** frac))

    def reseed(self, params: Params, collapsed, rows) -> Params:
        """Re-seed the ``collapsed`` components at ``rows`` (the rows the model explains
        worst): each takes a row as its location, the weighted mean of the other components'
        scales, zero skewness, and weight ``1 / K`` before the weights are renormalised."""
        weights = np.array(params["weights"], dtype=np.float64)
        means = np.array(params["means"], dtype=np.float64)
        covariances = np.array(params["covariances"], dtype=np.float64)
        skew = np.array(params[self.skew_key], dtype=np.float64)
        k, d = means.shape
        collapsed = np.asarray(collapsed, dtype=np.intp)
        keep = np.setdiff1d(np.arange(k), collapsed)
        means[collapsed] = np.asarray(rows, dtype=np.float64)[:, :d]
        covariances[collapsed] = np.tensordot(weights[keep] / np.sum(weights[keep]),
                                              covariances[keep], axes=1)
        skew[collapsed] = 0.0
        weights[collapsed] = 1.0 / k
        return self.make_params(weights / np.sum(weights), means, covariances, skew)

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator):
        """Draw ``(X, labels)`` by the stochastic representation, rows grouped by component
        (as scikit-learn does).

        Restricted: ``x = mu + Sigma^{1/2} (delta |T_0| + R T_1)``, ``R = I - delta delta^T /
        (1 + sqrt(1 - |delta|^2))`` the symmetric root of ``I - delta delta^T`` (Azzalini's
        representation). Unrestricted: ``x = xi + delta * |U_0| + L U_1``, ``L L^T = Sigma``.
        """
        if not (isinstance(n_samples, int | np.integer) and n_samples >= 1):
            raise InvalidParameterError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at "
                "least one sample.")
        weights = np.asarray(params["weights"], dtype=np.float64)
        means, cov = params["means"], params["covariances"]
        k, d = means.shape
        labels = np.repeat(np.arange(k), rng.multinomial(n_samples, weights / weights.sum()))
        half = np.abs(rng.standard_normal((n_samples, d)))
        normal = rng.standard_normal((n_samples, d))
        if self._restricted:
            shapes = params["shapes"]
            delta = shapes / np.sqrt(1.0 + np.sum(shapes * shapes, axis=1))[:, None]
            root, _ = sqrt_and_inverse_sqrt(cov)
            dd = np.sum(delta * delta, axis=1)
            r = np.eye(d) - (delta[:, :, None] * delta[:, None, :]
                             / (1.0 + np.sqrt(1.0 - dd))[:, None, None])
            z = (delta[labels] * half[:, :1]
                 + np.einsum("nij,nj->ni", r[labels], normal))
            x = means[labels] + np.einsum("nij,nj->ni", root[labels], z)
        else:
            chol = np.linalg.cholesky(cov)
            x = (means[labels] + params["skewness"][labels] * half
                 + np.einsum("nij,nj->ni", chol[labels], normal))
        return x, labels

