"""Converters between dmix's and scikit-learn's fitted Gaussian mixtures.

scikit-learn's four covariance types (full, tied, diag, spherical) have the same parameters,
shapes and ``precisions_cholesky_`` conventions in both libraries and convert as they are.
dmix's two extra types have exact scikit-learn equivalents:

=============== ============================ =====================================
dmix            scikit-learn                 conversion
=============== ============================ =====================================
tied_diag       tied                         ``np.diag(v)``: a diagonal (D, D) matrix
tied_spherical  spherical                    the variance repeated for the K components
=============== ============================ =====================================

so ``score_samples``, ``predict_proba`` and ``predict`` agree. scikit-learn's ``bic`` and
``aic`` then count the free parameters of its own type (D (D + 1) / 2 for ``tied``, K for
``spherical``), not those of dmix's constrained type. ``from_sklearn(sk,
covariance_type='tied_diag')`` (or ``'tied_spherical'``) converts such a model back, after
checking that its matrices are diagonal (its variances equal).

scikit-learn is an optional dependency: it is imported by these functions only.
"""

from __future__ import annotations

import numpy as np

from dmix.errors import DmixError, InvalidParameterError, NotFittedError
from dmix.families.covariance import get_covariance

__all__ = ["from_sklearn", "to_sklearn"]

#: Constructor parameters scikit-learn's GaussianMixture shares with dmix's.
SHARED_PARAMS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init",
                 "init_params", "weights_init", "means_init", "precisions_init",
                 "random_state", "warm_start", "verbose", "verbose_interval")
#: The scikit-learn type of each dmix covariance type.
SKLEARN_TYPE = {"full": "full", "tied": "tied", "diag": "diag", "spherical": "spherical",
                "tied_diag": "tied", "tied_spherical": "spherical"}


def _sklearn_mixture():
    try:
        from sklearn import mixture
    except ImportError:
        raise ImportError(
            "Converting to or from scikit-learn needs scikit-learn, which is not installed. "
            "Install it with 'pip install scikit-learn'.") from None
    return mixture


def _widen(cov_type: str, value, n_components: int) -> np.ndarray:
    """A dmix tied_diag / tied_spherical array in the shape of its scikit-learn type."""
    value = np.asarray(value, dtype=np.float64)
    if cov_type == "tied_diag":
        return np.diag(value)
    if cov_type == "tied_spherical":
        return np.full(n_components, float(value))
    return value.copy()


def _narrow(cov_type: str, value, name: str) -> np.ndarray:
    """The inverse of :func:`_widen`; refuses a matrix that is not diagonal (variances that
    are not equal), naming the attribute."""
    value = np.asarray(value, dtype=np.float64)
    if cov_type == "tied_diag":
        if value.ndim != 2 or np.count_nonzero(value - np.diag(np.diagonal(value))):
            raise InvalidParameterError(
                f"Cannot convert to covariance_type='tied_diag': the scikit-learn model's "
                f"{name} is not a diagonal matrix.")
        return np.diagonal(value).copy()
    if cov_type == "tied_spherical":
        if value.ndim != 1 or np.any(value != value[0]):
            raise InvalidParameterError(
                f"Cannot convert to covariance_type='tied_spherical': the scikit-learn model's "
                f"{name} are not all equal.")
        return np.asarray(value[0])
    return value.copy()


def to_sklearn(estimator):
    """A fitted :class:`sklearn.mixture.GaussianMixture` equal to a fitted dmix one.

    Parameters
    ----------
    estimator : dmix.GaussianMixture
        A fitted estimator.

    Returns
    -------
    sklearn.mixture.GaussianMixture
        With the shared constructor parameters and ``weights_``, ``means_``, ``covariances_``,
        ``precisions_``, ``precisions_cholesky_``, ``converged_``, ``n_iter_``,
        ``lower_bound_``, ``lower_bounds_`` and ``n_features_in_`` set: its
        ``score_samples``, ``predict_proba`` and ``predict`` give dmix's results. A
        ``tied_diag`` model becomes a ``tied`` one, a ``tied_spherical`` model a ``spherical``
        one (module docstring).

    Raises
    ------
    NotFittedError
        If ``estimator`` is not fitted.
    ImportError
        If scikit-learn is not installed.
    """
    mixture = _sklearn_mixture()
    if not hasattr(estimator, "means_"):
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet: there is nothing to "
            "convert. Call 'fit' before to_sklearn.")
    cov_type = get_covariance(estimator.covariance_type).name
    k = int(estimator.n_components)
    params = {name: getattr(estimator, name) for name in SHARED_PARAMS}
    params["covariance_type"] = SKLEARN_TYPE[cov_type]
    if params["precisions_init"] is not None:
        params["precisions_init"] = _widen(cov_type, params["precisions_init"], k)
    sk = mixture.GaussianMixture(**params)
    sk.weights_ = np.array(estimator.weights_, dtype=np.float64)
    sk.means_ = np.array(estimator.means_, dtype=np.float64)
    sk.covariances_ = _widen(cov_type, estimator.covariances_, k)
    sk.precisions_cholesky_ = _widen(cov_type, estimator.precisions_cholesky_, k)
    sk.precisions_ = _widen(cov_type, estimator.precisions_, k)
    sk.converged_ = bool(estimator.converged_)
    sk.n_iter_ = int(estimator.n_iter_)
    sk.lower_bound_ = float(estimator.lower_bound_)
    sk.lower_bounds_ = [float(v) for v in getattr(estimator, "lower_bounds_", [])]
    sk.n_features_in_ = int(estimator.n_features_in_)
    return sk


