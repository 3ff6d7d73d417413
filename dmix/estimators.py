"""scikit-learn style estimators over the engine.

:class:`GaussianMixture` takes scikit-learn's constructor parameters with the same defaults and
meaning, plus ``chunk_size``, ``client``, ``split_every``, ``persist``, ``device`` and ``dtype``. NumPy input gives NumPy output;
Dask, Zarr and path inputs are streamed and array results come back as lazy Dask arrays.
"""

from __future__ import annotations

from dmix._checkpointing import resume
from dmix._estimator_base import UserInitMixin
from dmix._fitting import FitMixin
from dmix._gradient import GradientMixin
from dmix._mixture import BaseMixture, fill_doc
from dmix.engine import init as _init
from dmix.engine.loop import estep_pass
from dmix.engine.stopping import get_criterion
from dmix.errors import DataError, InvalidParameterError
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.gaussian import Gaussian
from dmix.families.gaussian_gradient import GaussianGradient

__all__ = ["GaussianMixture", "resume"]

#: The options of ``fit_method='gradient'`` and their defaults (EM rejects other values).
GRADIENT_DEFAULTS = {"optimizer": "adam", "learning_rate": 0.05,
                     "learning_rate_schedule": "constant", "batch_fraction": 1.0,
                     "validation_fraction": 0.0, "n_iter_no_change": 10}
#: Options of EM that gradient training does not have, with their off values.
EM_ONLY = {"cem": False, "annealing": False, "missing": "raise"}


