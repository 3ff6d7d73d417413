"""The Gaussian mixture family: E-step statistics per block, closed-form M-step on the driver.

Parameters (``Params``): ``weights`` (K,), ``means`` (K, D), ``covariances`` and
``precisions_cholesky`` (shapes in :mod:`dmix.families.covariance`).

Statistics of a block, about the shift ``c = sum_k w_k mu_k`` of the current parameters (known
before the pass, close to the data mean, so nothing cancels for data far from the origin)::

    n, loglik, n_nonfinite      rows, sum_i log p(x_i), rows whose log p(x_i) is not finite
    nk  (K,)                    sum_i r_ik
    s1  (K, D)                  sum_i r_ik (x_i - c)
    s2  (K, m)                  sum_i r_ik Q(x_i - c): packed second moments about c, unpacked
                                by the covariance structure's ``from_quadratic`` in the M-step

E-step: with ``T = [1, x - c, Q(x - c)]`` stacked as the columns of a sub-batch (the expanded
form in :mod:`dmix.families.covariance`), the weighted log-densities are one matrix product
``W T`` with one row of coefficients per component, and after normalising them into
responsibilities ``R``, ``T R^T`` holds ``nk``, ``s1`` and the packed ``s2`` at once. Two
products over the sub-batch and nothing of size n x K x D, where the direct form takes
``n K D^2`` multiply-adds and an n x K x D temporary per product (docs/bench/ has the rates
measured). Where expanding would lose digits (a component far from the
shift in its own units, or a badly conditioned precision), the log-densities come from the
direct form ``|U^T (x - mu)|^2`` instead; see :func:`_expansion_error`.

M-step (shared/notes/model-math.md section 1.3): with ``b_k = s1_k / N_k``, ``mu_k = c + b_k``
and, for full covariances, ``Sigma_k = s2_k / N_k - b_k b_k^T + reg_covar I``. As scikit-learn
does, ``N_k`` carries ``10 * eps`` so an empty component does not divide by zero. With a
``prior`` the M-step is the posterior mode of :mod:`dmix.families.priors` (section 1.4).

Variants of the E-step, each a field of the family (sections 1.5, 1.6):

* ``cem``: classification EM. Responsibilities are one-hot at ``argmax_k l_ik`` (the lowest
  index on ties) and ``loglik`` is the classification log-likelihood ``sum_i max_k l_ik``, the
  objective CEM increases.
* ``inverse_temperature`` ``nu < 1``: deterministic annealing. Responsibilities are
  ``softmax_k(nu l_ik)`` with ``l_ik = log w_k + log N(x_i | mu_k, Sigma_k)`` (weights and
  densities both tempered, as in Ueda and Nakano's DAEM); ``loglik`` stays the untempered
  log-likelihood. Tempering alone does not anneal a Gaussian mixture: ``nu l_ik`` is the
  log-density with covariance ``Sigma_k / nu``, the M-step re-estimates ``Sigma_k`` from the
  broader responsibilities, and the components merge into the global Gaussian, a fixed point
  that stays stable up to ``nu = 1`` (measured: fits from ``nu = 0.1`` ended with every
  component identical). So, as in Rose's deterministic annealing for clustering, the
  covariances do not follow the data while tempered: the M-step moves the means and weights
  and sets every covariance to the *kernel* ``annealing_start * C`` (``C`` the covariance of
  all the data in the model's structure, from the same statistics). From the second
  iteration on (the first tempers the initial parameters), the E-step's covariance
  ``annealing_start * C / nu`` shrinks from ``C``, where the data look like one cluster, to
  ``annealing_start * C`` at ``nu = 1``; components split as it passes each cluster's scale.
  The first plain iteration starts from the kernel and estimates the covariances. The
  schedule of ``nu`` is :meth:`Gaussian.for_iteration`.
* ``missing="marginalize"``: batches with NaN entries go through
  :mod:`dmix.families.missing` (the exact E-step of incomplete-data EM; plain EM and MAP only).
* ``weighted``: the last column of a block holds the rows' weights ``w_i >= 0``; statistics are
  ``sum_i w_i ...`` and ``n`` is ``sum_i w_i``.

A component *collapses* when it holds less than one row's worth of responsibility
(``N_k < 1``) or its covariance estimate is not positive definite. ``on_collapse="raise"``
stops with :class:`~dmix.errors.IllConditionedError` naming it; ``"reseed"`` keeps its previous
parameters and lists it in the M-step state under ``"collapsed"``, and the engine re-seeds it
with :meth:`Gaussian.reseed` from the rows the model explains worst.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from dmix.errors import IllConditionedError
from dmix.families.base import Params, State, Stats, tree_add
from dmix.families.covariance import get_covariance
from dmix.kernels import normalize_log
from dmix.xp import Workspace, asarray_f64, get_namespace, quiet_nonfinite, to_host

__all__ = ["Gaussian"]

_EPS10 = 10 * np.finfo(np.float64).eps
_LOG_2PI = np.log(2.0 * np.pi)

#: Largest rounding error (in units of squared Mahalanobis distance) tolerated from the expanded
#: form in float64; beyond it the E-step takes the direct form. Typical data give 1e-13 or less.
EXPANSION_TOL = 1e-10
#: The same for float32 E-steps, where typical data give 1e-5; 1e-3 errs a log-density by at
#: most 5e-4.
EXPANSION_TOL_FLOAT32 = 1e-3


def _expansion_error(cov, params: Params, means_c, coef, pmu, dtype=np.float64) -> float:
    """A bound on the rounding error of the expanded distance for rows near each component.

    Summing ``coef . Q(x) - 2 pmu . x + mu^T P mu`` in floating point errs by about ``eps`` (of
    the compute ``dtype``) times the sum of the magnitudes of its terms. Those are evaluated at ``|mu_k| + 3 sd_k``
    per coordinate, a row at the edge of component ``k`` (rows farther out have larger
    distances, so a relative error that stays small).
    """
    k, d = means_c.shape
    dense = cov.dense(params["covariances"], k, d)
    edge = np.abs(means_c) + 3.0 * np.sqrt(np.diagonal(dense, axis1=1, axis2=2))
    quad = np.empty((coef.shape[1], k))
    cov.quadratic_features(edge.T, quad, np)
    terms = (np.abs(coef) * quad.T).sum(1) + 2 * (np.abs(pmu) * edge).sum(1)
    terms += np.abs(np.sum(pmu * means_c, axis=1))
    return float(np.finfo(dtype).eps * np.max(terms))


def _hard_assignments(wlp, xp, ws: Workspace):
    """One-hot responsibilities at ``argmax_k`` of the (K, n) log-densities (the lowest index on
    ties) and each row's classification log-likelihood ``max_k l_ik``."""
    k, n = wlp.shape
    best = xp.argmax(wlp, axis=0)
    cols = xp.arange(n)
    value = wlp[best, cols]
    resp = ws.take("hard", (k, n), xp)
    resp[...] = 0.0
    resp[best, cols] = 1.0
    return resp, value


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
    var_regularization : float
        Non-negative value added to the diagonal after the M-step's estimate (the ``mixes``
        package's option; on this family the same as raising ``reg_covar``).
    prior : dmix.families.priors.GaussianPrior, optional
        Conjugate priors: the M-step gives the posterior mode (MAP) instead of the ML estimate.
    cem : bool
        Classification EM (hard assignments).
    inverse_temperature : float in (0, 1]
        Tempering of the responsibilities (deterministic annealing); 1 is plain EM.
    annealing_start, annealing_iter : float, int
        The annealing schedule of :meth:`for_iteration` (``annealing_iter = 0``: no annealing).
    on_collapse : {'reseed', 'raise'}
        What the M-step does with a collapsed component (see the module docstring).
    missing : {'raise', 'marginalize'}
        Rows with NaN entries: an error (the engine names them), or marginalised.
    weighted : bool
        Blocks carry the rows' weights as their last column.
    """

    name: ClassVar[str] = "gaussian"

    covariance_type: str = "full"
    reg_covar: float = 1e-6
    var_regularization: float = 0.0
    prior: object = None
    cem: bool = False
    inverse_temperature: float = 1.0
    annealing_start: float = 1.0
    annealing_iter: int = 0
    on_collapse: str = "reseed"
    missing: str = "raise"
    weighted: bool = False

    def __post_init__(self):
        cov = get_covariance(self.covariance_type)  # raises on an unknown name
        object.__setattr__(self, "covariance_type", cov.name)
        for name in ("reg_covar", "var_regularization"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a float >= 0. Got {value!r} instead.")
        for name in ("inverse_temperature", "annealing_start"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise ValueError(f"{name} must be a float in (0, 1]. Got {value!r} instead.")
        if not (isinstance(self.annealing_iter, int) and self.annealing_iter >= 0):
            raise ValueError(
                f"annealing_iter must be an int >= 0. Got {self.annealing_iter!r} instead.")
        if self.on_collapse not in ("reseed", "raise"):
            raise ValueError(
                f"on_collapse must be 'reseed' or 'raise'. Got {self.on_collapse!r} instead.")
        if self.missing not in ("raise", "marginalize"):
            raise ValueError(
                f"missing must be 'raise' or 'marginalize'. Got {self.missing!r} instead.")
        if self.missing == "marginalize" and (self.cem or self.annealing_iter or self.weighted):
            raise ValueError("missing='marginalize' works with plain EM and MAP estimation; "
                             "not with cem, annealing or sample weights.")
        if self.cem and (self.annealing_iter or self.inverse_temperature < 1):
            raise ValueError("Annealing has no effect on classification EM (cem=True): the "
                             "hard assignments do not depend on the temperature.")

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

    def _coefficients(self, params: Params, xp, ws: Workspace | None = None):
        """Per-parameter constants of the E-step, computed once and kept in the workspace.

        Returns ``(shift, W, expand)`` in the workspace's dtype: the centring shift, the
        (K, 1 + D + m) coefficients with ``W T = log w_k + log N(x | mu_k, Sigma_k)``, and
        whether the expanded form is accurate enough in that dtype (else ``W`` is None and the
        direct form is used).
        """
        ws = ws or Workspace()
        cov = self.covariance
        shift = _shift(params)
        means_c = params["means"] - shift
        prec_chol = params["precisions_cholesky"]
        k, d = means_c.shape
        coef, pmu = cov.expansion(prec_chol, means_c)
        tol = EXPANSION_TOL_FLOAT32 if ws.dtype == np.float32 else EXPANSION_TOL
        if _expansion_error(cov, params, means_c, coef, pmu, ws.dtype) > tol:
            return ws.asarray(shift, xp), None, False
        const = (np.log(params["weights"]) + cov.log_det(prec_chol, d)
                 - 0.5 * (d * _LOG_2PI + np.sum(pmu * means_c, axis=1)))
        w = np.concatenate([const[:, None], pmu, -0.5 * coef], axis=1)
        return ws.asarray(shift, xp), ws.asarray(w, xp), True

    def _row_statistics(self, x, shift, xp, ws: Workspace):
        """``T = [1, x - c, Q(x - c)]`` (1 + D + m, n) of rows ``x``, in a workspace buffer."""
        n, d = x.shape
        t = ws.take("T", (1 + d + self.covariance.n_quadratic(d), n), xp)
        t[0] = 1.0
        xp.subtract(x.T, shift[:, None], out=t[1 : 1 + d])
        self.covariance.quadratic_features(t[1 : 1 + d], t[1 + d :], xp)
        return t

    def _moments(self, t, resp_t, n_features: int, ws: Workspace | None = None) -> Stats:
        """``nk``, ``s1`` and ``s2`` from row statistics ``T`` and responsibilities (K, n):
        views of the one (1 + D + m, K) array ``T R^T``, written into ``ws`` if given, and
        returned as float64 NumPy arrays (the engine sums sub-batches in float64).

        That array is 0.5 MB at D = 64, K = 32: allocated afresh per sub-batch, it is an
        ``mmap`` on Dask workers (see :class:`~dmix.xp.Workspace`), which made the E-step 15%
        slower there.
        """
        xp = get_namespace(t)
        out = None if ws is None else ws.take("moments", (t.shape[0], resp_t.shape[0]), xp,
                                              dtype=t.dtype)
        moments = np.asarray(to_host(xp.matmul(t, resp_t.T, out=out)), dtype=np.float64)
        return {
            "nk": moments[0],
            "s1": moments[1 : 1 + n_features].T,
            "s2": moments[1 + n_features :].T,
        }

    def _weighted_log_prob(self, params: Params, x, xp, ws: Workspace):
        """Row statistics ``T`` (1 + D + m, n) and ``log w_k + log N(x | mu_k, Sigma_k)`` (K, n).

        Both are workspace buffers, overwritten by the next call.
        """
        cov = self.covariance
        n, d = x.shape
        k = params["means"].shape[0]
        shift, w, expand = ws.memo("gaussian", params,
                                   lambda: self._coefficients(params, xp, ws))
        t = self._row_statistics(x, shift, xp, ws)
        xt = t[1 : 1 + d]
        wlp = ws.take("wlp", (k, n), xp)
        if expand:
            xp.matmul(w, t, out=wlp)
        else:
            means_c = ws.asarray(params["means"], xp) - shift
            direct = cov.log_prob(xt.T, means_c, params["precisions_cholesky"], xp, ws)
            direct += ws.asarray(np.log(params["weights"]), xp)
            wlp[...] = direct.T
        return t, wlp

    def estep(self, params: Params, x, xp, workspace: Workspace | None = None) -> Stats:
        ws = workspace or Workspace()
        weights = None
        if self.weighted:
            x, weights = x[:, :-1], x[:, -1]
        if self._marginalize(x, xp):
            from dmix.families.missing import estep_missing

            return estep_missing(self, params, x, xp)
        return self._estep(params, x, xp, ws, weights)

    def _marginalize(self, x, xp) -> bool:
        """Whether this batch goes through :mod:`dmix.families.missing`."""
        return self.missing == "marginalize" and bool(xp.isnan(x).any())

    def _estep(self, params: Params, x, xp, ws: Workspace, weights=None) -> Stats:
        d = x.shape[1]
        with quiet_nonfinite(xp):  # non-finite rows are counted below and reported
            t, wlp = self._weighted_log_prob(params, x, xp, ws)
            if self.cem:
                resp, log_norm = _hard_assignments(wlp, xp, ws)
            elif self.inverse_temperature < 1:  # softmax(nu l), and the untempered loglik
                resp = ws.take("tempered", wlp.shape, xp)
                xp.multiply(wlp, self.inverse_temperature, out=resp)
                normalize_log(resp, resp, xp, axis=0)
                log_norm = normalize_log(wlp, wlp, xp, axis=0)
            else:
                resp = wlp
                log_norm = normalize_log(resp, resp, xp, axis=0)  # resp: the responsibilities
        ok = xp.isfinite(log_norm)
        n_bad = int(x.shape[0] - int(xp.count_nonzero(ok)))
        if n_bad:  # keep the sums finite; the engine reports the rows
            t[:, ~ok] = 0.0
            resp[:, ~ok] = 0.0
            log_norm = xp.where(ok, log_norm, 0.0)
        if weights is None:
            n, loglik = float(x.shape[0]), float(xp.sum(log_norm, dtype=xp.float64))
        else:
            resp *= weights[None, :]
            n = float(xp.sum(weights, dtype=xp.float64))
            loglik = float(xp.sum(weights * log_norm, dtype=xp.float64))
        return {"n": n, "loglik": loglik, "n_nonfinite": float(n_bad),
                **self._moments(t, resp, d, ws)}

    def combine(self, a: Stats, b: Stats) -> Stats:
        return tree_add(a, b)

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        # The row statistics T and the (K, n) log-densities; the direct form takes more, but
        # only for parameters the expansion cannot serve.
        return 8 * (1 + n_features + self.covariance.n_quadratic(n_features) + 2 * n_components)

    def log_density(self, params: Params, x, xp, workspace: Workspace | None = None):
        if self._marginalize(x, xp):
            from dmix.families.missing import log_density_missing

            return log_density_missing(self, params, x, xp)
        with quiet_nonfinite(xp):  # the caller reports non-finite rows
            _, wlp = self._weighted_log_prob(params, x, xp, workspace or Workspace())
            return normalize_log(wlp, wlp, xp, axis=0)

    def predict_proba(self, params: Params, x, xp, workspace: Workspace | None = None):
        if self._marginalize(x, xp):
            from dmix.families.missing import predict_proba_missing

            return predict_proba_missing(self, params, x, xp)
        with quiet_nonfinite(xp):  # the caller reports non-finite rows
            _, wlp = self._weighted_log_prob(params, x, xp, workspace or Workspace())
            normalize_log(wlp, wlp, xp, axis=0)
        return xp.ascontiguousarray(wlp.T)

    # -- driver side ------------------------------------------------------------------------

    def _estimate(self, stats: Stats, shift: np.ndarray, n_total=None, previous=None):
        """Parameters from statistics about ``shift``; weights ``N_k / n_total`` (default
        ``sum_k N_k``). Returns ``(params, collapsed)``: with ``previous`` parameters, the
        indices of the collapsed components, which keep their previous values."""
        # C order whatever the layout the statistics arrived in (the E-step's are transposed
        # views): NumPy's sums depend on it in the last bit, and resumed fits must be exact.
        cov = self.covariance
        nk = np.asarray(stats["nk"], dtype=np.float64) + _EPS10
        b = np.ascontiguousarray(stats["s1"]) / nk[:, None]
        s2 = cov.from_quadratic(np.ascontiguousarray(np.asarray(stats["s2"]).T))
        reg = self.reg_covar + self.var_regularization
        if self.prior is not None and n_total is None:
            from dmix.families.priors import map_estimate

            weights, means, covariances = map_estimate(cov, nk, b, s2, shift, self.prior, reg)
        else:
            covariances = cov.estimate(nk, b, s2, reg)
            weights = nk / (np.sum(nk) if n_total is None else n_total)
            means = shift + b
        collapsed, prec_chol = np.zeros(0, dtype=np.intp), None
        if previous is not None:
            collapsed, prec_chol = self._collapsed(nk, covariances)
            if collapsed.size:
                means, covariances = means.copy(), np.array(covariances, copy=True)
                means[collapsed] = previous["means"][collapsed]
                covariances[collapsed] = previous["covariances"][collapsed]
                prec_chol = None
        params = {
            "weights": weights,
            "means": means,
            "covariances": covariances,
            "precisions_cholesky": (cov.precision_cholesky(covariances) if prec_chol is None
                                    else prec_chol),
        }
        return params, collapsed

    def _collapsed(self, nk, covariances):
        """Indices of components with ``N_k < 1`` or a covariance that is not positive
        definite, and the precision Cholesky factors when all are (else None); raises
        :class:`IllConditionedError` under ``on_collapse="raise"``, and where re-seeding cannot
        help (a tied covariance, or every component collapsed)."""
        cov, k = self.covariance, nk.shape[0]
        # With Normal-inverse-Wishart priors an empty component still has a posterior mode.
        defined = self.prior is not None and self.prior.has_mean and self.prior.has_covariance
        bad = np.zeros(k, dtype=bool) if defined else nk < 1
        try:
            prec_chol = cov.precision_cholesky(covariances)  # one batched factorisation
        except IllConditionedError:
            if cov.tied:  # no component to re-seed
                raise
            prec_chol = None
            for j in range(k):  # which ones failed
                try:
                    cov.precision_cholesky(covariances[j : j + 1])
                except IllConditionedError:
                    bad[j] = True
        if prec_chol is not None and not cov.tied:
            bad |= ~np.isfinite(prec_chol.reshape(k, -1)).all(axis=1)
        idx = np.flatnonzero(bad)
        if idx.size and (self.on_collapse == "raise" or idx.size == k):
            j = int(idx[0])
            why = "its covariance estimate is not positive definite" if nk[j] >= 1 else (
                "it is (nearly) empty")
            raise IllConditionedError(
                f"Fitting the mixture model failed because component {j} collapsed: it holds "
                f"{nk[j]:.3g} rows' worth of responsibility and {why} ({idx.size} of {k} "
                "components collapsed). Use fewer components, increase reg_covar, scale the "
                "input data" + (", or pass on_collapse='reseed' to re-seed collapsed "
                "components from the rows the model explains worst." if idx.size < k else "."))
        return idx, prec_chol

    def _annealing_covariances(self, stats: Stats, n_components: int) -> np.ndarray:
        """The kernel of the hot phase: ``annealing_start`` times the covariance of all the
        data in this structure, plus ``reg_covar + var_regularization``, for every component.

        Responsibilities sum to one per row, so the statistics summed over components are the
        data's own (``n``, ``sum x``, ``sum Q(x)``): no extra pass.
        """
        cov = self.covariance
        n = np.sum(stats["nk"])
        b = np.sum(stats["s1"], axis=0)[None] / n
        s2 = cov.from_quadratic(np.sum(np.asarray(stats["s2"]), axis=0)[:, None])
        # estimate() adds its regularisation before the scaling: nu0 (C + reg / nu0).
        nu0 = self.annealing_start
        reg = (self.reg_covar + self.var_regularization) / nu0
        kernel = nu0 * cov.estimate(np.array([n]), b, s2, reg)
        if cov.tied:
            return kernel
        return np.broadcast_to(kernel, (n_components,) + kernel.shape[1:]).copy()

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        new, collapsed = self._estimate(stats, _shift(params), previous=params)
        if self.tempered:  # the hot phase: means and weights move, the kernel stays
            covs = self._annealing_covariances(stats, params["means"].shape[0])
            new = {**new, "covariances": covs,
                   "precisions_cholesky": self.covariance.precision_cholesky(covs)}
        if collapsed.size:
            state = {**state, "collapsed": collapsed}
        return new, state

    def objective(self, params: Params, stats: Stats) -> float:
        """What EM increases, per row: the mean log-likelihood of ``params`` (the
        classification log-likelihood under ``cem``), plus ``log p(params) / n`` with a prior."""
        value = float(stats["loglik"]) / float(stats["n"])
        if self.prior is not None:
            from dmix.families.priors import log_prior

            value += log_prior(self.covariance, params, self.prior) / float(stats["n"])
        return value

    @property
    def tempered(self) -> bool:
        """Whether the E-step tempers the responsibilities (then EM has not converged)."""
        return self.inverse_temperature < 1

    def for_iteration(self, iteration: int) -> Gaussian:
        """The family for the E-step of iteration ``iteration`` (0 for the first).

        With annealing, the inverse temperature rises geometrically from ``annealing_start``
        at iteration 0 to 1 at iteration ``annealing_iter``:
        ``nu_t = annealing_start ** (1 - t / annealing_iter)``, then stays at 1 (plain EM, the
        only iterations where the engine tests convergence: ``tempered`` is False).
        """
        if not self.annealing_iter:
            return self
        frac = max(0.0, 1.0 - iteration / self.annealing_iter)
        return replace(self, inverse_temperature=float(self.annealing_start ** frac))

    def row_scores(self, params: Params, x, xp, workspace: Workspace | None = None):
        """How well the model explains each row (its log-density), for re-seeding collapsed
        components at the lowest; rows of zero weight or with missing values score ``+inf``
        (never chosen)."""
        if not self.weighted:
            scores = self.log_density(params, x, xp, workspace)
            return xp.where(xp.isnan(x).any(axis=1), xp.inf, scores)
        scores = self.log_density(params, x[:, :-1], xp, workspace)
        return xp.where(x[:, -1] > 0, scores, xp.inf)

    def reseed(self, params: Params, collapsed, rows) -> Params:
        """Re-seed the ``collapsed`` components at ``rows`` (one row each, the rows the model
        explains worst): each takes a row as its mean, the weighted mean of the other
        components' covariances, and weight ``1 / K`` before the weights are renormalised."""
        weights = np.array(params["weights"], dtype=np.float64)
        means = np.array(params["means"], dtype=np.float64)
        covariances = np.array(params["covariances"], dtype=np.float64)
        k, d = means.shape
        collapsed = np.asarray(collapsed, dtype=np.intp)
        means[collapsed] = np.asarray(rows, dtype=np.float64)[:, :d]
        if not self.covariance.tied:
            keep = np.setdiff1d(np.arange(k), collapsed)
            w = weights[keep] / np.sum(weights[keep])
            covariances[collapsed] = np.tensordot(w, covariances[keep], axes=1)
        weights[collapsed] = 1.0 / k
        return self.make_params(weights / np.sum(weights), means, covariances)

    def params_from_stats(self, stats: Stats, shift: np.ndarray) -> Params:
        """Initial parameters from statistics gathered with given responsibilities about ``shift``.

        This is scikit-learn's ``_initialize`` from ``resp``: weights ``N_k / N`` (not
        renormalised), means and covariances as in the M-step.
        """
        return self._estimate(stats, shift, stats["n"])[0]

    def params_from_points(self, points: np.ndarray, n_samples: int) -> Params:
        """Initial parameters where each row of ``points`` alone has responsibility 1 for its
        component (scikit-learn's ``k-means++`` and ``random_from_data`` inits).

        The means are the points, each covariance is ``reg_covar`` (one point has no scatter),
        and the weights are ``(1 + 10 eps) / n_samples``, unnormalised as in scikit-learn.
        """
        k, d = points.shape
        nk = np.full(k, 1.0 + _EPS10)
        zero_s2 = self.covariance.from_quadratic(np.zeros((self.covariance.n_quadratic(d), k)))
        covariances = self.covariance.estimate(nk, np.zeros((k, d)), zero_s2, self.reg_covar)
        return {
            "weights": nk / n_samples,
            "means": np.array(points, dtype=np.float64),
            "covariances": covariances,
            "precisions_cholesky": self.covariance.precision_cholesky(covariances),
        }

    def stats_from_resp(self, resp, x, shift, xp) -> Stats:
        """Statistics of a block for given responsibilities ``resp`` (n, K), about ``shift``."""
        t = self._row_statistics(asarray_f64(x, xp), xp.asarray(shift), xp, Workspace())
        return {"n": float(x.shape[0]), **self._moments(t, xp.asarray(resp).T, x.shape[1])}

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator, *, component=None,
               confidence=None, std_range=None):
        """Draw ``(X, labels)``: components from the weights, then Gaussian rows.

        Rows are grouped by component, as scikit-learn does. ``component``, ``confidence`` and
        ``std_range`` select components and restrict each row to its component's confidence
        region or Mahalanobis band, exactly; see :func:`dmix.families.sampling.sample_mixture`.
        """
        from dmix.families.sampling import sample_mixture

        return sample_mixture(self.covariance, params, n_samples, rng, component=component,
                              confidence=confidence, std_range=std_range)