def from_sklearn(sk_estimator, **dmix_kwargs):
    """A fitted dmix :class:`~dmix.GaussianMixture` equal to a fitted scikit-learn one.

    Parameters
    ----------
    sk_estimator : sklearn.mixture.GaussianMixture
        A fitted estimator (not a ``BayesianGaussianMixture``: its posterior is another model).
    **dmix_kwargs
        Constructor parameters of the dmix estimator, over those taken from ``sk_estimator``
        (:data:`SHARED_PARAMS`): ``chunk_size``, ``client``, ``device``... ``n_components``
        cannot change. ``covariance_type`` may be ``'tied_diag'`` for a scikit-learn ``tied``
        model whose matrices are diagonal, or ``'tied_spherical'`` for a ``spherical`` one
        whose variances are equal (what :func:`to_sklearn` makes of those types).

    Returns
    -------
    dmix.GaussianMixture
        With the fitted attributes set: ``score_samples``, ``predict_proba`` and ``predict``
        give scikit-learn's results.

    Raises
    ------
    NotFittedError
        If ``sk_estimator`` is not fitted.
    InvalidParameterError
        If ``sk_estimator`` is not a scikit-learn GaussianMixture, or ``dmix_kwargs`` asks for
        another number of components or a covariance type the model cannot be converted to.
    ImportError
        If scikit-learn is not installed.
    """
    mixture = _sklearn_mixture()
    from dmix.estimators import GaussianMixture

    if not isinstance(sk_estimator, mixture.GaussianMixture):
        raise InvalidParameterError(
            "from_sklearn converts a sklearn.mixture.GaussianMixture. Got "
            f"{type(sk_estimator).__name__} instead.")
    missing = [a for a in ("weights_", "means_", "covariances_", "precisions_cholesky_")
               if not hasattr(sk_estimator, a)]
    if missing:
        raise NotFittedError(
            f"This scikit-learn {type(sk_estimator).__name__} is not fitted yet (it has no "
            f"{', '.join(missing)}): there is nothing to convert. Fit it first.")
    settings = {name: getattr(sk_estimator, name) for name in SHARED_PARAMS}
    sk_type = settings["covariance_type"]
    k = int(settings["n_components"])
    if dmix_kwargs.get("n_components", k) != k:
        raise InvalidParameterError(
            f"from_sklearn cannot change n_components: the scikit-learn model has {k}. Got "
            f"n_components={dmix_kwargs['n_components']!r}.")
    try:
        cov_type = get_covariance(dmix_kwargs.get("covariance_type", sk_type)).name
    except ValueError as exc:
        raise InvalidParameterError(str(exc)) from None
    if SKLEARN_TYPE[cov_type] != sk_type:
        allowed = sorted(t for t, s in SKLEARN_TYPE.items() if s == sk_type)
        raise InvalidParameterError(
            f"A scikit-learn model of covariance_type={sk_type!r} cannot be converted to "
            f"covariance_type={cov_type!r}; it can be converted to {allowed}.")
    settings.update(dmix_kwargs)
    settings["covariance_type"] = cov_type
    if settings["precisions_init"] is not None and "precisions_init" not in dmix_kwargs:
        settings["precisions_init"] = _narrow(cov_type, settings["precisions_init"],
                                              "precisions_init")
    estimator = GaussianMixture(**settings)
    params = {
        "weights": np.array(sk_estimator.weights_, dtype=np.float64),
        "means": np.array(sk_estimator.means_, dtype=np.float64),
        "covariances": _narrow(cov_type, sk_estimator.covariances_, "covariances_"),
        "precisions_cholesky": _narrow(cov_type, sk_estimator.precisions_cholesky_,
                                       "precisions_cholesky_"),
    }
    family = estimator._family
    d = params["means"].shape[1]
    if params["covariances"].shape != family.covariance.shape(k, d):
        raise DmixError(
            f"The scikit-learn model's covariances_ have shape {params['covariances'].shape}, "
            f"not {family.covariance.shape(k, d)} as covariance_type={sk_type!r} needs.")
    estimator._set_params(family, params)
    estimator.converged_ = bool(getattr(sk_estimator, "converged_", False))
    estimator.n_iter_ = int(getattr(sk_estimator, "n_iter_", 0))
    lower = float(getattr(sk_estimator, "lower_bound_", -np.inf))
    estimator.lower_bound_ = lower
    estimator.lower_bounds_ = [float(v) for v in getattr(sk_estimator, "lower_bounds_",
                                                         [lower] if np.isfinite(lower) else [])]
    estimator.n_features_in_ = int(getattr(sk_estimator, "n_features_in_", d))
    return estimator
