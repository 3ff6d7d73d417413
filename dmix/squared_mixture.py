"""Squared Gaussian mixtures (real, possibly negative weights) as an estimator over the engine
(the family is :mod:`dmix.families.squared`, trained by :mod:`dmix.families.gradient`)."""

from __future__ import annotations

import numpy as np

from dmix._gradient import GradientMixin
from dmix._mixture import BaseMixture, fill_doc
from dmix.engine import init as _init
from dmix.errors import DataError, InvalidParameterError
from dmix.families.gaussian import Gaussian
from dmix.families.squared import COVARIANCE_TYPES, SquaredGaussian
from dmix.rng import keyed_uniform

__all__ = ["SquaredGaussianMixture"]

#: ``keyed_uniform`` stream of the 'nested' initialisation's jitter.
_NESTED_STREAM = 0x5EED_0003


@fill_doc(gradient=True)
class SquaredGaussianMixture(GradientMixin, BaseMixture):
    """Squared Gaussian mixture: ``p(x) = (sum_i w_i N(x; mu_i, Sigma_i))^2 / Z`` with real
    weights of any sign, fitted by streamed gradients.

    Negative weights subtract mass, so few components fit shapes that Gaussian mixtures need
    many for (a ring with its hole: see ``notebooks/``). ``Z`` is exact (Gaussian product
    integrals); each step reads the data once, sums the gradient of the log-likelihood over
    the rows on the workers and takes an optimizer step on the driver (Loconte et al.,
    "Subtractive Mixture Models via Squaring", ICLR 2024).

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'diag'}, default='full'
    reg_covar : float, default=1e-6
        Floor added to every variance: ``Sigma = L L^T + reg_covar I`` with ``L`` free.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data', 'nested'}, \
default='kmeans'
        The first four start from the Gaussian mixture start of the same name, turned into a
        squared mixture with about the same density (``Sigma = 2 Sigma_GMM``, positive
        weights). 'nested' centres every component on the data mean (jittered), with
        covariances the data covariance times ``1, 1/2, 1/4, ...`` and weights of alternating
        sign ``1, -1, 1, ...``: differences of Gaussians, the start that finds holes.
    weights_init, means_init, covariances_init : array-like, optional
        User-given initial parameters (weights of any sign; covariances of the
        ``covariance_type``'s shape); the others come from ``init_params``.
    on_collapse : {'reseed', 'raise'}, default='reseed'
        What happens to a component whose parameters become non-finite: re-seeded (its
        optimizer state reset) at the rows the model explains worst, with a
        :class:`~dmix.errors.CollapseWarning` and a count in ``n_reseeded_``; or an error.
{gradient_parameters}
{engine_parameters}
    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
        Real weights (any sign; ``p`` does not change when all are scaled together).
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        (n_components, n_features, n_features) for 'full', (n_components, n_features) for
        'diag'.
    precisions_cholesky_ : ndarray
        As :class:`dmix.GaussianMixture`'s.
    log_normalizer_ : float
        ``log Z``.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_reseeded_, n_features_in_ : as
        GaussianMixture's; ``lower_bound_`` is the objective the fit stopped on (the held-out
        mean log-likelihood with ``validation_fraction > 0``).

    Notes
    -----
    ``predict_proba`` gives each component's share of the envelope ``sum_i |w_i| N_i(x)``:
    components of a squared mixture cancel each other, so no posterior over them exists.
    ``sample`` is exact, by rejection from the envelope's square (a mixture of ``K^2``
    Gaussians). E-steps compute in float64 whatever ``dtype`` says (components cancel, which
    float32 cannot resolve); ``dtype='float32'`` only halves the blocks' copies to a GPU.
    """

    _init_methods = ("kmeans", "k-means++", "random", "random_from_data", "nested")
    # Options of the other estimators that gradient training does not have.
    annealing = False
    annealing_start = 1.0
    annealing_iter = None
    var_regularization = 0.0

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-4,
        reg_covar=1e-6,
        max_iter=300,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        covariances_init=None,
        optimizer="adam",
        learning_rate=0.05,
        learning_rate_schedule="constant",
        batch_fraction=1.0,
        validation_fraction=0.0,
        n_iter_no_change=10,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        chunk_size=None,
        client=None,
        split_every=None,
        persist="auto",
        device="cpu",
        dtype=None,
        checkpoint=None,
        checkpoint_every=1,
        checkpoint_keep=3,
        stopping_criterion="tol",
        on_collapse="reseed",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.covariances_init = covariances_init
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.learning_rate_schedule = learning_rate_schedule
        self.batch_fraction = batch_fraction
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size
        self.client = client
        self.split_every = split_every
        self.persist = persist
        self.device = device
        self.dtype = dtype
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_keep = checkpoint_keep
        self.stopping_criterion = stopping_criterion
        self.on_collapse = on_collapse

    # -- validation -------------------------------------------------------------------------

    def _check_family_parameters(self):
        name = type(self).__name__
        for option, choices in (("covariance_type", COVARIANCE_TYPES),
                                ("on_collapse", ("reseed", "raise"))):
            if getattr(self, option) not in choices:
                raise InvalidParameterError(
                    f"The {option!r} parameter of {name} must be one of {list(choices)}. Got "
                    f"{getattr(self, option)!r} instead.")
        self._check_gradient_options()

    def _criterion(self):
        return self._gradient_criterion()

    # -- the family -------------------------------------------------------------------------

    @property
    def _family(self) -> SquaredGaussian:
        return SquaredGaussian(covariance_type=self.covariance_type,
                               reg_covar=float(self.reg_covar), on_collapse=self.on_collapse,
                               **self._gradient_fields())

    def _seeded_family(self, family, seed):
        return self._gradient_seeded(family, seed)

    def _user_init(self, family, n_features):
        user = {}
        k, d = self.n_components, n_features
        shapes = {"weights": (k,), "means": (k, d),
                  "covariances": (k, d, d) if family.full else (k, d)}
        for key, shape in shapes.items():
            value = getattr(self, f"{key}_init")
            if value is None:
                continue
            value = np.array(value, dtype=np.float64)
            if value.shape != shape:
                raise DataError(f"The parameter '{key}_init' should have the shape {shape}, "
                                f"but got {value.shape}.")
            if not np.all(np.isfinite(value)):
                raise DataError(f"'{key}_init' contains NaN or infinity.")
            user[key] = value
        if "weights" in user and not np.any(user["weights"]):
            raise DataError("'weights_init' must have a non-zero entry (p = f^2 / Z needs "
                            "Z > 0).")
        if "covariances" in user:
            dense = user["covariances"] if family.full else user["covariances"][..., None]
            if family.full and (np.any(np.linalg.eigvalsh(dense) <= 0)
                                or not np.allclose(dense, np.swapaxes(dense, 1, 2))):
                raise DataError("'covariances_init' must be symmetric positive definite.")
            if np.any(np.diagonal(dense, axis1=1, axis2=2) <= self.reg_covar):
                raise DataError("Every variance of 'covariances_init' must exceed reg_covar "
                                f"= {self.reg_covar!r}.")
        return user

    def _initializer(self, family, init_data, user, seed, do_init, passes):
        def initialize(restart):
            if not do_init:
                return self._params
            if len(user) == 3:
                return family.make_params(user["weights"], user["means"],
                                          user["covariances"])
            start = self._initial_params(family, init_data, seed=seed, restart=restart,
                                         passes=passes)
            return family.make_params(*(user.get(k, start[k])
                                        for k in ("weights", "means", "covariances")))

        return initialize

    def _initial_params(self, family, data, *, seed, restart, passes):
        k, d = self.n_components, data.shape[1] - (1 if family.weighted else 0)
        data = data[:, :d]
        diag = self.covariance_type == "diag"
        if self.init_params in ("nested", "k-means++", "random_from_data"):
            _, mean, cov = _init.data_moments(data, split_every=passes["split_every"],
                                              client=passes["client"])
            cov = cov + self.reg_covar * np.eye(d)
        if self.init_params == "nested":
            jitter = keyed_uniform(seed, _NESTED_STREAM + restart, np.arange(k), d) - 0.5
            means = mean + 0.2 * jitter * np.sqrt(np.diag(cov))
            covariances = 0.5 ** np.arange(k)[:, None, None] * cov
            if diag:
                covariances = np.diagonal(covariances, axis1=1, axis2=2).copy()
            return {"weights": (-1.0) ** np.arange(k), "means": means,
                    "covariances": covariances}
        gaussian = Gaussian(covariance_type=self.covariance_type,
                            reg_covar=float(self.reg_covar))
        start = _init.initial_params(gaussian, data, k, self.init_params, seed=seed,
                                     restart=restart, **passes)
        covariances = start["covariances"]
        if self.init_params in ("k-means++", "random_from_data"):
            # Seeded at single rows, whose covariance is reg_covar (EM's first step fixes
            # that, a gradient step would not): the data covariance, shared out.
            covariances = np.broadcast_to(np.diag(cov) if diag else cov,
                                          (k,) + covariances.shape[1:]) / k ** (2.0 / d)
            start = {**start, "weights": np.full(k, 1.0 / k)}
        # N(x; mu, S)^2 = N(x; mu, S / 2) / sqrt(det(4 pi S)): squaring halves the spread, so
        # Sigma = 2 S, and w_i^2 / sqrt(det(4 pi Sigma_i)) proportional to pi_i gives about
        # the Gaussian start's density where the components do not overlap.
        covariances = 2.0 * covariances
        dense = covariances[..., None] * np.eye(d) if diag else covariances
        log_det = np.linalg.slogdet(4 * np.pi * dense)[1]
        weights = np.sqrt(start["weights"]) * np.exp(0.25 * (log_det - np.mean(log_det)))
        return {"weights": weights, "means": start["means"], "covariances": covariances}

    # -- fitted attributes ------------------------------------------------------------------

    def _param_keys(self, family):
        return ("weights", "means", "covariances", "precisions_cholesky", "log_normalizer")

    def _check_loaded_params(self, family, params, where):
        k, d = np.shape(params["means"]) if np.ndim(params["means"]) == 2 else (None, None)
        cov = (k, d, d) if family.full else (k, d)
        expected = {"weights": (k,), "means": (k, d), "covariances": cov,
                    "precisions_cholesky": cov, "log_normalizer": ()}
        wrong = {key: np.shape(params[key]) for key, shape in expected.items()
                 if k is None or np.shape(params[key]) != shape}
        if wrong:
            raise DataError(f"The model at {where!r} is inconsistent: parameter shapes {wrong} "
                            f"do not fit {k} components of {d} features.")

    def _set_params(self, family, params):
        self.weights_ = params["weights"]
        self.means_ = params["means"]
        self.covariances_ = params["covariances"]
        self.precisions_cholesky_ = params["precisions_cholesky"]
        self.log_normalizer_ = float(params["log_normalizer"])

    @property
    def _params(self):
        return {"weights": self.weights_, "means": self.means_,
                "covariances": self.covariances_,
                "precisions_cholesky": self.precisions_cholesky_,
                "log_normalizer": np.float64(self.log_normalizer_)}
