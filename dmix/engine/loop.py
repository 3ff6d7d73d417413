"""The driver loop: E-step pass, M-step, convergence test, restarts. It knows no family.

One iteration is one pass over the data (one ``compute``): every block returns the family's
statistics at the current parameters, the tree reduces them, and the M-step runs here on the
driver. As in scikit-learn, the lower bound recorded at iteration ``t`` is the mean
log-likelihood of the parameters *entering* iteration ``t`` (computed in the same pass), and
EM stops when it changes by less than ``tol``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dmix.engine.reduce import iteration_span, map_reduce
from dmix.engine.stopping import FitHistory, Stop, Tol, stop_reason
from dmix.errors import CollapseWarning, ConvergenceWarning, DataError
from dmix.families.base import Params, State, Stats, tree_accumulate
from dmix.xp import Compute, Workspace, batches, get_namespace, to_host

__all__ = [
    "Checkpointer",
    "EMResult",
    "History",
    "Monitor",
    "Snapshot",
    "apply_batched",
    "block_progress",
    "block_subset",
    "estep_pass",
    "fit_em",
    "restore_best",
    "run_em",
    "worst_rows",
]

#: Rows per E-step sub-batch inside a block. Measured on the Gaussian family (1 core, 1 MiB L2
#: cache, D = 16..64, K = 16..64): 256 rows are up to 40% slower (small matrix products) and
#: 20,000 rows 30% slower (temporaries fall out of cache). At D = K = 16 the diagonal E-step
#: ran 17% slower with 2000-2048 rows than with 1792, where its temporaries and rows still fit
#: in L2.
SUBBATCH_ROWS = 1792

#: Cap on the bytes of E-step temporaries per sub-batch (fewer rows when they are larger): the
#: full-covariance E-step at D = 32..64 ran 13-20% faster with 4 MiB than with 32 MiB, the size
#: of the whole (shared) L3 cache here.
SUBBATCH_BYTES = 4 * 2**20

#: The cap on a GPU, where large products are what keeps the device busy: 29,000 rows of a
#: float32 diagonal E-step at D = 128, K = 1024, 30,000 at D = 64, K = 64 full. (Chosen so
#: that GEMMs have tens of thousands of rows, which run near cuBLAS's peak; not yet measured.)
GPU_SUBBATCH_BYTES = 256 * 2**20

_CPU = Compute()


@dataclass
class IterationRecord:
    """What one EM iteration reports."""

    init: int
    iteration: int
    lower_bound: float
    change: float
    seconds: float
    #: Components re-seeded after this iteration's M-step (see :func:`worst_rows`).
    n_reseeded: int = 0
    #: The E-step's inverse temperature (below 1 while annealing).
    inverse_temperature: float = 1.0
    #: The component weights after this iteration's M-step (None where the family's
    #: parameters have no weight vector).
    weights: tuple[float, ...] | None = None


@dataclass
class EMResult:
    """The outcome of one EM run (one initialisation)."""

    params: Params
    lower_bound: float
    lower_bounds: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    #: Which initialisation (restart) this run is.
    init: int = 0
    #: Wall-clock seconds of every iteration.
    seconds: list[float] = field(default_factory=list)
    #: Collapsed components re-seeded during the run (all iterations together).
    n_reseeded: int = 0
    #: Stopped by a budget criterion (``dmix.engine.stopping.WallClock``) before converging.
    stopped: bool = False
    #: The bound the first change was measured from (the previous fit's with warm_start).
    initial: float = -math.inf


class Monitor:
    """Receives progress; the default does nothing. Subclass to print, log or plot.

    :meth:`pass_started` and :meth:`block_done` report the progress of each E-step pass; a
    monitor that overrides neither gets no per-block calls, and its passes run exactly as
    without a monitor (see :func:`block_progress`).
    """

    def resumed(self, directory: str, name: str, init: int, iteration: int) -> None:
        """The fit continues from checkpoint ``name`` in ``directory``."""

    def begin_init(self, init: int) -> None:
        pass

    def pass_started(self, n_rows: int, n_blocks: int) -> None:
        """An E-step pass over ``n_rows`` rows in ``n_blocks`` blocks begins (on the driver)."""

    def block_done(self, rows: int) -> None:
        """A block of ``rows`` rows finished its E-step (called on the driver, in the order the
        blocks finish; over a pass they sum to its ``n_rows``)."""

    def end_iteration(self, record: IterationRecord) -> None:
        pass

    def end_init(self, init: int, result: EMResult, seconds: float) -> None:
        pass


def block_progress(monitor: Monitor | None) -> Monitor | None:
    """``monitor`` if it overrides :meth:`Monitor.pass_started` or :meth:`Monitor.block_done`
    (or says so by a true ``wants_block_progress``, as a monitor wrapping another does), else
    None: then :func:`~dmix.engine.reduce.map_reduce` counts no blocks at all."""
    if monitor is None:
        return None
    wants = getattr(monitor, "wants_block_progress", None)
    if wants is not None:
        return monitor if wants else None
    cls = type(monitor)
    if cls.pass_started is Monitor.pass_started and cls.block_done is Monitor.block_done:
        return None
    return monitor


class History(Monitor):
    """A monitor that keeps every iteration's record in ``records`` (to time or plot a fit)."""

    def __init__(self):
        self.records: list[IterationRecord] = []

    def end_iteration(self, record: IterationRecord) -> None:
        self.records.append(record)


