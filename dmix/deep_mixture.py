"""Deep Gaussian mixtures and Gaussian mixture networks as estimators over the engine.

The families are in :mod:`dmix.families.deep`; these classes add the engine's options, the
layer-wise initialisation on the cluster (:mod:`dmix.engine.deep_init`) and the fitted
attributes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dmix._mixture import BaseMixture, fill_doc
from dmix.engine.deep_init import deep_initial_params
from dmix.errors import InvalidParameterError
from dmix.families import deep as _deep

__all__ = ["DeepGaussianMixture", "GaussianMixtureNetwork"]


@fill_doc(annealing_start="0.5")
class DeepGaussianMixture(BaseMixture):
    """Deep Gaussian mixture model (Viroli and McLachlan), fitted by exact or stochastic EM,
    streamed.

    Layers of mixtures of factor analysers: ``z^(l-1) = eta_j + Lambda_j z^(l) + u`` with
    component ``j`` of layer ``l`` drawn with probability ``pi^(l)_j``, ``z^(0)`` the data and
    ``z^(h)`` standard normal. Marginally a Gaussian mixture over the ``prod(layer_sizes)``
    paths through the layers; the clusters are the components of the first layer. EM is exact
    (shared/notes/model-math.md section 3.3), deterministic and never lowers the likelihood.

    Parameters
    ----------
    layer_sizes : tuple of int, default=(2, 1)
        Components per layer; the first is the number of clusters (``n_components``). At most
        512 paths (their product).
    layer_dims : tuple of int, optional
        Latent dimension of each layer, non-increasing and below the number of features.
        Default: ``D - 1`` for the first layer, halved for each next one (at least 1).
    reg_covar : float, default=1e-6
        Added to every noise variance.
    init_params : {'kmeans', 'random'}, default='kmeans'
        Layer by layer: cluster the layer's input (k-means on the cluster, or random labels),
        fit a factor analyser per cluster, and pass the factor scores to the next layer.
    fit_method : {'exact', 'stochastic'}, default='exact'
        'exact': EM from per-path statistics (model-math section 3.3). 'stochastic': the
        paper's stochastic EM (section 3.2): every row's path and latents are drawn from their
        posterior, keyed by ``(random_state, iteration, row, layer)``, so a fit does not depend
        on the chunking or the cluster and resumes exactly; with ``sample_weight`` each row
        draws once and its draw counts its weight. See Notes on stopping it.
{engine_parameters}
    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
        Cluster probabilities (of the first layer's components).
    means_ : ndarray of shape (n_components, n_features)
        Cluster means.
    params_ : dict of ndarray
        Every layer's parameters, keys as in :mod:`dmix.families.deep`.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_ : as GaussianMixture's

    Notes
    -----
    Annealing here is plain tempering of the path responsibilities, so its default start is
    0.5, not 0.1: the Gaussian family's shrinking kernel has no counterpart yet, and tempered
    factor analysers merge as tempered Gaussians do. On standardized wine (``layer_sizes=(3,
    1)``, ``layer_dims=(3, 2)``, 10 seeds) annealing from 0.1 ended every run merged (ARI 0.35
    to 0.66), from 0.5 with a better best bound than plain EM (-12.278 against -12.300 per
    row) and the same ARIs (0.89 to 0.98).

    With ``fit_method='stochastic'`` the parameters do not converge to a point but fluctuate
    around it (the draws are redone every iteration), and so does the lower bound: the
    default ``stopping_criterion='tol'`` may stop early, at an iteration where the noise
    happened to cancel, or never (noise above ``tol``: the fit runs to ``max_iter`` and warns).
    Prefer a fixed budget (``tol=0``, ``max_iter`` of a few tens: on standardized wine the
    bound is stationary after about 20 iterations, its iteration-to-iteration changes then
    0.004 to 0.01 per row in standard deviation and 0.03 in range over 20 iterations), or a
    ``tol`` (or ``stopping_criterion='relative'`` tolerance) well above that noise, which
    stops at the first calm iteration once the transient is over, not at a fixed point.
    The fitted parameters are those of the last iteration, as in ``deepgmm``.
    """

    _family_class = _deep.DeepGaussian

    def __init__(
        self,
        layer_sizes=(2, 1),
        layer_dims=None,
        *,
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
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
        var_regularization=0.0,
        annealing=False,
        annealing_start=0.5,
        annealing_iter=None,
        stopping_criterion="tol",
        fit_method="exact",
    ):
        self.layer_sizes = layer_sizes
        self.layer_dims = layer_dims
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
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
        self.var_regularization = var_regularization
        self.annealing = annealing
        self.annealing_start = annealing_start
        self.annealing_iter = annealing_iter
        self.stopping_criterion = stopping_criterion
        self.fit_method = fit_method

    @property
    def n_components(self) -> int:
        """The number of clusters, ``layer_sizes[0]``."""
        try:
            return int(tuple(self.layer_sizes)[0])
        except (TypeError, IndexError, ValueError):
            raise InvalidParameterError(
                f"The 'layer_sizes' parameter of {type(self).__name__} must be a non-empty "
                f"tuple of ints. Got {self.layer_sizes!r} instead.") from None

    def _resolved_dims(self, n_features: int) -> tuple:
        if self.layer_dims is not None:
            return tuple(self.layer_dims)
        dims, r = [], max(1, n_features - 1)
        for _ in tuple(self.layer_sizes):
            dims.append(r)
            r = max(1, r // 2)
        return tuple(dims)

    def _check_family_parameters(self):
        if self.init_params not in ("kmeans", "random"):
            raise InvalidParameterError(
                f"The 'init_params' parameter of {type(self).__name__} must be 'kmeans' or "
                f"'random'. Got {self.init_params!r} instead.")
        if self.fit_method not in ("exact", "stochastic"):
            raise InvalidParameterError(
                f"The 'fit_method' parameter of {type(self).__name__} must be 'exact' or "
                f"'stochastic'. Got {self.fit_method!r} instead.")
        self._family_for(self._resolved_dims(10**6))  # layer errors before any pass

    def _family_for(self, layer_dims):
        return self._family_class(
            layer_sizes=tuple(self.layer_sizes), layer_dims=tuple(layer_dims),
            reg_covar=float(self.reg_covar), var_regularization=float(self.var_regularization),
            annealing_start=float(self.annealing_start) if self.annealing else 1.0,
            annealing_iter=int(self._annealing_iter()), fit_method=self.fit_method)

    def _seeded_family(self, family, seed: int):
        # The seed of the stochastic draws; the spec (checkpoint, saved model) keeps the
        # default 0, the fit's seed being recorded with the checkpoint's options.
        if family.fit_method == "stochastic":
            return replace(family, random_state=int(seed) % 2**63)
        return family

    @property
    def _family(self):
        n_features = getattr(self, "n_features_in_", None)
        if n_features is None:  # before a fit: a family to validate the options with
            return self._family_for(self._resolved_dims(10**6))
        return self._family_for(self._resolved_dims(n_features))

    def _before_fit(self, data, n_features, passes):
        self.n_features_in_ = n_features  # layer_dims default from it (as scikit-learn, set
        self._family.check_n_features(n_features)  # at the start of fit)

    def _initial_params(self, family, data, *, seed, restart, passes):
        return deep_initial_params(family, data, self.init_params, seed=seed, restart=restart,
                                   **passes)

    def _param_keys(self, family):
        return tuple(sorted(family.param_shapes(self.n_features_in_)))

    def _params_n_features(self, params):
        return int(np.shape(params["layer0/intercepts"])[1])

    def _check_loaded_params(self, family, params, where):
        from dmix.errors import DataError

        d = self._params_n_features(params)
        shapes = family.param_shapes(d)
        wrong = {k: v.shape for k, v in params.items() if v.shape != shapes[k]}
        if wrong:
            raise DataError(f"The model at {where!r} is inconsistent: parameter shapes {wrong} "
                            f"are not those of its layers, {shapes}.")

    def _set_params(self, family, params):
        self.params_ = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        self.weights_, self.means_ = family.cluster_moments(self.params_)[:2]

    @property
    def _params(self):
        return self.params_


@fill_doc(annealing_start="0.5")
class GaussianMixtureNetwork(DeepGaussianMixture):
    """Gaussian mixture network (after Dmytruk), fitted by exact or stochastic EM, streamed.

    A deep Gaussian mixture whose component probabilities are conditional on the component
    chosen in the next (deeper) layer: ``P(s_l = j | s_{l+1} = i) = tau^(l)_{j|i}``, the
    deepest layer unconditional. With every column of ``tau`` equal it is a
    :class:`DeepGaussianMixture`.

    Parameters
    ----------
    layer_sizes : tuple of int, default=(2, 1)
        Components per layer; the first is the number of clusters (``n_components``).
    layer_dims : tuple of int, optional
        Latent dimension of each layer, non-increasing and below the number of features.
    reg_covar : float, default=1e-6
    init_params : {'kmeans', 'random'}, default='kmeans'
    fit_method : {'exact', 'stochastic'}, default='exact'
        As :class:`DeepGaussianMixture`'s.
{engine_parameters}
    Attributes
    ----------
    weights_, means_, params_ : as :class:`DeepGaussianMixture`'s
    """

    _family_class = _deep.GaussianNetwork
