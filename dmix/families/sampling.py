"""Exact sampling from a Gaussian mixture, optionally inside a confidence region or a band.

A component draw is ``x = mu_k + L_k R v`` with ``L_k L_k^T = Sigma_k``, ``v = g / |g|`` uniform
on the unit sphere (``g ~ N(0, I_D)``) and ``R^2 = (x - mu)^T Sigma^{-1} (x - mu) ~ chi^2_D``
independent of ``v`` (shared/notes/model-math.md section 6.2). Restricting the radius is exact by
the inverse CDF of ``R^2``, with ``F`` the chi-square CDF and ``U ~ U(0, 1)``:

* confidence region of level ``alpha`` (``R^2 <= F^{-1}(alpha)``): ``R^2 = F^{-1}(U alpha)``;
* band ``a <= R <= b``: ``R^2 = F^{-1}(F(a^2) + U (F(b^2) - F(a^2)))``.

``F(r^2) = P(D/2, r^2/2)``, the regularized lower incomplete gamma function, and ``1 - F = Q``.
Each draw inverts whichever of ``P`` and ``Q`` is below 1/2 at its target, so no target rounds
to 1; where a band lies so far in a tail that ``P`` (or ``Q``) underflows (``D = 2, a = 40``:
``Q = e^{-800}``), the target is inverted in log space by Newton's method on ``log P``
(series) or ``log Q`` (continued fraction). Every component puts the same mass inside its own
region, so components are drawn from the weights with no reweighting.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from dmix.errors import InvalidParameterError
from dmix.families.covariance import Diag, Spherical

__all__ = ["sample_mixture"]

#: Below this tail mass the band's tail is inverted in log space instead of by SciPy (whose
#: inverses stay accurate to about 1e-300, and a target can be ``2**-53`` times the tail mass).
_LOG_SPACE_BELOW = 1e-200
_EPS = np.finfo(np.float64).eps


# -- validation ---------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_n_samples(n_samples) -> int:
    if not _is_int(n_samples) or n_samples < 1:
        raise InvalidParameterError(
            f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least one "
            "sample.")
    return int(n_samples)


def _check_component(component, n_components: int):
    """None, or the selected components as an int array (distinct, in [0, K))."""
    if component is None:
        return None
    allowed = (f"It must be None, an int in [0, {n_components}) or a non-empty sequence of "
               "distinct such ints.")
    bad = InvalidParameterError(f"Invalid value for 'component': {component!r}. {allowed}")
    if _is_int(component):
        sel = np.array([int(component)])
    else:
        if isinstance(component, str | bytes):
            raise bad
        try:
            items = list(component)
        except TypeError:
            raise bad from None
        if not items or not all(_is_int(c) for c in items):
            raise bad
        sel = np.array([int(c) for c in items])
    if np.any(sel < 0) or np.any(sel >= n_components) or len(np.unique(sel)) != len(sel):
        raise bad
    return sel


def _check_confidence(confidence) -> float:
    if not (_is_real(confidence) and 0.0 < float(confidence) < 1.0):  # NaN fails too
        raise InvalidParameterError(
            f"Invalid value for 'confidence': {confidence!r}. It must be None or a float in the "
            "open interval (0, 1).")
    return float(confidence)


def _check_std_range(std_range) -> tuple[float, float]:
    bad = InvalidParameterError(
        f"Invalid value for 'std_range': {std_range!r}. It must be None or a pair (a, b) of "
        "Mahalanobis radii with 0 <= a < b (b may be inf).")
    try:
        a, b = std_range
    except (TypeError, ValueError):
        raise bad from None
    if not (_is_real(a) and _is_real(b)):
        raise bad
    a, b = float(a), float(b)
    if not (0.0 <= a < b) or math.isnan(b):  # NaN fails the comparisons
        raise bad
    return a, b


# -- the chi-square radius ------------------------------------------------------------------------


def _log_q(s: float, x: np.ndarray):
    """``log Q(s, x)`` and ``h`` with ``Q = e^{-x} x^s h / Gamma(s)``, for ``x > s + 1``.

    Modified Lentz evaluation of the continued fraction of ``Q`` (Numerical Recipes ``gcf``);
    ``d log Q / dx = -1 / (x h)``.
    """
    from scipy.special import gammaln

    tiny = 1e-300
    b = x + 1.0 - s
    c = np.full_like(x, 1.0 / tiny)
    d = 1.0 / b
    h = d.copy()
    for i in range(1, 10_000):
        an = -i * (i - s)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = b + an / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) <= _EPS):
            break
    return -x + s * np.log(x) - gammaln(s) + np.log(h), h


def _log_p(s: float, x: np.ndarray):
    """``log P(s, x)`` and ``S`` with ``P = e^{-x} x^s S / Gamma(s)``, for ``x < s + 1``.

    Power series ``S = sum_n x^n / (s (s+1) ... (s+n))`` (Numerical Recipes ``gser``);
    ``d log P / d log x = x^s e^{-x} / (Gamma(s) P) = 1 / S``.
    """
    from scipy.special import gammaln

    term = np.full_like(x, 1.0 / s)
    total = term.copy()
    for n in range(1, 10_000):
        term = term * x / (s + n)
        total = total + term
        if np.all(term <= total * _EPS):
            break
    return -x + s * np.log(x) - gammaln(s) + np.log(total), total


def _invert_upper(s: float, target: np.ndarray, x0: float, x1: float) -> np.ndarray:
    """Solve ``log Q(s, x) = target`` for x in [x0, x1], Newton from ``x0`` (far upper tail).

    ``log Q`` is monotone and concave (``s >= 1``) or convex (``s < 1``), so Newton's iterates
    converge monotonically once on the far side of the root; ``x_{n+1} = x_n + (log Q - t) x h``.
    """
    x = np.full_like(target, x0)
    for _ in range(200):
        lq, h = _log_q(s, x)
        step = np.where(np.isfinite(target), (lq - target) * x * h, 0.0)
        x = np.maximum(x + step, x0)
        if np.all(np.abs(step) <= 4 * _EPS * x):
            break
    return np.clip(x, x0, x1)


def _invert_lower(s: float, target: np.ndarray, x0: float, x1: float) -> np.ndarray:
    """Solve ``log P(s, x) = target`` for x in [x0, x1], Newton in ``y = log x`` from ``x1``.

    ``d log P / dy = 1 / S`` (:func:`_log_p`), so ``y_{n+1} = y_n + (t - log P) S``; ``log P``
    is increasing and concave in ``y`` (``1 / S`` decreases), so the iterates converge
    monotonically from below after the first step.
    """
    y = np.full_like(target, math.log(x1))
    ok = np.isfinite(target)
    for _ in range(200):
        lp, total = _log_p(s, np.exp(y))
        step = np.where(ok, (target - lp) * total, 0.0)
        y = np.minimum(y + step, math.log(x1))
        if np.all(np.abs(step) <= 4 * _EPS * np.maximum(np.abs(y), 1.0)):
            break
    return np.clip(np.where(ok, np.exp(y), x0), x0, x1)


def _radius_sq(n_features: int, u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``R^2`` for uniforms ``u`` by the inverse CDF of chi^2_D restricted to ``[lo, hi]``.

    ``lo`` and ``hi`` are the bounds of ``R^2``; ``hi = inf`` for no upper bound.
    """
    from scipy.special import gammainc, gammaincc, gammainccinv, gammaincinv

    s = 0.5 * n_features
    xa, xb = 0.5 * lo, 0.5 * hi  # P and Q take x = r^2 / 2
    pa, qa = float(gammainc(s, xa)), float(gammaincc(s, xa))
    pb, qb = float(gammainc(s, xb)), float(gammaincc(s, xb))
    if pb <= 0.5 and pb < _LOG_SPACE_BELOW:  # far lower tail: target P = Pa + U (Pb - Pa), in logs
        lpa = _log_p(s, np.array([xa]))[0][0] if xa > 0 else -np.inf
        lpb = _log_p(s, np.array([xb]))[0][0]
        # log(Pb - (1 - U)(Pb - Pa)) = log Pb + log1p(-(1 - U) (1 - Pa / Pb))
        target = lpb + np.log1p(-(1.0 - u) * -np.expm1(lpa - lpb))
        return 2.0 * _invert_lower(s, target, xa, xb)
    if qa <= 0.5 and qa < _LOG_SPACE_BELOW:  # far upper tail: target Q = Qa - U (Qa - Qb), in logs
        lqa = _log_q(s, np.array([xa]))[0][0]
        lqb = _log_q(s, np.array([xb]))[0][0] if np.isfinite(xb) else -np.inf
        target = lqa + np.log1p(-u * -np.expm1(lqb - lqa))
        return 2.0 * _invert_upper(s, target, xa, xb)
    # Mass of the band, from the side(s) that keep it exact.
    if pb <= 0.5:
        mass = pb - pa
    elif pa >= 0.5:
        mass = qa - qb
    else:
        mass = (0.5 - pa) + (0.5 - qb)
    p = pa + u * mass  # target of F
    q = qb + (1.0 - u) * mass  # the same target of 1 - F, exact where p is near 1
    low = p <= 0.5
    x = np.where(low, gammaincinv(s, np.where(low, p, 0.5)),
                 gammainccinv(s, np.where(low, 0.5, q)))
    return np.clip(2.0 * x, lo, hi)  # clip rounding only


