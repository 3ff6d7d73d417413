"""Model selection over a grid of Gaussian mixtures, with one read of the data per iteration.

:func:`select` fits every ``(n_components, covariance_type)`` of a grid, each with ``n_init``
restarts, side by side: every iteration is one pass over the data in which each block goes
through the E-steps of all runs still going (:mod:`dmix.engine.grid`). Each model ends as it
would fitted alone (the same parameters, bit for bit); one more pass scores them all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from dmix.engine.grid import run_em_many, score_many, snapshot_saver
from dmix.engine.loop import EMResult, warn_if_not_converged
from dmix.engine.reduce import place_on_device, resolve_client
from dmix.engine.stopping import get_criterion
from dmix.errors import DmixError, InvalidParameterError
from dmix.estimators import GaussianMixture
from dmix.families.base import family_spec
from dmix.families.covariance import COVARIANCE_TYPES
from dmix.io.checkpoint import (
    CheckpointDir,
    check_compatible,
    data_fingerprint,
    data_location,
)
from dmix.io.store import _jsonable
from dmix.rng import seed_sequence_int

__all__ = ["Selection", "select"]

_CRITERIA = ("bic", "aic", "icl")


@dataclass
class Selection:
    """The outcome of :func:`select`.

    Attributes
    ----------
    table : list of dict
        One row per model, in grid order: ``n_components``, ``covariance_type``,
        ``n_parameters``, ``log_likelihood`` (sum over the rows), ``bic``, ``aic``, ``icl``
        (lower is better), ``converged``, ``n_iter``.
    best : GaussianMixture
        The fitted model with the lowest ``criterion`` (the first one on ties).
    criterion : str
    models : dict
        Every fitted model, by ``(n_components, covariance_type)``.
    pass_seconds : list of float
        Wall-clock seconds of each shared pass of this call (one iteration of every model
        still running, its M-steps and checkpoint included).
    """

    table: list[dict]
    best: GaussianMixture
    criterion: str
    models: dict = field(repr=False)
    pass_seconds: list[float] = field(default_factory=list)

    def __iter__(self):  # table, best = dmix.select(...)
        return iter((self.table, self.best))

    def to_string(self) -> str:
        """The table as aligned text, the best model marked with ``*``."""
        head = ("K", "covariance", "params", "log-likelihood", "BIC", "AIC", "ICL", "iter")
        lines = ["{:>4} {:>15} {:>7} {:>16} {:>14} {:>14} {:>14} {:>5}".format(*head)]
        for row in self.table:
            mark = "*" if (row["n_components"], row["covariance_type"]) == (
                self.best.n_components, self.best.covariance_type) else " "
            lines.append(
                f"{row['n_components']:>4} {row['covariance_type']:>15} "
                f"{row['n_parameters']:>7} {row['log_likelihood']:>16.4f} {row['bic']:>14.4f} "
                f"{row['aic']:>14.4f} {row['icl']:>14.4f} {row['n_iter']:>5}{mark}")
        return "\n".join(lines)


def _grid(values, name, check):
    values = [values] if isinstance(values, int | str) else list(values)
    if not values:
        raise InvalidParameterError(f"select: {name} must not be empty.")
    for v in values:
        check(v)
    return values


def select(X, n_components, covariance_types=("full",), *, criterion="bic", n_init=1,
           random_state=None, client=None, checkpoint=None, resume=False, checkpoint_every=1,
           checkpoint_keep=3, **params) -> Selection:
    """Fit a grid of Gaussian mixtures in shared passes and pick one by an information
    criterion.

    Parameters
    ----------
    X : array-like, dask array, zarr array, or path/URL of a Zarr array
    n_components : int or sequence of int
    covariance_types : str or sequence of str, default=('full',)
    criterion : {'bic', 'aic', 'icl'}, default='bic'
        ``bic = -2 LL + p log n``, ``aic = -2 LL + 2 p``, ``icl = bic + 2 E`` with ``E`` the
        entropy of the responsibilities (Biernacki et al. 2000): lower is better.
    n_init : int, default=1
        Restarts per model; all of them share the passes too.
    random_state : int, optional
        Seed of every model's initialisation (the same as fitting the model alone with it).
    client : distributed.Client, optional
    checkpoint : str or os.PathLike, optional
        Directory where every run of the grid is checkpointed after the initialisations and
        every ``checkpoint_every`` passes (the last ``checkpoint_keep`` kept).
    resume : bool, default=False
        Continue the grid from the latest checkpoint in ``checkpoint`` (same data and grid);
        the result is the one of an uninterrupted selection.
    **params
        Other :class:`GaussianMixture` parameters, the same for every model (``tol``,
        ``max_iter``, ``reg_covar``, ``init_params``, priors, ``chunk_size``...). Not user
        initial parameters.

    Returns
    -------
    Selection
        ``table``, ``best`` and every fitted model; unpacks as ``table, best``.
    """
    if criterion not in _CRITERIA:
        raise InvalidParameterError(
            f"select: criterion must be one of {list(_CRITERIA)}. Got {criterion!r} instead.")
    for name in ("weights_init", "means_init", "precisions_init", "n_components",
                 "covariance_type"):
        if params.get(name) is not None:
            raise InvalidParameterError(f"select does not take {name!r}: fit that model alone.")

    def check_k(k):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InvalidParameterError(
                f"select: n_components must be ints >= 1. Got {k!r} instead.")

    def check_type(t):
        if t not in (*COVARIANCE_TYPES, "tied_full"):
            raise InvalidParameterError(
                f"select: unknown covariance type {t!r}; valid: {list(COVARIANCE_TYPES)}.")

    ks = _grid(n_components, "n_components", check_k)
    types = _grid(covariance_types, "covariance_types", check_type)
    client = resolve_client(client)
    ckpt = None
    if checkpoint is not None:
        ckpt = CheckpointDir(checkpoint, every=checkpoint_every, keep=checkpoint_keep)
        ckpt.check_writable()
        if not resume and not ckpt.is_empty():
            raise DmixError(
                f"The checkpoint directory {ckpt.url!r} holds checkpoints of an earlier run. "
                "Pass resume=True to continue it, or choose an empty directory.")
    loaded = ckpt.load() if ckpt is not None and resume else None
    # An unseeded selection that resumes continues with its own seed.
    seed = (int(loaded.attrs["seed"]) if loaded is not None and random_state is None
            else seed_sequence_int(random_state))
    models = {(int(k), t): GaussianMixture(int(k), covariance_type=t, n_init=n_init,
                                           random_state=seed, client=client, **params)
              for k in ks for t in types}
    first = next(iter(models.values()))
    for est in models.values():
        est._check_parameters()
    source, data, init_data, passes, compute = first._prepare_data(X, None, client)
    n_samples, n_features = source.shape
    if n_samples < max(ks):
        raise InvalidParameterError(
            f"select: n_components up to {max(ks)} needs at least as many rows; the data have "
            f"{n_samples}.")

    tic = time.perf_counter()
    families, initializers, owners, moments = [], [], [], {}
    for key, est in models.items():
        est.prior_ = est._resolve_prior(data, n_features, passes, moments)
        family = est._family
        initialize = est._initializer(family, init_data, {}, seed, True, passes)
        for restart in range(est.n_init):
            families.append(family)
            initializers.append((initialize, restart))
            owners.append(key)
    if ckpt is not None:
        spec = {"name": "grid", "families": [family_spec(f) for f in families]}
        options = {"grid": [[k, t] for k, t in models], "n_init": n_init, "seed": str(seed),
                   "init_params": first.init_params}
        fingerprint = data_fingerprint(data, source.description, data_location(X), client)
        if loaded is not None:
            check_compatible(loaded.attrs, family=_jsonable(spec, "grid"), options=options,
                             fingerprint=fingerprint, where=ckpt.url)
        ckpt.discard_after(None if loaded is None else loaded.name)
        ckpt.meta = {"estimator": "select", "family": spec, "options": options,
                     "data": fingerprint, "seed": str(seed)}
    if loaded is not None:
        runs, states = loaded.snapshot.runs, loaded.snapshot.states
    else:
        runs = [EMResult(params=init(restart), lower_bound=-math.inf, init=restart)
                for init, restart in initializers]
        states = [{} for _ in runs]

    save = snapshot_saver(ckpt, first.max_iter)
    if loaded is None:
        save(runs, states)
    em_data = place_on_device(data, client, compute, persist=first.persist)
    pass_seconds, since = [], time.perf_counter()

    def on_pass(runs, states):
        nonlocal since
        save(runs, states)
        now = time.perf_counter()
        pass_seconds.append(now - since)
        since = now

    run_em_many(families, em_data, runs, states, max_iter=first.max_iter, tol=first.tol,
                stop=get_criterion(first.stopping_criterion), compute=compute,
                on_pass=on_pass, **passes)

    best_runs = {}
    for key, run in zip(owners, runs, strict=True):
        if key not in best_runs or run.lower_bound > best_runs[key].lower_bound:
            best_runs[key] = run
    for key, run in best_runs.items():
        est = models[key]
        warn_if_not_converged(run, est.max_iter)
        est._set_result(est._family, run, n_features)
        est.fit_seconds_ = time.perf_counter() - tic
    scores = score_many([models[key]._scoring_family for key in best_runs], data,
                        [models[key]._params for key in best_runs],
                        split_every=passes["split_every"], client=client, compute=compute)
    rows = {}
    for (key, run), score in zip(best_runs.items(), scores, strict=True):
        est = models[key]
        p = est._n_parameters()
        loglik = score["loglik"]
        bic = -2 * loglik + p * math.log(n_samples)
        rows[key] = {"n_components": key[0], "covariance_type": est._family.covariance_type,
                     "n_parameters": p, "log_likelihood": loglik, "bic": bic,
                     "aic": -2 * loglik + 2 * p, "icl": bic + 2 * score["entropy"],
                     "converged": bool(run.converged), "n_iter": run.n_iter}
    best = min(rows, key=lambda key: rows[key][criterion])  # the first on ties
    return Selection(table=list(rows.values()), best=models[best], criterion=criterion,
                     models=models, pass_seconds=pass_seconds)