@fill_doc()
class GaussianMixture(FitMixin, UserInitMixin, GradientMixin, BaseMixture):
    """Gaussian mixture fitted by EM (or by gradient ascent), streamed over row blocks.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components.
    covariance_type : {'full', 'tied', 'diag', 'spherical', 'tied_diag', 'tied_spherical'}, \
default='full'
        Structure of the covariances (``'tied_full'`` is an alias of ``'tied'``).
    tol : float, default=1e-3
        EM stops when the mean log-likelihood changes by less than this.
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance estimate.
    max_iter : int, default=100
        Number of EM iterations per initialisation.
    n_init : int, default=1
        Number of initialisations; the one with the best final lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        How responsibilities are initialised (k-means|| seeding and Lloyd iterations on the
        cluster for 'kmeans').
    weights_init, means_init, precisions_init : array-like, optional
        User-provided initial parameters; each overrides what ``init_params`` gives.
    random_state : int, RandomState instance or None, default=None
        Seed of every random choice; the result does not depend on the chunking.
    warm_start : bool, default=False
        Start each ``fit`` from the previous solution (then ``n_init`` is 1).
    verbose : int, default=0
        1 prints per initialisation, 2 also per ``verbose_interval`` iterations.
    verbose_interval : int, default=10
        Iterations between messages at ``verbose >= 2``.
    chunk_size : int, optional
        Rows per block. Default: the input's own chunks (Dask), a multiple of the stored chunks
        (Zarr), or about 32 MiB (NumPy).
    client : distributed.Client, optional
        Cluster to run on. Default: the current default client, else Dask's local scheduler.
    split_every : int, optional
        Fan-in of the reduction tree (default 16).
    persist : {'auto', True, False}, default='auto'
        Keep the data in cluster memory between iterations (True) or stream them from their
        store every iteration (False). 'auto' persists when they take at most half of the
        workers' memory limits (of free memory without a cluster), and streams otherwise.
        With ``device='cuda'`` on a cluster, the E-step's blocks also stay in GPU memory when
        they take at most half of it (dask-cuda spills them to host memory past its device
        memory limit); otherwise they are copied to the GPUs every pass.
    device : {'cpu', 'cuda'}, default='cpu'
        Where the E-step runs. 'cuda': every task copies its block to its worker's GPU (one
        worker per GPU, as dask-cuda starts them), computes there with CuPy, and returns NumPy
        statistics; the client and the scheduler need no GPU. Initialisation passes and the
        M-step run on the CPU.
    dtype : {'float32', 'float64'}, optional
        Precision of the E-step arithmetic; statistics are summed in float64 either way.
        Default: float32 on 'cuda', float64 on 'cpu'.
    checkpoint : str or os.PathLike, optional
        Directory (local path or fsspec URL) where a checkpoint is written every
        ``checkpoint_every`` iterations, keeping the last ``checkpoint_keep``.
    weight_concentration_prior : float or array of shape (n_components,), optional
        Dirichlet prior ``alpha`` on the weights: the M-step gives the posterior mode (MAP).
    mean_prior, mean_precision_prior : array of shape (n_features,), float, optional
        Normal prior ``mu_k | Sigma_k ~ N(mean_prior, Sigma_k / mean_precision_prior)`` on the
        means. Setting either turns it on; the other defaults from the data.
    covariance_prior, degrees_of_freedom_prior : array, float, optional
        Inverse-Wishart prior (inverse-gamma for the diagonal and spherical types) on the
        covariances; with the mean prior, Normal-inverse-Wishart. Setting either turns it on;
        defaults in :func:`dmix.families.priors.resolve_prior`. ``lower_bound_`` is then the
        mean log-posterior.
    var_regularization : float, default=0.0
        Added to the diagonal of every covariance after the M-step (the ``mixes`` package's
        option; here the same as adding it to ``reg_covar``).
    cem : bool, default=False
        Classification EM: hard assignments to the most probable component;
        ``lower_bound_`` is then the mean classification log-likelihood.
    annealing : bool, default=False
        Deterministic annealing, a remedy for bad local optima. While annealing, the
        responsibilities are ``softmax_k(nu log(w_k N(x | mu_k, S)))`` with one kernel
        covariance ``S = annealing_start * C`` for every component (``C`` the covariance of
        the data), so the E-step's covariance ``S / nu`` shrinks from ``C`` to ``S`` and the
        components split as it passes each cluster's scale; the covariances are estimated
        once ``nu`` reaches 1. ``nu`` rises geometrically from ``annealing_start`` at the
        first iteration to 1 at iteration ``annealing_iter`` (0-based):
        ``nu_t = annealing_start ** (1 - t / annealing_iter)``, then plain EM. ``annealing_iter``
        must be below ``max_iter`` for the fit to end with plain EM. Convergence is tested
        from the second iteration at ``nu = 1`` on; ``lower_bound_`` and the recorded bounds
        are always the untempered mean log-likelihood. Measured with
        ``init_params='random_from_data'``, full covariances, 20 seeds, runs reaching the best
        log-likelihood, plain EM vs annealing from 0.1: three 2-D clusters in a row with a
        small fourth 6 vs 19; six 5-D clusters of sizes 400 to 40, 3 vs 16; four 2-D clusters
        13 vs 14. Not with ``cem`` or ``missing='marginalize'``.
    annealing_start : float in (0, 1], default=0.1
        The first inverse temperature, and the ratio of the kernel to the data's covariance:
        about the ratio of a cluster's spread to the whole data's. Smaller values resolve
        closer clusters and need more iterations. From 0.01 to 0.2 the counts above changed
        little (row: 17 to 19; 5-D: 13 to 16).
    annealing_iter : int, optional
        Iterations of the schedule; default ``max(1, max_iter // 2)``.
    stopping_criterion : str or callable, default='tol'
        When a run has converged: 'tol' (the change of the mean log-likelihood below ``tol``),
        'relative', 'aitken', a built-in of :mod:`dmix.engine.stopping`, or any callable
        ``criterion(history) -> bool`` (see there).
    on_collapse : {'reseed', 'raise'}, default='reseed'
        A component that empties or whose covariance is singular is re-seeded at the rows the
        model explains worst (with a :class:`~dmix.errors.CollapseWarning`; counted in
        ``n_reseeded_``), or stops the fit with an error naming it. With
        ``fit_method='gradient'``: a component whose parameters become non-finite (its
        optimizer state is reset).
    missing : {'raise', 'marginalize'}, default='raise'
        Rows with missing values (NaN): an error naming them, or the exact EM for incomplete
        data, missing at random (:mod:`dmix.families.missing`: the missing features are
        marginalised; initialisation imputes column means). Not with ``cem``, ``annealing``
        or ``sample_weight``.
    fit_method : {'em', 'gradient'}, default='em'
        EM, or gradient ascent on the mean log-likelihood from the same E-step statistics
        (:class:`dmix.families.gaussian_gradient.GaussianGradient`): each step reads the data
        once and takes an optimizer step in free coordinates (softmax logits, means, Cholesky
        factors or log-variances above ``reg_covar``). For stochastic steps over chunk subsets
        and early stopping on held-out rows. Not with the MAP priors, ``cem``, ``annealing``
        or ``missing='marginalize'``. ``max_iter`` counts optimizer steps; the default
        ``stopping_criterion`` 'tol' stops when the objective has not risen by ``tol`` in
        ``n_iter_no_change`` steps. Starts from 'k-means++' and 'random_from_data' (a point
        per component, no scatter) take one EM step first.
{gradient_parameters}

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_, precisions_, precisions_cholesky_ : ndarray
        Shapes by covariance type: full (K, D, D), tied (D, D), diag (K, D), spherical (K,),
        tied_diag (D,), tied_spherical ().
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the best run's last E-step.
    lower_bounds_ : list of float
        The lower bound at every iteration of the best run.
    n_reseeded_ : int
        Components of the best run re-seeded after collapsing.
    n_features_in_ : int
    """

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
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
        weight_concentration_prior=None,
        mean_prior=None,
        mean_precision_prior=None,
        covariance_prior=None,
        degrees_of_freedom_prior=None,
        var_regularization=0.0,
        cem=False,
        annealing=False,
        annealing_start=0.1,
        annealing_iter=None,
        stopping_criterion="tol",
        on_collapse="reseed",
        missing="raise",
        fit_method="em",
        optimizer="adam",
        learning_rate=0.05,
        learning_rate_schedule="constant",
        batch_fraction=1.0,
        validation_fraction=0.0,
        n_iter_no_change=10,
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
        self.precisions_init = precisions_init
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
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_prior = mean_prior
        self.mean_precision_prior = mean_precision_prior
        self.covariance_prior = covariance_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.var_regularization = var_regularization
        self.cem = cem
        self.annealing = annealing
        self.annealing_start = annealing_start
        self.annealing_iter = annealing_iter
        self.stopping_criterion = stopping_criterion
        self.on_collapse = on_collapse
        self.missing = missing
        self.fit_method = fit_method
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.learning_rate_schedule = learning_rate_schedule
        self.batch_fraction = batch_fraction
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change

    # -- validation -------------------------------------------------------------------------

    def _check_family_parameters(self):
        name = type(self).__name__
        options = [*COVARIANCE_TYPES, "tied_full"]
        if self.covariance_type not in options:
            raise InvalidParameterError(
                f"The 'covariance_type' parameter of {name} must be a str among "
                f"{sorted(options)}. Got {self.covariance_type!r} instead."
            )
        for option, choices in (("on_collapse", ("reseed", "raise")),
                                ("missing", ("raise", "marginalize")),
                                ("cem", (False, True))):
            if getattr(self, option) not in choices:
                raise InvalidParameterError(
                    f"The {option!r} parameter of {name} must be one of {list(choices)}. Got "
                    f"{getattr(self, option)!r} instead.")
        if self.annealing and self.cem:
            raise InvalidParameterError(
                f"{name}: annealing=True has no effect with cem=True (hard assignments do "
                "not depend on the temperature); choose one.")
        if self.missing == "marginalize" and (self.cem or self.annealing):
            raise InvalidParameterError(
                f"{name}: missing='marginalize' works with plain EM and MAP estimation, not "
                "with cem or annealing.")
        if self.fit_method not in ("em", "gradient"):
            raise InvalidParameterError(
                f"The 'fit_method' parameter of {name} must be one of ['em', 'gradient']. Got "
                f"{self.fit_method!r} instead.")
        if self.fit_method == "gradient":
            self._check_gradient_parameters()
        else:
            changed = [k for k, v in GRADIENT_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise InvalidParameterError(
                    f"{name}: {changed} are options of fit_method='gradient'; with "
                    "fit_method='em' leave them at their defaults.")

    def _check_gradient_parameters(self):
        name = type(self).__name__
        em_only = [f"{k}={getattr(self, k)!r}" for k, off in EM_ONLY.items()
                   if getattr(self, k) != off]
        em_only += [f"{k}=..." for k, v in self._prior_options().items() if v is not None]
        if em_only:
            raise InvalidParameterError(
                f"{name}: {', '.join(em_only)} belong to EM; fit_method='gradient' does not "
                "have them (use fit_method='em', or drop them).")
        self._check_gradient_options()

    def _criterion(self):
        """EM: the named criterion. Gradient fits: 'tol' is the patience rule, no rise of the
        objective by ``tol`` in ``n_iter_no_change`` steps."""
        if self.fit_method == "gradient":
            return self._gradient_criterion()
        return get_criterion(self.stopping_criterion)

    # -- the family ----------------------------------------------------------------------

    @property
    def _family(self) -> Gaussian:
        """The family of this estimator's options (its prior as resolved by the last fit)."""
        if self.fit_method == "gradient":
            return GaussianGradient(
                covariance_type=get_covariance(self.covariance_type).name,
                reg_covar=float(self.reg_covar),
                var_regularization=float(self.var_regularization),
                on_collapse=self.on_collapse, **self._gradient_fields())
        annealing_iter = self._annealing_iter()
        return Gaussian(covariance_type=get_covariance(self.covariance_type).name,
                        reg_covar=float(self.reg_covar),
                        var_regularization=float(self.var_regularization),
                        prior=getattr(self, "prior_", None), cem=bool(self.cem),
                        annealing_start=float(self.annealing_start) if self.annealing else 1.0,
                        annealing_iter=int(annealing_iter), on_collapse=self.on_collapse,
                        missing=self.missing)

    def _seeded_family(self, family, seed):
        # Gradient fits key the held-out rows and chunk subsets by the seed (recorded with
        # the checkpoint's options, not in the family's spec).
        if isinstance(family, GaussianGradient):
            return self._gradient_seeded(family, seed)
        return family

    def _before_fit(self, data, n_features, passes):
        self.prior_ = self._resolve_prior(data, n_features, passes)

    def _initializer(self, family, init_data, user, seed, do_init, passes):
        initialize = super()._initializer(family, init_data, user, seed, do_init, passes)
        if not isinstance(family, GaussianGradient):
            return initialize
        # A seed-based start (a point per component, covariance reg_covar) is at the edge of
        # the free coordinates and far from any optimum: one EM step from it, as EM's first.
        em_step = do_init and not user and self.init_params in ("k-means++",
                                                                 "random_from_data")
        em = Gaussian(covariance_type=family.covariance_type, reg_covar=family.reg_covar,
                      var_regularization=family.var_regularization)

        def start(restart):
            params = initialize(restart)
            if em_step:
                stats = estep_pass(em, init_data, params, source=passes["source"],
                                   split_every=passes["split_every"], client=passes["client"])
                params, _ = em.mstep(params, stats, {})
            return family.start(params)

        return start

    def _user_init(self, family, n_features):
        return self._check_user_init(family, n_features)

    def _initial_params(self, family, data, *, seed, restart, passes):
        return _init.initial_params(family, data, self.n_components, self.init_params,
                                    seed=seed, restart=restart, **passes)

    def _set_params(self, family: Gaussian, params):
        cov = family.covariance
        self.weights_ = params["weights"]
        self.means_ = params["means"]
        self.covariances_ = params["covariances"]
        self.precisions_cholesky_ = params["precisions_cholesky"]
        self.precisions_ = cov.precisions(params["precisions_cholesky"])

    def _param_keys(self, family):
        return ("weights", "means", "covariances", "precisions_cholesky")

    def _check_loaded_params(self, family, params, where):
        k, d = params["means"].shape if params["means"].ndim == 2 else (None, None)
        shape = None if k is None else family.covariance.shape(k, d)
        if (k is None or params["weights"].shape != (k,) or params["covariances"].shape != shape
                or params["precisions_cholesky"].shape != shape):
            raise DataError(
                f"The model at {where!r} is inconsistent: parameter shapes "
                f"{ {p: v.shape for p, v in params.items()} } do not fit the "
                f"{family.covariance_type!r} covariance type.")

    @property
    def _params(self):
        return {
            "weights": self.weights_,
            "means": self.means_,
            "covariances": self.covariances_,
            "precisions_cholesky": self.precisions_cholesky_,
        }

    def sample(self, n_samples=1, *, component=None, confidence=None, std_range=None):
        """Draw ``(X, labels)`` from the fitted model, rows grouped by component.

        Parameters
        ----------
        n_samples : int, default=1
        component : int or sequence of int, optional
            Draw from this component only (or from these, in proportion to their weights).
        confidence : float in (0, 1), optional
            Draw each row from its component restricted to the region holding this much of its
            mass: squared Mahalanobis radius at most the chi-square quantile (exact, by the
            inverse CDF of the radius; model-math.md section 6.2).
        std_range : (float, float), optional
            Draw each row with its Mahalanobis radius in ``[a, b]`` (``b`` may be inf), exactly,
            also far in the tails.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        labels : ndarray of shape (n_samples,)
        """
        rng = self._sample_rng(n_samples)
        return self._family.sample(self._params, int(n_samples), rng, component=component,
                                   confidence=confidence, std_range=std_range)

    # -- scikit-learn ------------------------------------------------------------------------

    def to_sklearn(self):
        """The equivalent fitted ``sklearn.mixture.GaussianMixture`` (see :mod:`dmix.convert`)."""
        from dmix.convert import to_sklearn

        return to_sklearn(self)

    @classmethod
    def from_sklearn(cls, estimator, **params):
        """A fitted dmix model from a fitted ``sklearn.mixture.GaussianMixture``; ``params``
        set dmix's own options (see :func:`dmix.convert.from_sklearn`)."""
        from dmix.convert import from_sklearn

        return from_sklearn(estimator, **params)

