"""What every mixture estimator does the same way, whatever its family: validating the engine
options, ``fit`` on the streaming engine (restarts, checkpoints, clusters, devices), inference
per row block, information criteria, sampling and saving.

A concrete estimator (:class:`dmix.GaussianMixture`, :class:`dmix.SkewNormalMixture`, ...)
declares its constructor (scikit-learn's convention: every parameter stored as given) and
fills in the family hooks: ``_family``, ``_initial_params``, ``_set_params`` and ``_params``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import fields, replace

import numpy as np

from dmix._checkpointing import CheckpointMixin
from dmix._estimator_base import ParamsMixin, VerboseMonitor, check_number
from dmix._gradient import GRADIENT_PARAMETERS
from dmix.engine import init as _init
from dmix.engine.grid import fit_restarts
from dmix.engine.loop import Monitor, apply_batched, estep_pass, fit_em
from dmix.engine.reduce import (
    block_bytes_for,
    check_device_everywhere,
    map_blocks,
    place_data,
    place_on_device,
    resolve_client,
    worker_slots,
)
from dmix.engine.stopping import get_criterion
from dmix.errors import DataError, InvalidParameterError, NotFittedError
from dmix.io.source import as_source, check_visible_to_workers, with_weights
from dmix.rng import seed_sequence_int
from dmix.xp import Compute

__all__ = ["ENGINE_PARAMETERS", "BaseMixture", "fill_doc"]

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")

#: The numpydoc entries of the options every estimator shares; ``fill_doc`` puts them in place
#: of ``{engine_parameters}`` in a class docstring.
ENGINE_PARAMETERS = """\
    tol : float, default=1e-3
        EM stops when the mean log-likelihood changes by less than this (with the default
        ``stopping_criterion``).
    max_iter : int, default=100
        Number of EM iterations per initialisation.
    n_init : int, default=1
        Number of initialisations, fitted side by side in one pass per iteration; the one
        with the best final lower bound is kept.
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
        store every iteration (False); 'auto' persists when they take at most half of the
        workers' memory.
    device : {'cpu', 'cuda'}, default='cpu'
        Where the E-step runs (see :class:`dmix.GaussianMixture`).
    dtype : {'float32', 'float64'}, optional
        Precision of the E-step arithmetic; statistics are summed in float64 either way.
    checkpoint : str or os.PathLike, optional
        Directory (local path or fsspec URL) where a checkpoint is written every
        ``checkpoint_every`` iterations, keeping the last ``checkpoint_keep``.
    checkpoint_every, checkpoint_keep : int, default=1, 3
    var_regularization : float, default=0.0
        Added to the diagonal of every covariance after the M-step (the ``mixes`` package's
        option).
    annealing : bool, default=False
        Deterministic annealing: tempered responsibilities ``softmax(nu l)`` with ``nu``
        rising geometrically from ``annealing_start`` to 1 at iteration ``annealing_iter``
        (default ``max_iter // 2``); see the family's documentation for what else the hot
        phase holds fixed. Convergence is tested from the second iteration at ``nu = 1`` on.
    annealing_start : float in (0, 1], default={annealing_start}
        The first inverse temperature.
    annealing_iter : int, optional
    stopping_criterion : str or callable, default='tol'
        'tol', 'relative', 'aitken', a built-in of :mod:`dmix.engine.stopping`, or any
        callable ``criterion(history) -> bool``.

"""


#: The entries that differ for estimators trained by gradients (no EM options).
_GRADIENT_TOL = """\
    tol : float, default=1e-4
        With the default ``stopping_criterion``, the fit stops when the objective (the mean
        log-likelihood, of the held-out rows if any) has not risen by more than ``tol`` in
        ``n_iter_no_change`` steps.
    max_iter : int, default=300
        Number of optimizer steps (passes over the data) per initialisation.
"""
_GRADIENT_STOPPING = """\
    stopping_criterion : str or callable, default='tol'
        'tol': the patience rule above (:class:`dmix.engine.stopping.NoImprovement`); or any
        criterion of :mod:`dmix.engine.stopping` or callable ``criterion(history) -> bool``.

"""


def fill_doc(annealing_start: str = "0.1", gradient: bool = False):
    """Class decorator: the shared parameter entries in place of ``{engine_parameters}``
    (those of gradient training with ``gradient=True``: no EM-only options)."""

    def fill(cls):
        text = ENGINE_PARAMETERS.replace("{annealing_start}", annealing_start)
        if gradient:
            text = (_GRADIENT_TOL + text[text.index("    n_init :"):
                                         text.index("    var_regularization :")]
                    + _GRADIENT_STOPPING)
        cls.__doc__ = cls.__doc__.replace("{engine_parameters}\n", text).replace(
            "{gradient_parameters}\n", GRADIENT_PARAMETERS)
        return cls

    return fill


class BaseMixture(CheckpointMixin, ParamsMixin):
    """The estimator machinery over :mod:`dmix.engine` (see the module docstring)."""

    #: The fitted attribute whose presence means "fitted".
    _fitted_attribute = "weights_"
    #: ``missing`` for estimators without the option.
    missing = "raise"
    #: The valid ``init_params``.
    _init_methods = INIT_METHODS

    # -- hooks of the concrete estimators -----------------------------------------------------

    @property
    def _family(self):
        """The family of this estimator's options."""
        raise NotImplementedError

    def _initial_params(self, family, data, *, seed: int, restart: int, passes: dict):
        """Initial parameters of restart ``restart`` from passes over ``data``."""
        raise NotImplementedError

    def _set_params(self, family, params) -> None:
        """Set the fitted parameter attributes from the engine's ``params``."""
        raise NotImplementedError

    @property
    def _params(self) -> dict:
        """The engine's ``params`` from the fitted attributes."""
        raise NotImplementedError

    def _param_keys(self, family) -> tuple[str, ...]:
        """The keys of the engine's ``params`` (what a saved model stores)."""
        raise NotImplementedError

    def _params_n_features(self, params: dict) -> int:
        """The number of features ``params`` are for."""
        return int(np.shape(params["means"])[-1])

    def _check_family_parameters(self) -> None:
        """Validate the family's own options (raise InvalidParameterError)."""

    def _check_loaded_params(self, family, params: dict, where: str) -> None:
        """Check the shapes of ``params`` read from a saved model (raise DataError)."""

    def _seeded_family(self, family, seed: int):
        """The family the E-steps run with, given the fit's seed (after the checkpoint has
        recorded ``family``'s spec): a family whose E-step draws random numbers takes it."""
        return family

    # -- validation -------------------------------------------------------------------------

    def _annealing_iter(self) -> int:
        if not self.annealing:
            return 0
        return (self.annealing_iter if self.annealing_iter is not None
                else max(1, self.max_iter // 2))

    def _check_parameters(self):
        name = type(self).__name__
        check_number(name, "n_components", self.n_components, "int", 1)
        check_number(name, "tol", self.tol, "float", 0)
        check_number(name, "reg_covar", self.reg_covar, "float", 0)
        check_number(name, "max_iter", self.max_iter, "int", 0)
        check_number(name, "n_init", self.n_init, "int", 1)
        check_number(name, "verbose", self.verbose, "int", 0)
        check_number(name, "verbose_interval", self.verbose_interval, "int", 1)
        check_number(name, "var_regularization", self.var_regularization, "float", 0)
        if self.split_every is not None:
            check_number(name, "split_every", self.split_every, "int", 2)
        if self.persist not in ("auto", True, False):
            raise InvalidParameterError(
                f"The 'persist' parameter of {name} must be 'auto', True or False. "
                f"Got {self.persist!r} instead.")
        try:
            Compute.from_options(self.device, self.dtype)
        except ValueError as exc:
            raise InvalidParameterError(f"Invalid 'device' or 'dtype' of {name}: {exc}") from None
        if self.init_params not in self._init_methods:
            raise InvalidParameterError(
                f"The 'init_params' parameter of {name} must be a str among "
                f"{sorted(self._init_methods)}. Got {self.init_params!r} instead.")
        if self.annealing not in (False, True):
            raise InvalidParameterError(
                f"The 'annealing' parameter of {name} must be one of [False, True]. Got "
                f"{self.annealing!r} instead.")
        if self.annealing:
            start = self.annealing_start
            if isinstance(start, bool) or not isinstance(start, numbers.Real) or not (
                0 < start <= 1
            ):
                raise InvalidParameterError(
                    f"The 'annealing_start' parameter of {name} must be a float in (0, 1]. Got "
                    f"{start!r} instead.")
            if self.annealing_iter is not None:
                check_number(name, "annealing_iter", self.annealing_iter, "int", 1)
        self._check_family_parameters()
        self._criterion()  # raises on an unknown criterion

    def _criterion(self):
        """The stopping criterion of the options."""
        return get_criterion(self.stopping_criterion)

    def _check_is_fitted(self):
        if not hasattr(self, self._fitted_attribute):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator.")

    def _source(self, X, fitting=False, client=None):
        source = as_source(X, chunk_size=self.chunk_size, block_bytes=block_bytes_for(client),
                           slots=worker_slots(client))
        n_samples, n_features = source.shape
        if fitting:
            if n_samples < self.n_components:
                raise DataError(
                    f"Expected n_samples >= n_components but got n_components = "
                    f"{self.n_components}, n_samples = {n_samples}")
        elif n_features != self.n_features_in_:
            raise DataError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input.")
        return source

    @property
    def _compute(self) -> Compute:
        return Compute.from_options(self.device, self.dtype)

    @property
    def _scoring_family(self):
        """The family for predictions and scores: soft responsibilities, untempered."""
        family = self._family
        names = {f.name for f in fields(family)}
        changes = {k: v for k, v in (("cem", False), ("annealing_iter", 0),
                                     ("fit_method", "exact"), ("batch_fraction", 1.0),
                                     ("validation_fraction", 0.0)) if k in names}
        return replace(family, **changes)

    # -- fitting ----------------------------------------------------------------------------

    def _prepare_data(self, X, sample_weight, client):
        """``(source, data, init_data, passes, compute)`` of a fit: the validated input, the
        placed data (with the weights as a last column), what initialisation reads, the
        options of every pass, and the E-step's device and precision."""
        source = self._source(X, fitting=True, client=client)
        array = source.array
        if sample_weight is not None:
            if self.missing == "marginalize":
                raise InvalidParameterError(
                    f"{type(self).__name__}: sample_weight with missing='marginalize' is not "
                    "supported; drop the weights or the rows with missing values.")
            array = with_weights(source, sample_weight, client=client)
        check_visible_to_workers(X, client)
        compute = self._compute
        check_device_everywhere(compute, client)
        data = place_data(array, client, in_memory=source.in_memory, persist=self.persist)
        passes = dict(source=source.description, split_every=self.split_every, client=client)
        init_data = data if sample_weight is None else data[:, : source.shape[1]]
        if self.missing == "marginalize":
            init_data = _init.impute_missing(init_data, split_every=self.split_every,
                                             client=client)
        return source, data, init_data, passes, compute

    def _before_fit(self, data, n_features: int, passes: dict) -> None:
        """Options resolved from the data before the family is built (MAP priors)."""

    def _user_init(self, family, n_features: int) -> dict:
        """User-given initial parameters, validated (none by default)."""
        return {}

    def _initializer(self, family, init_data, user, seed, do_init, passes):
        """``initialize(restart) -> params`` (randomness keyed by ``seed`` and ``restart``)."""

        def initialize(restart):
            if not do_init:
                return self._params
            return self._initial_params(family, init_data, seed=seed, restart=restart,
                                        passes=passes)

        return initialize

    def fit(self, X, y=None, *, sample_weight=None, resume: bool = False, checkpoint=None,
            monitor: Monitor | None = None):
        """Estimate the parameters with EM.

        Parameters
        ----------
        X : array-like, dask array, zarr array, or path/URL of a Zarr array
            Data of shape (n_samples, n_features).
        y : ignored
        sample_weight : array-like, dask array, zarr array or path/URL, optional
            Non-negative weight of each row, shape (n_samples,): EM maximises
            ``sum_i w_i log p(x_i)`` (integer weights fit as repeated rows would), and
            ``lower_bound_`` is the weighted mean. Initialisation ignores the weights.
        resume : bool, default=False
            Continue from the latest checkpoint in ``checkpoint`` if there is one (else start
            afresh). The result is the one an uninterrupted fit gives. Without ``resume``, a
            ``checkpoint`` directory must hold no checkpoints.
        checkpoint : str or os.PathLike, optional
            The checkpoint directory of this call, in place of the ``checkpoint`` parameter
            (``fit(X, checkpoint=DIR, resume=True)``).
        monitor : dmix.engine.Monitor, optional
            Receives a record per iteration (the CLI prints them); replaces the ``verbose``
            messages.

        Returns
        -------
        self

        Raises
        ------
        CheckpointMismatchError
            If ``resume`` finds a checkpoint written for other data or incompatible options.
        """
        self._check_parameters()
        if sample_weight is not None and "weighted" not in {f.name for f in fields(self._family)}:
            raise InvalidParameterError(
                f"{type(self).__name__} does not take sample_weight: fit it without weights "
                "(or repeat rows to weight them).")
        # An unwritable directory fails before anything runs.
        ckpt = self._checkpoint_dir(self.checkpoint if checkpoint is None else checkpoint)
        client = resolve_client(self.client)
        source, data, init_data, passes, compute = self._prepare_data(X, sample_weight, client)
        n_features = source.shape[1]
        self._before_fit(data, n_features, passes)
        family = self._family
        user = self._user_init(family, n_features)
        monitor = monitor or VerboseMonitor(self.verbose, self.verbose_interval)

        do_init = not (self.warm_start and hasattr(self, "converged_"))
        n_init = self.n_init if do_init else 1
        seed = seed_sequence_int(self.random_state)
        loaded = None
        if ckpt is not None:
            loaded, seed = self._open_checkpoint(ckpt, resume, X, source, data, family, user,
                                                 seed, n_init, client)
            if loaded is not None:
                monitor.resumed(ckpt.url, loaded.name, loaded.snapshot.restart,
                                loaded.snapshot.run.n_iter)
        initialize = self._initializer(family, init_data, user, seed, do_init, passes)
        if sample_weight is not None:
            family = replace(family, weighted=True)
        family = self._seeded_family(family, seed)
        tic = time.perf_counter()
        # Initialisation reads ``data`` on the CPU; the E-steps read the blocks on the device.
        em_data = place_on_device(data, client, compute, persist=self.persist)
        options = dict(n_init=n_init, max_iter=self.max_iter, tol=self.tol,
                       lower_bound=-math.inf if do_init else self.lower_bound_,
                       monitor=monitor, compute=compute,
                       stop=self._criterion(), **passes)
        snapshot = None if loaded is None else loaded.snapshot
        with _watch(client, monitor, estimator=self, source=source, n_init=n_init,
                    checkpoint=ckpt) as watched:
            options["monitor"] = watched
            # The restarts side by side, one pass per iteration for all; a checkpoint of
            # restarts run one after the other (an older dmix) is continued that way.
            if n_init > 1 and (snapshot is None or snapshot.runs is not None):
                result = fit_restarts(family, em_data, initialize, checkpoint=ckpt,
                                      resume=snapshot, **options)
            else:
                result = fit_em(family, em_data, initialize, checkpoint=ckpt, resume=snapshot,
                                **options)
            self._set_result(family, result, n_features)
        self.fit_seconds_ = time.perf_counter() - tic
        if ckpt is not None:
            self.checkpoints_ = list(ckpt.saved)
        return self

    def _set_result(self, family, result, n_features: int) -> None:
        self._set_params(family, result.params)
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.lower_bound_ = result.lower_bound
        self.lower_bounds_ = list(result.lower_bounds)
        self.n_reseeded_ = result.n_reseeded
        self.n_features_in_ = n_features

    def fit_predict(self, X, y=None):
        """Fit, then return the component of every row (consistent with ``predict``)."""
        return self.fit(X).predict(X)

    # -- inference --------------------------------------------------------------------------

    def _per_row(self, X, method: str, out_columns):
        """Apply a family method per row block: eagerly for NumPy input, lazily otherwise."""
        self._check_is_fitted()
        source = self._source(X)
        family = self._scoring_family
        fn = getattr(family, method)
        compute = self._compute
        if source.local is not None:
            check_device_everywhere(compute, None)
            return apply_batched(source.local, fn, family, self._params, self.n_components,
                                 source=source.description, compute=compute)
        return map_blocks(source.array, _apply_batched, fn, family, self._params,
                          self.n_components, source.description, compute,
                          out_columns=out_columns, dtype=np.float64,
                          label=method.replace("_", ""))

    def score_samples(self, X):
        """Log-likelihood of each row, shape (n_samples,)."""
        return self._per_row(X, "log_density", None)

    def predict_proba(self, X):
        """Posterior probability of each component for each row, shape (n_samples, K)."""
        return self._per_row(X, "predict_proba", self.n_components)

    def predict(self, X):
        """Most probable component of each row, shape (n_samples,)."""
        return self.predict_proba(X).argmax(axis=1)

    def score(self, X, y=None):
        """Mean log-likelihood of the rows (one streamed pass for out-of-core input)."""
        self._check_is_fitted()
        client = resolve_client(self.client)
        source = self._source(X, client=client)
        compute = self._compute
        check_device_everywhere(compute, client)
        stats = estep_pass(self._scoring_family, source.array, self._params,
                           source=source.description,
                           split_every=self.split_every, client=client, compute=compute)
        return float(stats["loglik"] / stats["n"])

    def _n_parameters(self) -> int:
        return self._family.n_parameters(self._params)

    def bic(self, X):
        """Bayesian information criterion: ``-2 log L + p log N`` (lower is better)."""
        n = as_source(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X):
        """Akaike information criterion: ``-2 log L + 2 p`` (lower is better)."""
        n = as_source(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()

    def _sample_rng(self, n_samples) -> np.random.Generator:
        self._check_is_fitted()
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or (
            n_samples < 1
        ):
            raise InvalidParameterError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least "
                "one sample.")
        return np.random.default_rng(seed_sequence_int(self.random_state))

    def sample(self, n_samples=1):
        """Draw ``(X, labels)`` from the fitted model.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        labels : ndarray of shape (n_samples,)
        """
        rng = self._sample_rng(n_samples)
        return self._family.sample(self._params, int(n_samples), rng)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path, *, overwrite=False, storage_options=None):
        """Save the fitted model as a Zarr group (see :func:`dmix.io.model.save_model`);
        :func:`dmix.load` reads it back."""
        from dmix.io.model import save_model

        save_model(self, path, overwrite=overwrite, storage_options=storage_options)


def _watch(client, monitor, **fit):
    """:func:`dmix.dashboard.watch` with a distributed client (the fit feeds the ``/dmix``
    page of its dashboard); without one, ``monitor`` as it is."""
    if client is None:
        return contextlib.nullcontext(monitor)
    from dmix.dashboard import watch

    return watch(client, monitor, **fit)


def _apply_batched(x, fn, family, params, n_components, source, compute, *, start, index):
    return apply_batched(x, fn, family, params, n_components, start=start, index=index,
                         source=source, compute=compute)