def n_components_of(params: Params) -> int:
    """Components of ``params`` for sizing sub-batches (families without ``means`` size their
    temporaries themselves)."""
    return int(np.shape(params["means"])[0]) if "means" in params else 1


def batch_rows(family, n_features: int, n_components: int, compute: Compute = _CPU) -> int:
    """Rows per sub-batch: :data:`SUBBATCH_ROWS`, fewer if temporaries pass
    :data:`SUBBATCH_BYTES`; on a GPU as many as :data:`GPU_SUBBATCH_BYTES` holds."""
    # temp_bytes_per_row counts float64 temporaries; float32 compute halves them.
    per_row = max(1, family.temp_bytes_per_row(n_features, n_components) * compute.itemsize // 8)
    if compute.device == "cuda":
        return max(64, GPU_SUBBATCH_BYTES // per_row)
    return max(64, min(SUBBATCH_ROWS, SUBBATCH_BYTES // per_row))


def nonfinite_error(x, start: int, index: int, source: str, n_bad: int) -> DataError:
    """The error for a block whose rows gave a non-finite log-density, naming chunk and rows."""
    host = np.asarray(x) if get_namespace(x) is np else x.get()
    bad_rows = np.flatnonzero(~np.isfinite(host).all(axis=1))
    span = f"chunk {index} (rows {start}-{start + x.shape[0] - 1})"
    if bad_rows.size:
        return DataError(
            f"Input X contains NaN or infinity: {span} of {source} has {bad_rows.size} "
            f"row(s) with non-finite values, the first at row {start + int(bad_rows[0])}. "
            "Remove or impute those rows."
        )
    return DataError(
        f"{span} of {source} has {n_bad} row(s) whose log-density is not finite although "
        "their values are; the values are too large for float64 arithmetic. Scale the data."
    )


def apply_batched(x, fn, family, params, n_components: int, *, start: int = 0, index: int = 0,
                  source: str = "the input", compute: Compute = _CPU):
    """``fn(params, x_batch, xp, workspace)`` over sub-batches of ``x`` on ``compute.device``,
    concatenated along rows as a float64 NumPy array.

    Raises :class:`~dmix.errors.DataError` naming the chunk and rows if a result is not finite.
    """
    ws = Workspace(compute.dtype)
    rows = batch_rows(family, x.shape[1], n_components, compute)
    out = [np.asarray(to_host(fn(params, part, get_namespace(part), ws)), dtype=np.float64)
           for part in batches(x, rows, compute)]
    out = out[0] if len(out) == 1 else np.concatenate(out)
    finite = np.isfinite(out) if out.ndim == 1 else np.all(np.isfinite(out), axis=1)
    n_bad = int(out.shape[0] - int(np.count_nonzero(finite)))
    if n_bad:
        raise nonfinite_error(x, start, index, source, n_bad)
    return out


def _estep_block(x, start, index, family, params, rows, source, compute=_CPU):
    """Per block on a worker: the family's E-step over sub-batches, summed in place.

    Statistics are additive (``dmix.families.base``); summing into one set of arrays and
    reusing the workspace leaves no allocation per sub-batch, which is what makes sub-batches
    on Dask workers as fast as in a plain process (see :class:`~dmix.xp.Workspace`).
    ``start`` is the global index of the block's first row: families with a true
    ``needs_row_index`` get ``start=`` the global index of each sub-batch's first row. On a
    GPU the sub-batches are copied to the device as they are computed; the statistics come
    back as float64 NumPy arrays, summed here on the host.
    """
    stats, workspace = None, Workspace(compute.dtype)
    # A family that keys random draws by the global row index (``needs_row_index``) is told
    # the index of each sub-batch's first row; the others are called as before.
    keyed, row = bool(getattr(family, "needs_row_index", False)), int(start)
    for part in batches(x, rows, compute):
        xp = get_namespace(part)
        if keyed:
            part_stats = family.estep(params, part, xp, workspace=workspace, start=row)
            row += part.shape[0]
        else:
            part_stats = family.estep(params, part, xp, workspace=workspace)
        stats = tree_accumulate(stats, part_stats)
    if stats["n_nonfinite"]:
        raise nonfinite_error(x, start, index, source, int(stats["n_nonfinite"]))
    return stats


def estep_pass(family, data, params: Params, *, source="the data", split_every=None,
               client=None, compute: Compute = _CPU, progress: Monitor | None = None) -> Stats:
    """One pass over ``data``: the family's statistics at ``params``, reduced over all blocks,
    each block's E-step computed on ``compute.device`` in ``compute.dtype``; ``progress`` (a
    monitor, see :func:`block_progress`) is told of every finished block."""
    k = n_components_of(params)
    rows = batch_rows(family, data.shape[1], k, compute)
    return map_reduce(
        data, _estep_block, family, params, rows, source, compute,
        combine=family.combine, split_every=split_every, label="estep", client=client,
        blocks=block_subset(family, data.numblocks[0]), progress=progress,
    )


def block_subset(family, n_blocks: int):
    """The blocks a pass reads: all (None), or those the family's ``block_subset`` picks
    (stochastic gradient steps read a random subset of chunks, keyed by seed and step)."""
    pick = getattr(family, "block_subset", None)
    return None if pick is None else pick(n_blocks)


def restore_best(family, result: EMResult, state: State) -> EMResult:
    """The run's result with the best parameters its family kept in the M-step state, where it
    keeps them (gradient families stopping early on a held-out split); else as it is."""
    best = getattr(family, "best_params", None)
    found = None if best is None else best(state)
    if found is not None:
        result.params, result.lower_bound = found
    return result


def _worst_block(x, start, index, family, params, m, rows, compute=_CPU):
    """The ``m`` rows of a block with the lowest ``family.row_scores``: (scores, global row
    indices, rows), ordered by score then index."""
    ws = Workspace(compute.dtype)
    scores = [np.asarray(to_host(family.row_scores(params, part, get_namespace(part), ws)),
                         dtype=np.float64) for part in batches(x, rows, compute)]
    scores = np.concatenate(scores) if scores else np.zeros(0)
    take = np.lexsort((np.arange(scores.size), scores))[:m]
    take = take[np.isfinite(scores[take])]
    return scores[take], start + take, np.array(np.asarray(x)[take], dtype=np.float64)


def _worst_combine(a, b, m):
    scores, index, rows = (np.concatenate([u, v]) for u, v in zip(a, b, strict=True))
    take = np.lexsort((index, scores))[:m]
    return scores[take], index[take], rows[take]


def worst_rows(family, data, params: Params, m: int, *, split_every=None, client=None,
               compute: Compute = _CPU) -> np.ndarray:
    """The ``m`` rows of ``data`` the model explains worst (lowest ``family.row_scores``; ties
    to the lowest row index, so the choice does not depend on the chunking), in that order.

    One pass; each block returns its own ``m`` lowest and the tree keeps the ``m`` lowest.
    """
    k = n_components_of(params)
    rows = batch_rows(family, data.shape[1], k, compute)
    _, _, found = map_reduce(
        data, _worst_block, family, params, m, rows, compute,
        combine=functools.partial(_worst_combine, m=m), split_every=split_every,
        label="worst-rows", client=client)
    return found


@dataclass
class Snapshot:
    """Where a fit stands after an iteration: everything needed to continue it exactly.

    ``run`` is the current restart's state (parameters after its last M-step, its lower
    bounds); ``state`` the M-step state; ``best`` the best finished restart so far. The
    randomness of every restart is keyed by ``(seed, restart)``, so no generator state is
    needed beyond the seed the caller records.
    """

    restart: int
    run: EMResult
    state: State
    best: EMResult | None = None
    #: Restarts run side by side (:func:`dmix.engine.grid.fit_restarts`): every run and its
    #: state (then ``run`` and ``state`` are the first's, and ``best`` is None).
    runs: list[EMResult] | None = None
    states: list[State] | None = None


class Checkpointer(Protocol):
    """Where :func:`fit_em` saves snapshots (see :mod:`dmix.io.checkpoint`)."""

    every: int

    def save(self, snapshot: Snapshot) -> None: ...


def step_family(family, iteration: int):
    """The family for the E-step of iteration ``iteration`` (annealing changes it)."""
    return family.for_iteration(iteration) if hasattr(family, "for_iteration") else family


def restart_family(family, restart: int):
    """The family of restart ``restart`` (families with random draws key them by it)."""
    return family.for_restart(restart) if hasattr(family, "for_restart") else family


def _tempered(step) -> bool:
    return bool(getattr(step, "tempered", False))


def complete_iteration(family, step, data, result: EMResult, stats: Stats, state: State, *,
                       tol: float, stop, passes: dict, tic: float, monitor: Monitor) -> State:
    """Everything after an E-step pass: M-step, re-seeding collapsed components, the lower
    bound, the stopping test and the monitor's record; updates ``result``, returns the state.

    ``step`` is the family the E-step ran with (``family`` at this iteration's temperature).
    """
    previous_params = result.params
    params, state = step.mstep(previous_params, stats, state)
    collapsed = state.pop("collapsed", ())
    # A gradient M-step's optimizer may declare convergence itself (L-BFGS: a vanishing
    # gradient, or a line search that cannot improve any more).
    settled = bool(state.pop("converged", False))
    if len(collapsed):
        rows = worst_rows(family, data, previous_params, len(collapsed), **passes)
        params = family.reseed(params, collapsed, rows)
        warnings.warn(
            f"{len(collapsed)} component(s) collapsed at iteration {result.n_iter + 1} "
            f"(components {[int(j) for j in collapsed]}) and were re-seeded at the rows "
            "the model explained worst. If this repeats, use fewer components or increase "
            "reg_covar.", CollapseWarning, stacklevel=5)
    previous = result.lower_bound
    lower_bound = (family.objective(previous_params, stats) if hasattr(family, "objective")
                   else float(stats["loglik"] / stats["n"]))
    result.lower_bounds.append(lower_bound)
    result.params, result.lower_bound = params, lower_bound
    result.n_iter += 1
    result.n_reseeded += len(collapsed)
    result.seconds.append(time.perf_counter() - tic)
    # No convergence while annealing, on the first iteration after it (its change is
    # measured from a tempered iteration's bound) or right after a re-seed: the objective
    # moved for another reason than EM's ascent.
    if not (_tempered(step) or _tempered(step_family(family, result.n_iter - 2))
            or len(collapsed)):
        reason = stop_reason(stop, FitHistory(result.lower_bounds, result.seconds, tol,
                                              result.initial))
        result.converged = reason is Stop.CONVERGED or settled
        result.stopped = reason is Stop.BUDGET and not settled
    monitor.end_iteration(IterationRecord(
        result.init, result.n_iter, lower_bound, lower_bound - previous, result.seconds[-1],
        n_reseeded=len(collapsed),
        inverse_temperature=float(getattr(step, "inverse_temperature", 1.0)),
        weights=_weights(params)))
    return state


def _weights(params: Params) -> tuple[float, ...] | None:
    w = params.get("weights") if isinstance(params, dict) else None
    if w is None or np.ndim(w) != 1:
        return None
    return tuple(float(v) for v in np.asarray(to_host(w), dtype=np.float64))


def _finished(run: EMResult, max_iter: int) -> bool:
    return run.converged or run.stopped or run.n_iter >= max_iter


def run_em(
    family,
    data,
    params: Params,
    *,
    max_iter: int,
    tol: float,
    init: int = 0,
    lower_bound: float = -math.inf,
    source: str = "the data",
    split_every: int | None = None,
    client=None,
    compute: Compute = _CPU,
    monitor: Monitor | None = None,
    start: EMResult | None = None,
    state: State | None = None,
    on_iteration: Callable[[EMResult, State], None] | None = None,
    stop: Callable[[FitHistory], bool] | None = None,
) -> EMResult:
    """EM from ``params`` until the mean log-likelihood changes by less than ``tol``.

    ``lower_bound`` is the value the first change is measured from (``-inf`` for a fresh start;
    the previous fit's for a warm start). ``start`` (with its M-step ``state``) continues a run
    that stopped after ``start.n_iter`` iterations; ``on_iteration(result, state)`` is called
    after every M-step.
    """
    monitor = monitor or Monitor()
    state = dict(state or {})
    result = start if start is not None else EMResult(params=params, lower_bound=lower_bound,
                                                      init=init, initial=lower_bound)
    stop = stop or Tol()
    passes = dict(split_every=split_every, client=client, compute=compute)
    progress = block_progress(monitor)
    while not _finished(result, max_iter):
        tic = time.perf_counter()
        step = step_family(family, result.n_iter)
        with iteration_span(client, result.n_iter + 1):
            stats = estep_pass(step, data, result.params, source=source, progress=progress,
                               **passes)
        state = complete_iteration(family, step, data, result, stats, state, tol=tol,
                                   stop=stop, passes=passes, tic=tic, monitor=monitor)
        if on_iteration is not None:
            on_iteration(result, state)
    return restore_best(family, result, state)


def fit_em(
    family,
    data,
    initialize: Callable[[int], Params],
    *,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    lower_bound: float = -math.inf,
    source: str = "the data",
    split_every: int | None = None,
    client=None,
    compute: Compute = _CPU,
    monitor: Monitor | None = None,
    checkpoint: Checkpointer | None = None,
    resume: Snapshot | None = None,
    stop: Callable[[FitHistory], bool] | None = None,
) -> EMResult:
    """Run EM from ``n_init`` initialisations and keep the one with the best final lower bound.

    ``initialize(i)`` returns the starting parameters of restart ``i``. With ``checkpoint``, a
    snapshot is saved after each restart's initialisation, every ``checkpoint.every``
    iterations, and when a restart ends; ``resume`` (a saved snapshot) continues from there,
    and the result is the one an uninterrupted fit gives. Warns with
    :class:`~dmix.errors.ConvergenceWarning` when the kept run did not converge.
    """
    monitor = monitor or Monitor()
    best = resume.best if resume is not None else None
    first = resume.restart if resume is not None else 0
    for init in range(first, n_init):
        tic = time.perf_counter()
        monitor.begin_init(init)
        if resume is not None and init == resume.restart:
            run, state = resume.run, resume.state
            # A resume may bring a larger tol: the last recorded change then meets it.
            bounds = run.lower_bounds
            run.converged |= len(bounds) >= 2 and abs(bounds[-1] - bounds[-2]) < tol
        else:
            run = EMResult(params=initialize(init), lower_bound=lower_bound, init=init,
                           initial=lower_bound)
            state = {}
            if checkpoint is not None:
                checkpoint.save(Snapshot(init, run, state, best))

        def save(result, state, init=init, best=best):
            if checkpoint is not None and (
                result.n_iter % checkpoint.every == 0 or _finished(result, max_iter)
            ):
                checkpoint.save(Snapshot(init, result, state, best))

        run = run_em(restart_family(family, init), data, run.params, max_iter=max_iter,
                     tol=tol, init=init,
                     source=source, split_every=split_every, client=client, compute=compute,
                     monitor=monitor, start=run, state=state, on_iteration=save, stop=stop)
        monitor.end_init(init, run, time.perf_counter() - tic)
        if best is None or run.lower_bound > best.lower_bound:
            best = run
    warn_if_not_converged(best, max_iter)
    return best


def warn_if_not_converged(best: EMResult, max_iter: int) -> None:
    """scikit-learn's :class:`~dmix.errors.ConvergenceWarning` for the kept run."""
    if not best.converged and max_iter > 0:
        warnings.warn(
            "Best performing initialization did not converge. Try different init parameters, "
            "or increase max_iter, tol, or check for degenerate data.",
            ConvergenceWarning,
            stacklevel=4,
        )
