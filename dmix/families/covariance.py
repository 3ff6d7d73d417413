"""The six covariance structures of a Gaussian mixture, one small class each, in one table.

Every question whose answer depends on the covariance type -- the E-step distances, the
second-order statistic, the M-step estimate, the precision Cholesky factor, the parameter count
-- is answered by the structure's class, so no other module branches on the type.

Conventions (those of scikit-learn, extended to the two tied structures mclust adds):

============== =================== ==================================== ===============
name           mclust              ``covariances_`` / ``precisions_``    statistic ``s2``
============== =================== ==================================== ===============
full           VVV                 (K, D, D)                            (K, D, D)
tied           EEE                 (D, D)                               (D, D)
diag           VVI                 (K, D)                               (K, D)
spherical      VII                 (K,)                                 (K,)
tied_diag      EEI                 (D,)                                 (D,)
tied_spherical EII                 ()                                   ()
============== =================== ==================================== ===============

``precisions_cholesky_`` has the shape of ``covariances_``; for the matrix types it is the
upper-triangular ``U`` with ``inv(Sigma) = U @ U.T``, for the others ``1 / sqrt(variance)``.

Worker-side methods take data ``xc = x - c`` and means ``means_c = mu - c`` centred by the same
shift ``c`` (``dmix.families.gaussian`` picks it), so distances never suffer the cancellation
of raw coordinates far from the origin. Statistics are second moments about ``c``:
``s2 = sum_i r_ik xc_i xc_i^T`` (reduced as the structure needs), and the M-step turns them into
covariances with ``b_k = s1_k / N_k = mu_k - c`` (shared/notes/model-math.md section 1.3).

The E-step works on the expanded form. With ``P_k`` the precision, a Gaussian log-density is
linear in the row statistics ``T(x) = [1, x, Q(x)]``, where ``Q`` holds the distinct quadratic
terms the structure needs (``x_a x_b`` for ``a <= b`` when full or tied, ``x_a^2`` when
diagonal, ``|x|^2`` when spherical)::

    (x - mu)^T P (x - mu) = coef . Q(x) - 2 (P mu) . x + mu^T P mu

so one matrix product gives the log-densities of a sub-batch for all components, and one more,
``T^T R``, all of its statistics (``Q`` summed with the responsibilities is the second moment,
packed). Each structure answers ``n_quadratic``, ``quadratic_features``, ``expansion`` and
``from_quadratic``; ``mahalanobis`` is the direct form ``|U^T (x - mu)|^2``, the reference and
the fallback where the expansion would round badly (see ``dmix.families.gaussian``).
"""

from __future__ import annotations

import math

import numpy as np

from dmix import kernels
from dmix.errors import IllConditionedError
from dmix.xp import Workspace

__all__ = ["COVARIANCE_TYPES", "get_covariance"]

_LOG_2PI = math.log(2.0 * math.pi)

ILL_DEFINED = (
    "Fitting the mixture model failed because {what} has an ill-defined empirical covariance "
    "(for instance caused by singleton or collapsed samples). Try to decrease the number of "
    "components, increase reg_covar, or scale the input data."
)


def _add_to_diagonal(a: np.ndarray, value: float) -> np.ndarray:
    d = a.shape[-1]
    a = a.copy()
    a[..., np.arange(d), np.arange(d)] += value
    return a


