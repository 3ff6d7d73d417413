"""Deep Gaussian mixtures (Viroli and McLachlan 2019) and Gaussian mixture networks (Dmytruk).

Both stack ``h`` layers of mixtures of factor analysers (shared/notes/model-math.md section 3;
the layer maths is in :mod:`dmix.families._layers`). Marginally the data follow a Gaussian
mixture over the ``P = prod(layer_sizes)`` paths ``s = (s_1, ..., s_h)``::

    p(y) = sum_s pi_s N(y | mu_s, Sigma_s),

with ``mu_s, Sigma_s`` computed top-down along the path (:meth:`DeepGaussian.path_mixture`).
The families differ only in the path weights ``pi_s``: a product of per-layer weights for the
deep Gaussian mixture, a top-down Markov chain
``pi^(h)_{s_h} prod_{l<h} tau^(l)_{s_l | s_{l+1}}`` for the network (section 3.4).

Parameters (flat keys, ``l = 0..h-1`` for layers ``1..h``)::

    layer{l}/weights              (k_l,)               mixing weights (network: deepest only)
    layer{l}/conditional_weights  (k_l, k_{l+1})       network, l < h-1: column i is
                                                       P(s_l | s_{l+1} = i)
    layer{l}/intercepts           (k_l, r_{l-1})       eta
    layer{l}/loadings             (k_l, r_{l-1}, r_l)  Lambda
    layer{l}/noise_variances      (k_l, r_{l-1})       diagonal Psi

E-step: the Gaussian family's (full covariances) over the path mixture, so the log-densities,
the tempering, the non-finite-row handling and the statistics are those of
:class:`~dmix.families.gaussian.Gaussian` with ``K = P``::

    n, loglik, n_nonfinite
    path_nk  (P,)        sum_i gamma_is
    path_s1  (P, D)      sum_i gamma_is (y_i - c)
    path_s2  (P, m)      sum_i gamma_is Q(y_i - c), packed upper triangles (m = D (D + 1) / 2)

about the Gaussian family's shift ``c = sum_s pi_s mu_s``. The M-step turns them into
``T0, T1, T2`` about each path mean and runs the exact EM of section 3.3: every layer
component's factor analyser is a regression of ``z^(l-1)`` on ``z^(l)`` with intercept, from
posterior moments that are affine in the path statistics. EM is deterministic and never
decreases the log-likelihood (with ``reg_covar = var_regularization = 0``).

``fit_method="stochastic"``: the paper's stochastic EM (section 3.2), in
:mod:`dmix.families._sem`: each row's path and latents are drawn from their posterior, keyed
by ``(random_state, iteration, global row index, layer)`` (the family sets
``needs_row_index``, so the engine passes each sub-batch's first row), and the M-step is the
same regression on the drawn data. The statistics are then those of :mod:`~dmix.families._sem`.

Regularisation and the policy for empty components:

* noise variances are floored at :data:`~dmix.families._layers.PSI_FLOOR` times the mean
  variance of the layer's input (still an M-step: EM stays monotone), then ``reg_covar`` is
  added to every layer's noise variances;
* ``var_regularization`` (the ``mixes`` package's option) adds its value to every noise
  variance and raises each singular value ``sigma`` of every loading matrix to
  ``sqrt(sigma^2 + reg)``: ``Lambda Lambda^T`` gains ``reg`` on its column space (``mixes``
  takes the top-``r`` eigen-part of ``Lambda Lambda^T + reg I``, which also discards the
  rotation the deeper layers were fitted in; keeping the singular vectors keeps it);
* a layer component with no responsibility (``W0 <= 1e-12 N``) keeps its previous factor
  analyser; the M-step state's ``empty_components`` counts them per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from dmix.errors import InvalidParameterError
from dmix.families import _layers, _sem
from dmix.families.base import SPEC_OMIT_DEFAULT, Params, State, Stats, tree_add
from dmix.families.covariance import get_covariance
from dmix.families.gaussian import Gaussian, _shift
from dmix.xp import Workspace

__all__ = ["DeepGaussian", "GaussianNetwork"]

_EPS10 = 10 * np.finfo(np.float64).eps
_FULL = get_covariance("full")
#: A layer component whose responsibility sum is at most this fraction of the rows is empty.
EMPTY_FRACTION = 1e-12


def _normalized(counts: np.ndarray, axis: int = 0) -> np.ndarray:
    """``counts + 10 eps`` normalised along ``axis`` (as the Gaussian family's weights)."""
    c = counts + _EPS10
    return c / np.sum(c, axis=axis, keepdims=True)


def _inflate_singular_values(loadings: np.ndarray, reg: float) -> np.ndarray:
    """``U diag(sqrt(sigma^2 + reg)) V^T`` for each ``Lambda = U diag(sigma) V^T``."""
    u, sigma, vt = np.linalg.svd(loadings, full_matrices=False)
    return u @ (np.sqrt(sigma**2 + reg)[..., None] * vt)


@dataclass(frozen=True)
class DeepGaussian:
    """Deep Gaussian mixture model (DGMM) family.

    Parameters
    ----------
    layer_sizes : tuple of int
        Components per layer, ``(k_1, ..., k_h)``; ``k_1`` is the number of clusters. At most
        :data:`~dmix.families._layers.MAX_PATHS` paths ``prod(layer_sizes)``.
    layer_dims : tuple of int
        Latent dimensions ``(r_1, ..., r_h)``, non-increasing, each below the number of
        features (checked when parameters are made).
    reg_covar : float
        Non-negative value added to every noise variance estimate.
    var_regularization : float
        Non-negative value added to every noise variance and to the squared singular values of
        every loading matrix (see the module docstring).
    inverse_temperature : float in (0, 1]
        Tempering of the path responsibilities, ``softmax_s(nu l_is)`` (deterministic
        annealing); 1 is plain EM. ``loglik`` stays untempered.
    annealing_start, annealing_iter : float, int
        The annealing schedule of :meth:`for_iteration` (``annealing_iter = 0``: no annealing).
    weighted : bool
        The last column of a block holds row weights (exact EM only).
    fit_method : {'exact', 'stochastic'}
        ``'exact'``: EM from the path statistics (section 3.3). ``'stochastic'``: the paper's
        stochastic EM (section 3.2, :mod:`dmix.families._sem`).
    random_state : int
        Seed of the stochastic E-step's draws (the estimator sets it from its
        ``random_state``); unused by exact EM.
    iteration : int
        The EM iteration the stochastic E-step draws for (set by :meth:`for_iteration`).
    """

    name: ClassVar[str] = "dgmm"

    layer_sizes: tuple
    layer_dims: tuple
    reg_covar: float = 1e-6
    var_regularization: float = 0.0
    inverse_temperature: float = 1.0
    annealing_start: float = 1.0
    annealing_iter: int = 0
    weighted: bool = False
    # Omitted from family_spec at their defaults: exact fits keep the specs of older dmix, and
    # the per-fit seed and per-iteration counter never enter a checkpoint's or a model's spec.
    fit_method: str = field(default="exact", metadata={SPEC_OMIT_DEFAULT: True})
    random_state: int = field(default=0, metadata={SPEC_OMIT_DEFAULT: True})
    iteration: int = field(default=0, metadata={SPEC_OMIT_DEFAULT: True})

    def __post_init__(self):
        sizes, dims = _layers.check_layers(self.layer_sizes, self.layer_dims,
                                           type(self).__name__)
        object.__setattr__(self, "layer_sizes", sizes)
        object.__setattr__(self, "layer_dims", dims)
        for name in ("reg_covar", "var_regularization"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InvalidParameterError(
                    f"{name} must be a float >= 0. Got {value!r} instead.")
        for name in ("inverse_temperature", "annealing_start"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise InvalidParameterError(
                    f"{name} must be a float in (0, 1]. Got {value!r} instead.")
        if not (isinstance(self.annealing_iter, int) and self.annealing_iter >= 0):
            raise InvalidParameterError(
                f"annealing_iter must be an int >= 0. Got {self.annealing_iter!r} instead.")
        if self.fit_method not in ("exact", "stochastic"):
            raise InvalidParameterError(
                f"The 'fit_method' parameter of {type(self).__name__} must be 'exact' or "
                f"'stochastic'. Got {self.fit_method!r} instead.")
        for name in ("random_state", "iteration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidParameterError(
                    f"The {name!r} of {type(self).__name__} must be an int. Got {value!r} "
                    "instead.")

    @property
    def needs_row_index(self) -> bool:
        """Whether the E-step needs the global index of its first row (stochastic EM's
        draws are keyed by it); the engine then passes ``start``."""
        return self.fit_method == "stochastic"

    # -- structure -----------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes)

    @property
    def n_components(self) -> int:
        """Clusters: the components of the first layer."""
        return self.layer_sizes[0]

    @property
    def n_paths(self) -> int:
        return math.prod(self.layer_sizes)

    def check_n_features(self, n_features: int) -> None:
        """Raise unless every latent dimension is below ``n_features``."""
        if not self.layer_dims[0] < n_features:
            raise InvalidParameterError(
                f"layer_dims {self.layer_dims} of {type(self).__name__} must be below the "
                f"number of features, {n_features}; got r_1 = {self.layer_dims[0]}. Use "
                "smaller latent dimensions.")

    # -- parameters ----------------------------------------------------------------------

    def _weight_shapes(self) -> list[tuple[str, tuple]]:
        return [(f"layer{i}/weights", (k,)) for i, k in enumerate(self.layer_sizes)]

    def make_params(self, weights, intercepts, loadings, noise_variances) -> Params:
        """Parameters from per-layer lists (shapes in the module docstring).

        ``weights[l]`` is the mixing weights of layer ``l`` ((k_l,)); for the network, the
        conditional weights (k_l, k_{l+1}) for every layer but the deepest.
        """
        h = self.n_layers
        lists = (weights, intercepts, loadings, noise_variances)
        if any(len(v) != h for v in lists):
            raise InvalidParameterError(
                f"{type(self).__name__} has {h} layers; got per-layer lists of lengths "
                f"{[len(v) for v in lists]}.")
        d = np.shape(intercepts[0])[1]
        self.check_n_features(d)
        params: Params = {}
        dims = (d, *self.layer_dims)
        for i, (key, shape) in enumerate(self._weight_shapes()):
            k = self.layer_sizes[i]
            expected = {
                key: shape,
                f"layer{i}/intercepts": (k, dims[i]),
                f"layer{i}/loadings": (k, dims[i], dims[i + 1]),
                f"layer{i}/noise_variances": (k, dims[i]),
            }
            values = (weights[i], intercepts[i], loadings[i], noise_variances[i])
            for (name, want), value in zip(expected.items(), values, strict=True):
                value = np.array(value, dtype=np.float64, order="C")  # resumed fits exact
                if value.shape != want:
                    raise InvalidParameterError(
                        f"Parameter {name!r} must have shape {want}; got {value.shape}.")
                params[name] = value
        return params

    def params_from_layers(self, layers) -> Params:
        """Parameters from per-layer dicts with ``weights``, ``intercepts``, ``loadings`` and
        ``noise_variances`` (as :func:`~dmix.families._layers.fit_layer` returns them)."""
        return self.make_params(*([layer[key] for layer in layers] for key in
                                  ("weights", "intercepts", "loadings", "noise_variances")))

    def param_shapes(self, n_features: int) -> dict[str, tuple]:
        """The shape of every parameter array for data with ``n_features`` features."""
        dims = (n_features, *self.layer_dims)
        shapes = dict(self._weight_shapes())
        for i, k in enumerate(self.layer_sizes):
            shapes.update({f"layer{i}/intercepts": (k, dims[i]),
                           f"layer{i}/loadings": (k, dims[i], dims[i + 1]),
                           f"layer{i}/noise_variances": (k, dims[i])})
        return shapes

    def cluster_moments(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """``(weights, means)`` of the clusters (the first layer's components): the total
        weight and the weighted mean of the paths through each."""
        mix = self.path_mixture(params)
        k = self.layer_sizes[0]
        w = mix["weights"].reshape(k, -1)
        weights = w.sum(axis=1)
        means = np.einsum("kp,kpd->kd", w, mix["means"].reshape(k, w.shape[1], -1))
        return weights, means / weights[:, None]

    def layer_params(self, params: Params) -> tuple[list, list, list]:
        """``(intercepts, loadings, noise_variances)`` as per-layer lists."""
        h = range(self.n_layers)
        return ([params[f"layer{i}/intercepts"] for i in h],
                [params[f"layer{i}/loadings"] for i in h],
                [params[f"layer{i}/noise_variances"] for i in h])

    def path_log_weights(self, params: Params) -> np.ndarray:
        """``log pi_s`` (P,): the sum of the path's per-layer log-weights."""
        comp = _layers.path_components(self.layer_sizes)
        return sum(np.log(params[f"layer{i}/weights"])[comp[:, i]]
                   for i in range(self.n_layers))

    def path_mixture(self, params: Params) -> dict:
        """The flattened Gaussian mixture over paths: ``weights`` (P,), ``means`` (P, D) and
        ``covariances`` (P, D, D), computed top-down (section 3.1); paths in C order."""
        structure = _layers.path_structure(*self.layer_params(params),
                                           _layers.path_components(self.layer_sizes))
        return {"weights": np.exp(self.path_log_weights(params)),
                "means": structure.means[0], "covariances": structure.covariances[0]}

    def _path_params(self, params: Params) -> Params:
        """The path mixture as parameters of the full-covariance Gaussian family."""
        mix = self.path_mixture(params)
        return self._gaussian.make_params(mix["weights"], mix["means"], mix["covariances"])

    @property
    def _gaussian(self) -> Gaussian:
        return Gaussian(covariance_type="full", reg_covar=0.0,
                        inverse_temperature=self.inverse_temperature, weighted=self.weighted)

    def n_parameters(self, params: Params) -> int:
        """Free parameters (section 3.4): ``sum_l (k_l - 1) + k_l (2 r_{l-1} + r_{l-1} r_l
        - r_l (r_l - 1) / 2)``, the rotation of each loading matrix not counted."""
        dims = (np.shape(params["layer0/intercepts"])[1], *self.layer_dims)
        total = self._n_weight_parameters()
        for i, k in enumerate(self.layer_sizes):
            a, b = dims[i], dims[i + 1]
            total += k * (2 * a + a * b - b * (b - 1) // 2)
        return int(total)

    def _n_weight_parameters(self) -> int:
        return sum(k - 1 for k in self.layer_sizes)

    # -- worker side ---------------------------------------------------------------------

    def _paths(self, params: Params, ws: Workspace) -> Params:
        return ws.memo("deep-paths", params, lambda: self._path_params(params))

    def estep(self, params: Params, x, xp, workspace: Workspace | None = None, *,
              start: int = 0) -> Stats:
        """Statistics of block ``x`` (module docstring); ``start``, the global index of its
        first row, keys the stochastic E-step's draws (unused by exact EM)."""
        ws = workspace or Workspace()
        if self.fit_method == "stochastic":
            return _sem.sem_estep(self, params, x, xp, ws, int(start))
        stats = self._gaussian.estep(self._paths(params, ws), x, xp, ws)
        return {"n": stats["n"], "loglik": stats["loglik"], "n_nonfinite": stats["n_nonfinite"],
                "path_nk": stats["nk"], "path_s1": stats["s1"], "path_s2": stats["s2"]}

    def combine(self, a: Stats, b: Stats) -> Stats:
        return tree_add(a, b)

    def log_density(self, params: Params, x, xp, workspace: Workspace | None = None):
        ws = workspace or Workspace()
        return self._gaussian.log_density(self._paths(params, ws), x, xp, ws)

    def predict_proba(self, params: Params, x, xp, workspace: Workspace | None = None):
        """Cluster probabilities (n, k_1): the path responsibilities summed over the paths
        through each first-layer component."""
        ws = workspace or Workspace()
        resp = self._gaussian.predict_proba(self._paths(params, ws), x, xp, ws)
        k = self.layer_sizes[0]
        return xp.sum(xp.reshape(resp, (resp.shape[0], k, self.n_paths // k)), axis=2)

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        # The Gaussian E-step's temporaries with K = P paths (``n_components`` is ignored:
        # the engine cannot know P), plus the path responsibilities of predict_proba.
        out = self._gaussian.temp_bytes_per_row(n_features, self.n_paths) + 8 * self.n_paths
        if self.fit_method == "stochastic":  # (n, P) copies; gathered gains and factors
            r = sum(self.layer_dims)
            out += 8 * (3 * self.n_paths + r * (n_features + 2 * r) + 4 * n_features**2)
        return out

    # -- driver side ---------------------------------------------------------------------

    def _path_moments(self, stats: Stats, paths: Params):
        """``T0, T1, T2`` about the path means from the statistics about the shift ``c``:
        with ``b = mu_s - c``, ``T1 = s1 - T0 b``, ``T2 = S2 - b s1^T - s1 b^T + T0 b b^T``."""
        t0 = np.asarray(stats["path_nk"], dtype=np.float64)
        s1 = np.ascontiguousarray(stats["path_s1"], dtype=np.float64)
        s2 = _FULL.from_quadratic(np.ascontiguousarray(np.asarray(stats["path_s2"]).T))
        b = paths["means"] - _shift(paths)
        t1 = s1 - t0[:, None] * b
        outer = b[:, :, None] * s1[:, None, :]
        t2 = s2 - outer - np.swapaxes(outer, 1, 2)
        t2 += t0[:, None, None] * b[:, :, None] * b[:, None, :]
        return t0, t1, t2

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        """Every layer's regression update and the weights (section 3.3); with
        ``fit_method='stochastic'`` from the sums of the drawn data (section 3.2)."""
        comp = _layers.path_components(self.layer_sizes)
        intercepts, loadings, noise = self.layer_params(params)
        if self.fit_method == "stochastic":
            c_a, c_b = _sem._layer_shifts(self, params)
            t0 = np.asarray(stats["path_counts"], dtype=np.float64)
            # a component needs r_l + 2 drawn rows for a non-singular C_bb and a noise estimate
            fits = [_sem.regression_from_sums(stats, c_a[i], c_b[i], i,
                                              max(r + 2.0, EMPTY_FRACTION * stats["n"]))
                    for i, r in enumerate(self.layer_dims)]
        else:
            structure = _layers.path_structure(intercepts, loadings, noise, comp)
            paths = {"weights": np.exp(self.path_log_weights(params)),
                     "means": structure.means[0]}
            t0, t1, t2 = self._path_moments(stats, paths)
            gains = _layers.path_gains(structure)
            fits = [_layers.regression_update(structure, t0, t1, t2, i + 1, k, gains,
                                              EMPTY_FRACTION)
                    for i, k in enumerate(self.layer_sizes)]
        layers, empty = [], np.zeros(self.n_layers)
        reg = self.reg_covar + self.var_regularization
        for i, fit in enumerate(fits):
            psi = np.maximum(fit["noise_variances"], _layers.PSI_FLOOR * fit["input_variance"])
            lam = fit["loadings"]
            if self.var_regularization:
                lam = _inflate_singular_values(lam, self.var_regularization)
            new = {"intercepts": fit["intercepts"], "loadings": lam,
                   "noise_variances": psi + reg}
            kept = fit["empty"]
            if kept.any():  # no responsibility: keep the previous factor analyser
                old = (intercepts[i], loadings[i], noise[i])
                new = {key: np.where(kept.reshape((-1,) + (1,) * (v.ndim - 1)), o, v)
                       for (key, v), o in zip(new.items(), old, strict=True)}
                empty[i] = np.count_nonzero(kept)
            layers.append(new)
        for i, w in enumerate(self._update_weights(t0, comp)):
            layers[i]["weights"] = w
        return self.params_from_layers(layers), {**state, "empty_components": empty}

    def _update_weights(self, t0: np.ndarray, comp: np.ndarray) -> list:
        """Per layer, ``pi_j = sum_{s: s_l = j} T0_s / N``."""
        return [_normalized(np.bincount(comp[:, i], weights=t0, minlength=k))
                for i, k in enumerate(self.layer_sizes)]

    def objective(self, params: Params, stats: Stats) -> float:
        """What EM increases, per row: the mean log-likelihood of ``params``."""
        return float(stats["loglik"]) / float(stats["n"])

    @property
    def tempered(self) -> bool:
        """Whether the E-step tempers the responsibilities (then EM has not converged)."""
        return self.inverse_temperature < 1

    def for_restart(self, restart: int):
        """The family of restart ``restart``: under stochastic EM each restart draws with its
        own key (restart 0 with the fit's seed itself); exact EM is the same family."""
        if self.fit_method != "stochastic" or restart == 0:
            return self
        seed = np.random.SeedSequence([int(self.random_state) % 2**63, int(restart)])
        return replace(self, random_state=int(seed.generate_state(1, dtype=np.uint64)[0]
                                               % 2**63))

    def for_iteration(self, iteration: int):
        """The family for the E-step of iteration ``iteration`` (0 for the first).

        With annealing, the inverse temperature rises geometrically from ``annealing_start``
        at iteration 0 to 1 at iteration ``annealing_iter``:
        ``nu_t = annealing_start ** (1 - t / annealing_iter)``, then stays at 1.
        With ``fit_method='stochastic'`` it also records ``iteration``, which keys the draws.
        """
        changes = {}
        if self.annealing_iter:
            frac = max(0.0, 1.0 - iteration / self.annealing_iter)
            changes["inverse_temperature"] = float(self.annealing_start ** frac)
        if self.fit_method == "stochastic":
            changes["iteration"] = int(iteration)
        return replace(self, **changes) if changes else self

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator, *,
               confidence=None, std_range=None):
        """Draw ``(X, labels)``: paths from their weights, rows from the path Gaussians;
        ``labels`` are the first-layer components (rows grouped by path, so by label).

        ``confidence`` and ``std_range`` restrict each row to its path Gaussian's confidence
        region or Mahalanobis band (:func:`dmix.families.sampling.sample_mixture`).
        """
        from dmix.families.sampling import sample_mixture

        x, paths = sample_mixture(_FULL, self.path_mixture(params), n_samples, rng,
                                  confidence=confidence, std_range=std_range)
        return x, paths // (self.n_paths // self.layer_sizes[0])


@dataclass(frozen=True)
class GaussianNetwork(DeepGaussian):
    """Gaussian mixture network (GMN) family: a :class:`DeepGaussian` whose component
    probabilities are conditional on the component chosen in the next (deeper) layer.

    Parameters are those of :class:`DeepGaussian`; ``layer{l}/conditional_weights`` (k_l,
    k_{l+1}) replaces ``layer{l}/weights`` for every layer but the deepest, each column a
    distribution over layer ``l``'s components. With all columns equal the network is the
    deep Gaussian mixture with those weights. The M-step (section 3.4) is
    ``tau_{j | i} = sum_{s: s_l = j, s_{l+1} = i} T0_s / sum_{s: s_{l+1} = i} T0_s``.
    """

    name: ClassVar[str] = "gmn"

    def _weight_shapes(self):
        sizes = self.layer_sizes
        shapes = [(f"layer{i}/conditional_weights", (sizes[i], sizes[i + 1]))
                  for i in range(len(sizes) - 1)]
        return [*shapes, (f"layer{len(sizes) - 1}/weights", (sizes[-1],))]

    def params_from_layers(self, layers) -> Params:
        """As :meth:`DeepGaussian.params_from_layers`; a layer with (k_l,) ``weights`` above
        the deepest gets them as every column of its conditional weights."""
        layers = [dict(layer) for layer in layers]
        for i, layer in enumerate(layers[:-1]):
            w = np.asarray(layer["weights"], dtype=np.float64)
            if w.ndim == 1:
                layer["weights"] = np.repeat(w[:, None], self.layer_sizes[i + 1], axis=1)
        return super().params_from_layers(layers)

    def path_log_weights(self, params: Params) -> np.ndarray:
        """``log pi^(h)_{s_h} + sum_{l<h} log tau^(l)_{s_l | s_{l+1}}`` (P,)."""
        comp = _layers.path_components(self.layer_sizes)
        h = self.n_layers
        out = np.log(params[f"layer{h - 1}/weights"])[comp[:, h - 1]]
        for i in range(h - 1):
            out = out + np.log(params[f"layer{i}/conditional_weights"])[comp[:, i],
                                                                         comp[:, i + 1]]
        return out

    def _update_weights(self, t0: np.ndarray, comp: np.ndarray) -> list:
        sizes = self.layer_sizes
        out = []
        for i in range(len(sizes) - 1):
            pairs = np.zeros((sizes[i], sizes[i + 1]))
            np.add.at(pairs, (comp[:, i], comp[:, i + 1]), t0)
            out.append(_normalized(pairs, axis=0))
        out.append(_normalized(np.bincount(comp[:, -1], weights=t0, minlength=sizes[-1])))
        return out

    def _n_weight_parameters(self) -> int:
        """``k_{l+1} (k_l - 1)`` per conditional layer, ``k_h - 1`` for the deepest."""
        sizes = self.layer_sizes
        return sum(sizes[i + 1] * (sizes[i] - 1) for i in range(len(sizes) - 1)) + sizes[-1] - 1