def _radius_sq_confidence(n_features: int, u: np.ndarray, confidence: float) -> np.ndarray:
    """``R^2 = F^{-1}(U alpha)``; targets above 1/2 are inverted as ``1 - F = (1 - alpha) + (1 - U) alpha``."""
    from scipy.special import gammainccinv, gammaincinv

    s = 0.5 * n_features
    p = u * confidence
    q = (1.0 - confidence) + (1.0 - u) * confidence
    low = p <= 0.5
    x = np.where(low, gammaincinv(s, np.where(low, p, 0.5)),
                 gammainccinv(s, np.where(low, 0.5, q)))
    hi = 2.0 * float(gammaincinv(s, confidence)) if confidence <= 0.5 else 2.0 * float(
        gammainccinv(s, 1.0 - confidence))
    return np.clip(2.0 * x, 0.0, hi)


# -- the mixture ----------------------------------------------------------------------------------


def _factors(cov, covariances, n_components: int, n_features: int):
    """``("diag", sd (K, D) view)`` or ``("matrix", L (K or 1, D, D))`` with ``L L^T = Sigma``."""
    covariances = np.asarray(covariances, dtype=np.float64)
    if isinstance(cov, Spherical):
        sd = np.sqrt(np.reshape(covariances, (-1, 1)))
        return "diag", np.broadcast_to(sd, (n_components, n_features))
    if isinstance(cov, Diag):
        return "diag", np.broadcast_to(np.sqrt(covariances), (n_components, n_features))
    if cov.tied:  # one factorisation, shared
        return "matrix", np.linalg.cholesky(covariances)[None]
    return "matrix", np.linalg.cholesky(covariances)