def _symmetrize(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def _flip(a: np.ndarray) -> np.ndarray:
    return a[..., ::-1, ::-1]


def _upper_factor_of_inverse(cov: np.ndarray, names) -> np.ndarray:
    """``U`` upper triangular with ``inv(cov) = U @ U.T``, for (..., D, D) SPD ``cov``.

    With ``cov = L @ L.T`` (Cholesky), ``U = inv(L).T``: a triangular solve, no explicit inverse
    of ``cov``. ``names`` gives, per leading index, what to call the matrix in an error.
    """
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise IllConditionedError(ILL_DEFINED.format(what=_first_failure(cov, names))) from None
    eye = np.broadcast_to(np.eye(cov.shape[-1]), cov.shape)
    # Contiguous, so results do not depend on whether params were pickled on the way.
    return np.ascontiguousarray(np.swapaxes(np.linalg.solve(chol, eye), -1, -2))


def _upper_factor(precision: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``precision = U @ U.T`` (Cholesky of the flipped matrix)."""
    return np.ascontiguousarray(_flip(np.linalg.cholesky(_flip(precision))))


def _first_failure(cov: np.ndarray, names) -> str:
    mats = cov.reshape(-1, *cov.shape[-2:])
    for i, m in enumerate(mats):
        try:
            np.linalg.cholesky(m)
        except np.linalg.LinAlgError:
            return names(i)
    return names(0)  # pragma: no cover - the batched call failed, so one matrix does


def _check_positive(variances: np.ndarray, names) -> None:
    """Raise naming the first component (leading index) with a variance that is not > 0."""
    bad = np.argwhere(~(np.atleast_1d(variances) > 0))
    if bad.size:
        raise IllConditionedError(ILL_DEFINED.format(what=names(int(bad[0][0]))))


def _row_sq_norms(y, xp, ws):
    """``sum_d y[:, :, d]^2`` (n, K) of an (n, K, D) array, in one sweep, into buffer ``"nk"``."""
    n, k, _ = y.shape
    return kernels.row_sq_norms(y, xp, out=ws.take("nk", (n, k), xp))


def _unpack_symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """(..., D, D) symmetric matrices from their upper triangles in ``np.triu_indices`` order."""
    rows, cols = np.triu_indices(d)
    out = np.empty((*packed.shape[:-1], d, d))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def _component(i: int) -> str:
    return f"component {i}"


def _shared(i: int) -> str:
    return "the shared (tied) covariance"


class _Covariance:
    """Interface of a covariance structure. Subclasses fill in each method for their shape."""

    name: str
    tied: bool
    #: The covariances are matrices (full, tied); otherwise variances.
    matrix: bool

    def shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        """Shape of ``covariances_``, ``precisions_`` and ``precisions_cholesky_``."""
        raise NotImplementedError

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Free parameters of the covariances."""
        raise NotImplementedError

    def log_det(self, prec_chol: np.ndarray, n_features: int):
        """``log det U = -1/2 log det Sigma`` per component (K,), or a scalar when tied."""
        raise NotImplementedError

    def mahalanobis(self, xc, means_c, prec_chol, xp, ws: Workspace | None = None):
        """Squared Mahalanobis distances (n, K) of centred rows to centred means.

        Large temporaries go to the workspace ``ws``; the result may be one of its buffers.
        """
        raise NotImplementedError

    def n_quadratic(self, n_features: int) -> int:
        """Number of rows ``m`` of the quadratic statistics ``Q(x)``."""
        raise NotImplementedError

    def quadratic_features(self, xt, out, xp) -> None:
        """Write ``Q(x)`` (m, n) into ``out`` for centred rows given as columns ``xt`` (D, n)."""
        raise NotImplementedError

    def expansion(self, prec_chol: np.ndarray, means_c: np.ndarray):
        """``(coef, pmu)``: ``x^T P_k x = coef[k] . Q(x)`` (K, m) and ``P_k mu_k`` (K, D)."""
        raise NotImplementedError

    def from_quadratic(self, q: np.ndarray) -> np.ndarray:
        """The statistic ``s2`` (module table) from ``q = sum_i Q(x_i) r_i^T`` (m, K)."""
        raise NotImplementedError

    def estimate(self, nk, b, s2, reg_covar: float) -> np.ndarray:
        """Covariances from ``nk`` (K,), ``b = s1 / nk`` (K, D) and ``s2``, plus ``reg_covar``."""
        raise NotImplementedError

    def precision_cholesky(self, covariances: np.ndarray) -> np.ndarray:
        """``precisions_cholesky_`` from ``covariances_``; raises IllConditionedError."""
        raise NotImplementedError

    def cholesky_from_precisions(self, precisions: np.ndarray) -> np.ndarray:
        """``precisions_cholesky_`` from ``precisions_`` (used for ``precisions_init``)."""
        raise NotImplementedError

    def precisions(self, prec_chol: np.ndarray) -> np.ndarray:
        """``precisions_`` from ``precisions_cholesky_``."""
        raise NotImplementedError

    def covariances_from_precisions(self, precisions: np.ndarray) -> np.ndarray:
        """``covariances_`` from ``precisions_``."""
        raise NotImplementedError

    def dense(self, covariances: np.ndarray, n_components: int, n_features: int) -> np.ndarray:
        """The covariances as a (K, D, D) array of full matrices."""
        raise NotImplementedError

    def apply_precision(self, precisions: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``P_k v_k`` for each component's vector ``v_k`` (rows of ``vectors``, (K, D)), from
        ``precisions_``."""
        raise NotImplementedError

    def sandwich(self, precisions: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``P S P`` in the structure's form, for ``S`` of the shape of ``covariances_``."""
        raise NotImplementedError

    def scatter_counts(self, nk: np.ndarray, n_features: int):
        """``N`` such that ``N * estimate(...)`` is the summed scatter behind each covariance
        entry (broadcastable to the covariances): ``N_k`` per component, ``sum_k N_k`` when
        tied, times ``D`` when one variance serves ``D`` coordinates (spherical)."""
        raise NotImplementedError

    def log_prob(self, xc, means_c, prec_chol, xp, ws: Workspace | None = None):
        """``log N(x | mu_k, Sigma_k)`` per row and component, shape (n, K).

        ``-1/2 (D log 2 pi + maha) + log det U``, computed in place in the distance buffer.
        """
        d = xc.shape[1]
        out = self.mahalanobis(xc, means_c, prec_chol, xp, ws)
        out += d * _LOG_2PI
        out *= -0.5
        out += xp.asarray(self.log_det(prec_chol, d), dtype=out.dtype)
        return out

    def __repr__(self) -> str:
        return f"<covariance {self.name!r}>"


class Full(_Covariance):
    name, tied, matrix = "full", False, True

    def shape(self, n_components, n_features):
        return (n_components, n_features, n_features)

    def n_parameters(self, n_components, n_features):
        return n_components * n_features * (n_features + 1) // 2

    def log_det(self, prec_chol, n_features):
        return np.sum(np.log(np.diagonal(prec_chol, axis1=1, axis2=2)), axis=1)

    def mahalanobis(self, xc, means_c, prec_chol, xp, ws=None):
        ws = ws or Workspace()
        n, d = xc.shape
        k = means_c.shape[0]
        u = ws.asarray(prec_chol, xp)
        # One GEMM for all components: [xc | 1] @ [[U_1 ... U_K], [-mu_1 U_1 ... -mu_K U_K]]
        # gives y_k = (x - mu_k) U_k for every k as an (n, K*D) block (the 1-column folds the
        # subtraction of mu_k U_k into the product).
        rhs = xp.empty((d + 1, k * d), dtype=ws.dtype)
        rhs[:d] = xp.reshape(xp.transpose(u, (1, 0, 2)), (d, k * d))
        rhs[d] = -xp.reshape(xp.matmul(ws.asarray(means_c, xp)[:, None, :], u), (k * d,))
        lhs = ws.take("x1", (n, d + 1), xp)
        lhs[:, :d] = xc
        lhs[:, d] = 1.0
        y = ws.take("nkd", (n, k, d), xp)  # the n x K x D scratch
        xp.matmul(lhs, rhs, out=xp.reshape(y, (n, k * d)))
        return _row_sq_norms(y, xp, ws)

    def n_quadratic(self, n_features):
        return n_features * (n_features + 1) // 2

    def quadratic_features(self, xt, out, xp):
        # Rows x_a x_b, b >= a, in np.triu_indices order.
        kernels.quadratic_features_full(xt, out, xp)

    def expansion(self, prec_chol, means_c):
        k, d = means_c.shape
        prec = np.broadcast_to(self.precisions(prec_chol), (k, d, d))
        rows, cols = np.triu_indices(d)
        # Off-diagonal terms appear twice in x^T P x.
        coef = prec[:, rows, cols] * np.where(rows == cols, 1.0, 2.0)
        return coef, np.einsum("kab,kb->ka", prec, means_c)

    def from_quadratic(self, q):
        d = int(round((math.sqrt(8 * q.shape[0] + 1) - 1) / 2))
        return _unpack_symmetric(q.T, d)

    def estimate(self, nk, b, s2, reg_covar):
        cov = s2 / nk[:, None, None] - b[:, :, None] * b[:, None, :]
        return _add_to_diagonal(_symmetrize(cov), reg_covar)

    def precision_cholesky(self, covariances):
        return _upper_factor_of_inverse(covariances, _component)

    def cholesky_from_precisions(self, precisions):
        return _upper_factor(precisions)

    def precisions(self, prec_chol):
        return prec_chol @ np.swapaxes(prec_chol, -1, -2)

    def covariances_from_precisions(self, precisions):
        return np.linalg.inv(precisions)

    def dense(self, covariances, n_components, n_features):
        return np.asarray(covariances, dtype=np.float64)

    def apply_precision(self, precisions, vectors):
        return np.einsum("kab,kb->ka", precisions, vectors)

    def sandwich(self, precisions, s):
        return precisions @ s @ precisions

    def scatter_counts(self, nk, n_features):
        return nk[:, None, None]


class Tied(Full):
    name, tied = "tied", True

    def shape(self, n_components, n_features):
        return (n_features, n_features)

    def n_parameters(self, n_components, n_features):
        return n_features * (n_features + 1) // 2

    def log_det(self, prec_chol, n_features):
        return float(np.sum(np.log(np.diagonal(prec_chol))))

    def mahalanobis(self, xc, means_c, prec_chol, xp, ws=None):
        ws = ws or Workspace()
        n, d = xc.shape
        k = means_c.shape[0]
        u = ws.asarray(prec_chol, xp)
        # Direct form ||U^T (x - mu_k)||^2 in whitened coordinates: no cancellation.
        y = ws.take("nkd", (n, k, d), xp)
        xp.subtract((xc @ u)[:, None, :], (ws.asarray(means_c, xp) @ u)[None, :, :], out=y)
        return _row_sq_norms(y, xp, ws)

    def from_quadratic(self, q):
        return super().from_quadratic(np.sum(q, axis=1, keepdims=True))[0]

    def estimate(self, nk, b, s2, reg_covar):
        cov = (s2 - (nk[:, None] * b).T @ b) / np.sum(nk)
        return _add_to_diagonal(_symmetrize(cov), reg_covar)

    def precision_cholesky(self, covariances):
        return _upper_factor_of_inverse(covariances, _shared)

    def apply_precision(self, precisions, vectors):
        return vectors @ precisions

    def scatter_counts(self, nk, n_features):
        return np.sum(nk)

    def dense(self, covariances, n_components, n_features):
        return np.broadcast_to(covariances, (n_components, n_features, n_features)).copy()


class Diag(_Covariance):
    name, tied, matrix = "diag", False, False

    def shape(self, n_components, n_features):
        return (n_components, n_features)

    def n_parameters(self, n_components, n_features):
        return n_components * n_features

    def log_det(self, prec_chol, n_features):
        return np.sum(np.log(prec_chol), axis=-1)

    def per_coordinate(self, values, n_components, n_features):
        """Values stored in the structure's shape (variances, precisions) as one per component
        and coordinate, shape (K, D) (a read-only broadcast)."""
        return np.broadcast_to(values, (n_components, n_features))

    def _precision_rows(self, prec_chol, n_components, n_features):
        """Per-component precision diagonals, shape (K, D)."""
        return self.per_coordinate(prec_chol**2, n_components, n_features)

    def mahalanobis(self, xc, means_c, prec_chol, xp, ws=None):
        ws = ws or Workspace()
        n, d = xc.shape
        k = means_c.shape[0]
        sd = ws.asarray(np.sqrt(self._precision_rows(np.asarray(prec_chol), k, d)), xp)
        y = ws.take("nkd", (n, k, d), xp)
        xp.subtract(xc[:, None, :], ws.asarray(means_c, xp)[None, :, :], out=y)
        y *= sd[None, :, :]
        return _row_sq_norms(y, xp, ws)

    def n_quadratic(self, n_features):
        return n_features

    def quadratic_features(self, xt, out, xp):
        xp.multiply(xt, xt, out=out)

    def expansion(self, prec_chol, means_c):
        p = self._precision_rows(prec_chol, *means_c.shape)
        return p, p * means_c

    def from_quadratic(self, q):
        return q.T

    def estimate(self, nk, b, s2, reg_covar):
        return s2 / nk[:, None] - b * b + reg_covar

    def precision_cholesky(self, covariances):
        _check_positive(covariances, _component)
        return 1.0 / np.sqrt(covariances)

    def cholesky_from_precisions(self, precisions):
        return np.sqrt(precisions)

    def precisions(self, prec_chol):
        return prec_chol**2

    def covariances_from_precisions(self, precisions):
        return 1.0 / precisions

    def dense(self, covariances, n_components, n_features):
        rows = np.broadcast_to(covariances, (n_components, n_features))
        return rows[:, :, None] * np.eye(n_features)

    def apply_precision(self, precisions, vectors):
        return self.per_coordinate(precisions, *vectors.shape) * vectors

    def sandwich(self, precisions, s):
        return precisions * precisions * s

    def scatter_counts(self, nk, n_features):
        return nk[:, None]


class Spherical(Diag):
    name, tied = "spherical", False

    def shape(self, n_components, n_features):
        return (n_components,)

    def n_parameters(self, n_components, n_features):
        return n_components

    def log_det(self, prec_chol, n_features):
        return n_features * np.log(prec_chol)

    def per_coordinate(self, values, n_components, n_features):
        return np.broadcast_to(np.reshape(values, (-1, 1)), (n_components, n_features))

    def n_quadratic(self, n_features):
        return 1

    def quadratic_features(self, xt, out, xp):
        xp.sum(xp.square(xt), axis=0, out=out[0])

    def expansion(self, prec_chol, means_c):
        p = self._precision_rows(prec_chol, *means_c.shape)
        return p[:, :1], p * means_c

    def from_quadratic(self, q):
        return q[0]

    def estimate(self, nk, b, s2, reg_covar):
        return (s2 / nk - np.sum(b * b, axis=1)) / b.shape[1] + reg_covar

    def dense(self, covariances, n_components, n_features):
        var = np.broadcast_to(covariances, (n_components,))
        return var[:, None, None] * np.eye(n_features)

    def scatter_counts(self, nk, n_features):
        return n_features * nk


class TiedDiag(Diag):
    name, tied = "tied_diag", True

    def shape(self, n_components, n_features):
        return (n_features,)

    def n_parameters(self, n_components, n_features):
        return n_features

    def log_det(self, prec_chol, n_features):
        return float(np.sum(np.log(prec_chol)))

    def from_quadratic(self, q):
        return np.sum(q, axis=1)

    def estimate(self, nk, b, s2, reg_covar):
        return (s2 - np.sum(nk[:, None] * b * b, axis=0)) / np.sum(nk) + reg_covar

    def precision_cholesky(self, covariances):
        _check_positive(covariances, _shared)
        return 1.0 / np.sqrt(covariances)

    def scatter_counts(self, nk, n_features):
        return np.sum(nk)


class TiedSpherical(Spherical):
    name, tied = "tied_spherical", True

    def shape(self, n_components, n_features):
        return ()

    def n_parameters(self, n_components, n_features):
        return 1

    def log_det(self, prec_chol, n_features):
        return float(n_features * np.log(prec_chol))

    def from_quadratic(self, q):
        return np.sum(q)

    def estimate(self, nk, b, s2, reg_covar):
        d = b.shape[1]
        return np.asarray((s2 - np.sum(nk * np.sum(b * b, axis=1))) / (np.sum(nk) * d) + reg_covar)

    def precision_cholesky(self, covariances):
        _check_positive(covariances, _shared)
        return 1.0 / np.sqrt(covariances)

    def scatter_counts(self, nk, n_features):
        return n_features * np.sum(nk)


#: The table of covariance structures, by name. ``tied_full`` is an alias of ``tied``.
COVARIANCE_TYPES: dict[str, _Covariance] = {
    c.name: c for c in (Full(), Tied(), Diag(), Spherical(), TiedDiag(), TiedSpherical())
}
_ALIASES = {"tied_full": "tied"}


def get_covariance(name: str) -> _Covariance:
    """The covariance structure called ``name`` (``tied_full`` is accepted for ``tied``)."""
    try:
        return COVARIANCE_TYPES[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in [*COVARIANCE_TYPES, *_ALIASES])
        raise ValueError(f"Unknown covariance_type {name!r}; valid options are {valid}.") from None
