"""Many EM runs, one pass over the data per iteration: restarts (``n_init``) and model grids.

Every block is read once per iteration and each run's E-step is applied to it in turn, with
the same sub-batches and the same summation order as when the run is fitted alone
(:func:`dmix.engine.loop._estep_block`), and the statistics of each run are reduced by the
same tree: every run gives bit for bit what it gives alone. A run leaves the pass once it has
converged (or hit ``max_iter``); the others go on.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from dmix.engine.loop import (
    EMResult,
    Monitor,
    Snapshot,
    _estep_block,
    _finished,
    batch_rows,
    block_progress,
    block_subset,
    complete_iteration,
    n_components_of,
    restart_family,
    restore_best,
    step_family,
    warn_if_not_converged,
)
from dmix.engine.reduce import iteration_span, map_reduce
from dmix.engine.stopping import Tol
from dmix.families.base import Params, State, Stats
from dmix.xp import Compute, Workspace, batches, get_namespace, to_host

__all__ = [
    "estep_pass_many", "fit_restarts", "run_em_many", "score_many", "snapshot_saver",
]

_CPU = Compute()


def _estep_many_block(x, start, index, members, source, compute):
    return [_estep_block(x, start, index, family, params, rows, source, compute)
            for family, params, rows in members]


def _combine_lists(combines, a, b):
    return [combine(u, v) for combine, u, v in zip(combines, a, b, strict=True)]


def _members(families, params_list, n_features: int, compute: Compute) -> tuple:
    return tuple((f, p, batch_rows(f, n_features, n_components_of(p), compute))
                 for f, p in zip(families, params_list, strict=True))


def estep_pass_many(families, data, params_list: list[Params], *, source="the data",
                    split_every=None, client=None, compute: Compute = _CPU,
                    progress: Monitor | None = None) -> list[Stats]:
    """The statistics of every ``(family, params)`` pair, from one pass over ``data``
    (``progress``: as in :func:`dmix.engine.loop.estep_pass`)."""
    members = _members(families, params_list, data.shape[1], compute)
    combine = functools.partial(_combine_lists, tuple(f.combine for f in families))
    # Runs step together, so a family that reads a subset of blocks per step (keyed by seed
    # and step, not by restart) picks the same for all of them.
    subsets = {None if s is None else tuple(s)
               for s in (block_subset(f, data.numblocks[0]) for f in families)}
    if len(subsets) > 1:
        raise ValueError("Runs side by side must read the same blocks in a pass.")
    return map_reduce(data, _estep_many_block, members, source, compute, combine=combine,
                      split_every=split_every, label="estep", client=client,
                      blocks=subsets.pop(), progress=progress)


def run_em_many(families, data, runs: list[EMResult], states: list[State] | None = None, *,
                max_iter: int, tol: float, stop=None, source: str = "the data",
                split_every=None, client=None, compute: Compute = _CPU,
                monitor: Monitor | None = None, on_pass=None) -> list[EMResult]:
    """Continue every run of ``runs`` (its family in ``families``) until each has finished,
    all E-steps of an iteration in one pass; ``runs`` are updated in place and returned.
    ``on_pass(runs, states)`` is called after every pass."""
    monitor = monitor or Monitor()
    stop = stop or Tol()
    states = [dict(s) for s in (states or [{} for _ in runs])]
    passes = dict(split_every=split_every, client=client, compute=compute)
    active = [i for i, run in enumerate(runs) if not _finished(run, max_iter)]
    progress = block_progress(monitor)
    while active:
        tic = time.perf_counter()
        steps = [step_family(families[i], runs[i].n_iter) for i in active]
        with iteration_span(client, max(runs[i].n_iter for i in active) + 1):
            stats = estep_pass_many(steps, data, [runs[i].params for i in active],
                                    source=source, progress=progress, **passes)
        for i, step, part in zip(active, steps, stats, strict=True):
            states[i] = complete_iteration(families[i], step, data, runs[i], part, states[i],
                                           tol=tol, stop=stop, passes=passes, tic=tic,
                                           monitor=monitor)
        active = [i for i in active if not _finished(runs[i], max_iter)]
        if on_pass is not None:
            on_pass(runs, states)
    for family, run, state in zip(families, runs, states, strict=True):
        restore_best(family, run, state)
    return runs


def snapshot_saver(checkpoint, max_iter: int):
    """``save(runs, states)``: a checkpoint of runs side by side after the initialisations,
    every ``checkpoint.every`` passes and when all have finished (nothing without a
    checkpoint). Each is named by the iterations of all runs together, which every pass
    increases."""

    def save(runs, states):
        if checkpoint is not None and (
            max(run.n_iter for run in runs) % checkpoint.every == 0
            or all(_finished(run, max_iter) for run in runs)
        ):
            done = EMResult({}, -np.inf, n_iter=sum(run.n_iter for run in runs))
            checkpoint.save(Snapshot(0, done, {}, runs=runs, states=states))

    return save


def fit_restarts(family, data, initialize, *, n_init: int, max_iter: int, tol: float,
                 lower_bound: float = -np.inf, stop=None, monitor: Monitor | None = None,
                 checkpoint=None, resume: Snapshot | None = None, **passes) -> EMResult:
    """:func:`dmix.engine.loop.fit_em` with the ``n_init`` restarts side by side (one pass per
    iteration for all): the same result, restart for restart.

    With ``checkpoint``, a snapshot of every run is saved after the initialisations, every
    ``checkpoint.every`` passes and at the end; ``resume`` (such a snapshot) continues them.
    """
    monitor = monitor or Monitor()
    if resume is not None:
        runs, states = resume.runs, resume.states
    else:
        runs, states = [], [{} for _ in range(n_init)]
        for init in range(n_init):
            monitor.begin_init(init)
            runs.append(EMResult(params=initialize(init), lower_bound=lower_bound, init=init,
                                 initial=lower_bound))

    save = snapshot_saver(checkpoint, max_iter)
    if resume is None:
        save(runs, states)
    tic = time.perf_counter()
    run_em_many([restart_family(family, i) for i in range(n_init)], data, runs, states,
                max_iter=max_iter, tol=tol, stop=stop,
                monitor=monitor, on_pass=save, **passes)
    best = None
    for run in runs:
        monitor.end_init(run.init, run, time.perf_counter() - tic)
        if best is None or run.lower_bound > best.lower_bound:
            best = run
    warn_if_not_converged(best, max_iter)
    return best


def _score_block(x, start, index, members, compute):
    """Per run: rows, sum of log p(x) and of the entropy ``-sum_k r_k log r_k`` (for ICL)."""
    out = []
    for family, params, rows in members:
        ws = Workspace(compute.dtype)
        loglik = entropy = 0.0
        for part in batches(x, rows, compute):
            xp = get_namespace(part)
            loglik += float(np.sum(to_host(family.log_density(params, part, xp, ws))))
            resp = np.asarray(to_host(family.predict_proba(params, part, xp, ws)), np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy -= float(np.sum(np.where(resp > 0, resp * np.log(resp), 0.0)))
        out.append({"n": float(x.shape[0]), "loglik": loglik, "entropy": entropy})
    return out


def _add_scores(a, b):
    return [{k: u[k] + v[k] for k in u} for u, v in zip(a, b, strict=True)]


def score_many(families, data, params_list: list[Params], *, split_every=None, client=None,
               compute: Compute = _CPU) -> list[dict]:
    """``n``, ``loglik`` (sum of log p(x)) and ``entropy`` of the responsibilities of every
    ``(family, params)`` pair, in one pass."""
    members = _members(families, params_list, data.shape[1], compute)
    return map_reduce(data, _score_block, members, compute, combine=_add_scores,
                      split_every=split_every, label="score", client=client)