def _directions(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``v = g / |g|``, ``g ~ N(0, I_D)``: uniform on the unit sphere (``g = 0`` redrawn)."""
    g = rng.standard_normal((n, d))
    norm = np.sqrt(np.einsum("ij,ij->i", g, g))
    while np.any(norm == 0.0):  # probability zero; kept so the law is exact
        bad = norm == 0.0
        g[bad] = rng.standard_normal((int(bad.sum()), d))
        norm[bad] = np.sqrt(np.einsum("ij,ij->i", g[bad], g[bad]))
    return g / norm[:, None]


def sample_mixture(cov, params, n_samples, rng, *, component=None, confidence=None,
                   std_range=None):
    """Draw rows from a Gaussian mixture, optionally restricted in Mahalanobis radius.

    Parameters
    ----------
    cov : covariance structure
        The structure object of :mod:`dmix.families.covariance` (``Gaussian.covariance``).
    params : dict
        ``weights`` (K,), ``means`` (K, D) and ``covariances`` shaped as ``cov`` says.
    n_samples : int
        Number of rows, at least 1.
    rng : numpy.random.Generator
        Source of randomness; the same generator state gives the same draw.
    component : int or sequence of int, optional
        None draws the components from the weights. An int in [0, K) draws every row from
        that component; a sequence of distinct ints draws among those components, in
        proportion to their weights.
    confidence : float in (0, 1), optional
        Sample each row from its component restricted to its confidence region
        ``R^2 <= F^{-1}(confidence)`` (``R`` the Mahalanobis distance to the component's mean,
        ``F`` the chi-square CDF with D degrees of freedom).
    std_range : (float, float), optional
        ``(a, b)`` with ``0 <= a < b`` (``b`` may be ``inf``): sample each row from its
        component restricted to the band ``a <= R <= b``. Not together with ``confidence``.

    Returns
    -------
    X : ndarray of shape (n_samples, D), float64
    labels : ndarray of shape (n_samples,), int
        The component of each row. Rows are grouped by component, in increasing order (in the
        order given when ``component`` is a sequence), as scikit-learn does.

    Raises
    ------
    InvalidParameterError
        For an invalid ``n_samples``, ``component``, ``confidence`` or ``std_range``, or both
        ``confidence`` and ``std_range``.

    Notes
    -----
    Without ``confidence`` and ``std_range`` rows are ``mu_k + L_k z``, ``z ~ N(0, I)``. With
    them, ``x = mu_k + L_k R v`` with ``v`` uniform on the sphere and ``R^2`` from the inverse
    CDF of the restricted chi-square law (shared/notes/model-math.md section 6.2), which is
    exact even where the region holds a tiny mass (``D = 50``, ``R <= 1``: 1.2e-33).
    """
    n_samples = _check_n_samples(n_samples)
    if confidence is not None and std_range is not None:
        raise InvalidParameterError(
            f"Invalid values for 'confidence' ({confidence!r}) and 'std_range' ({std_range!r}): "
            "pass at most one of them.")
    if confidence is not None:
        confidence = _check_confidence(confidence)
    if std_range is not None:
        std_range = _check_std_range(std_range)
    means = np.asarray(params["means"], dtype=np.float64)
    k, d = means.shape
    selected = _check_component(component, k)

    if selected is None:
        order = np.arange(k)
        weights = np.asarray(params["weights"], dtype=np.float64)
        counts = rng.multinomial(n_samples, weights / np.sum(weights))
    elif len(selected) == 1:
        order, counts = selected, np.array([n_samples])
    else:
        order = selected
        weights = np.asarray(params["weights"], dtype=np.float64)[selected]
        if not np.sum(weights) > 0:
            raise InvalidParameterError(
                f"Invalid value for 'component': {component!r}. The selected components have "
                "zero total weight.")
        counts = rng.multinomial(n_samples, weights / np.sum(weights))

    kind, factor = _factors(cov, params["covariances"], k, d)
    x = np.empty((n_samples, d))
    labels = np.repeat(order, counts)
    start = 0
    for j, c in zip(order, counts, strict=True):  # one vectorised block per component
        if c == 0:
            continue
        if confidence is None and std_range is None:
            z = rng.standard_normal((c, d))  # plain Gaussian draw: x = mu + L z
        else:
            v = _directions(rng, c, d)
            u = rng.random(c)
            if confidence is not None:
                r2 = _radius_sq_confidence(d, u, confidence)
            else:
                r2 = _radius_sq(d, u, std_range[0] ** 2, std_range[1] ** 2)
            z = np.sqrt(r2)[:, None] * v  # x = mu + L R v
        if kind == "diag":
            x[start : start + c] = means[j] + z * factor[j]
        else:
            x[start : start + c] = means[j] + z @ factor[min(j, len(factor) - 1)].T
        start += c
    return x, labels
