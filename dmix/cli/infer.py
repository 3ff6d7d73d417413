"""``dmix score``, ``predict`` and ``sample``: streamed over Zarr, written to Zarr.

::

    dmix score DATA.zarr --model MODEL_DIR --output OUT.zarr [--array NAME] [--chunk-size ROWS]
    dmix predict DATA.zarr --model MODEL_DIR --output OUT.zarr [--proba] [...]
    dmix sample --model MODEL_DIR --n-samples N --output OUT.zarr [--seed S] [--chunk-size ROWS]

Each command writes a Zarr group at OUT.zarr; every array has one row per data row (or drawn
row), stored in chunks of the rows of one block (``--chunk-size``, by default whole stored
chunks of the data in equal blocks of at most 32 MiB; 16 MiB of drawn rows for ``sample``):

============ ============================ =================================================
command      arrays                       attribute ``dmix_output`` (written last)
============ ============================ =================================================
score        ``log_density`` (n,) float64 ``mean_log_likelihood`` (= ``GaussianMixture.score``)
predict      ``labels`` (n,) int64;       ``counts``: rows per component
             ``proba`` (n, K) float64
             with ``--proba``
sample       ``X`` (N, D) float64,        ``seed``, ``row_seed``, ``counts``
             ``labels`` (N,) int64
============ ============================ =================================================

The data are read, and the results computed and written, block by block on the workers: no
command holds more than a few blocks in memory, and only per-block sums reach this process.
The rows that ``sample`` draws depend only on the model, the seed and their index (they are
``dmix.datasets.mixture_rows(params, row_seed)``, with ``row_seed`` derived from ``--seed``
so that a sample never repeats the noise of ``dmix make-data --seed`` with the same seed), not
on the chunk size or the cluster. For the other families each block of rows comes from the
family's ``sample`` with a generator keyed by the seed and the block's first row: the same
for the same ``--chunk-size``, whatever the cluster. An existing output is replaced only with ``--overwrite``,
never when it is a dmix model or the command's own input; a command that fails removes its
partial output.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from dmix import __version__
from dmix.cli._common import (
    _add_cluster_options,
    _dask_client,
    _fmt_vector,
    _nbytes,
    _non_negative_int,
    _positive_int,
    _say,
    compute_options,
)
from dmix.datasets import mixture_rows
from dmix.errors import DataError
from dmix.io.output import write_arrays, write_generated, write_predictions
from dmix.io.source import DEFAULT_BLOCK_BYTES, as_source
from dmix.io.targets import OUTPUT_ATTR, check_output_target, output_group
from dmix.rng import seed_sequence_int

__all__ = ["add_commands", "load_estimator"]

#: Mixed with ``--seed`` into the seed of the sampled rows (ASCII "sample").
_SAMPLE_KEY = 0x73616D706C65
#: Bytes of drawn rows per block of ``dmix sample`` when no ``--chunk-size`` is given.
_SAMPLE_BLOCK_BYTES = 16 * 2**20


# -- loading a model -------------------------------------------------------------------------


def load_estimator(path, *, storage_options: dict | None = None, **overrides):
    """A fitted estimator (:class:`~dmix.GaussianMixture`, :class:`~dmix.SkewNormalMixture`,
    ...) from a model saved by ``dmix fit --output``.

    Parameters
    ----------
    path : str or os.PathLike
        Local path or fsspec URL of the model group.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    **overrides
        Constructor parameters to set after the saved fit options, e.g. ``client=...``,
        ``chunk_size=...``.

    Returns
    -------
    estimator
        With the constructor parameters of the fit and the fitted attributes set as ``fit``
        sets them (``weights_``, ``converged_``, ``n_iter_``, ``lower_bound_``,
        ``lower_bounds_``, ``n_features_in_`` and the family's parameters).

    Raises
    ------
    DataError
        If there is no model at ``path``, or its parameters are inconsistent.
    InvalidParameterError
        If an override is not a constructor parameter.
    """
    from dmix.io.model import load_model

    est = load_model(path, storage_options=storage_options)
    est.set_params(**overrides)
    return est


# -- shared pieces ---------------------------------------------------------------------------


def _data_path(args) -> str:
    return args.data if not args.array else f"{args.data.rstrip('/')}/{args.array}"


def _describe_source(source) -> str:
    rows = source.array.chunks[0]
    return (f"Data: {source.description}: {source.shape[0]} rows x {source.shape[1]} features, "
            f"{np.dtype(source.dtype).name}, {len(rows)} block(s) of up to {max(rows)} rows")


def _describe_model(path: str, est) -> str:
    kind = (f"{est.covariance_type} covariances" if hasattr(est, "covariance_type")
            else type(est).__name__)
    return (f"Model: {path}: {est.n_components} component(s), {kind}, "
            f"{est.n_features_in_} features")


def _prepare(args, what: str):
    """Load the model and open the data; check features and the output before any cluster."""
    data = _data_path(args)
    est = load_estimator(args.model, chunk_size=args.chunk_size)
    source = as_source(data, chunk_size=args.chunk_size)
    d = source.shape[1]
    if d != est.n_features_in_:
        raise DataError(
            f"{source.description} has {d} features, but the model {args.model!r} was fitted "
            f"on {est.n_features_in_} features.")
    check_output_target(args.output, args.overwrite, inputs=(data, args.model), what=what)
    return data, est, source


def _output_attrs(command: str, **values) -> dict:
    return {"command": command, **values, "dmix_version": __version__}


def _written_line(output: str, written, n_rows: int, seconds: float) -> str:
    parts = ", ".join(f"{name} {arr.shape} {arr.dtype}" for name, arr in written.arrays.items())
    nbytes = sum(arr.nbytes for arr in written.arrays.values())
    return (f"Wrote {output}: {parts}; {written.n_blocks} block(s) of up to "
            f"{min(written.chunk_rows, n_rows)} rows, {_nbytes(nbytes)} in {seconds:.2f} s")


def _counts_line(counts) -> str:
    counts = np.asarray(counts, dtype=np.int64)
    return f"Rows per component: {' '.join(str(int(c)) for c in counts)}"


# -- score -----------------------------------------------------------------------------------


def _cmd_score(args) -> int:
    data, est, source = _prepare(args, "the log-densities")
    n = source.shape[0]
    _say(_describe_source(source))
    _say(_describe_model(args.model, est))
    with output_group(args.output, overwrite=args.overwrite, inputs=(data, args.model),
                      what="the log-densities") as group, \
            _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
        est.set_params(client=client, **compute_options(args))
        tic = time.perf_counter()
        written = write_arrays(group, {"log_density": est.score_samples(data)},
                               dtypes={"log_density": np.float64},
                               summaries={"log_density": np.sum}, client=client)
        seconds = time.perf_counter() - tic
        mean = float(written.summaries["log_density"]) / n
        group.attrs[OUTPUT_ATTR] = _output_attrs(
            "score", model=args.model, data=data, n_samples=n, mean_log_likelihood=mean)
    _say(_written_line(args.output, written, n, seconds))
    _say(f"Mean log-likelihood per row: {mean!r}")
    return 0


# -- predict ---------------------------------------------------------------------------------


def _cmd_predict(args) -> int:
    what = "the predictions"
    data, est, source = _prepare(args, what)
    n, k = source.shape[0], est.n_components
    if args.proba and args.chunk_size is None:
        # Responsibilities take 8 K bytes a row: keep their blocks near the default size too.
        rows = max(source.array.chunks[0])
        if rows * 8 * k > 2 * DEFAULT_BLOCK_BYTES:
            est.set_params(chunk_size=max(1, DEFAULT_BLOCK_BYTES // (8 * k)))
            source = as_source(data, chunk_size=est.chunk_size)
    _say(_describe_source(source))
    _say(_describe_model(args.model, est))
    with output_group(args.output, overwrite=args.overwrite, inputs=(data, args.model),
                      what=what) as group, \
            _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
        est.set_params(client=client, **compute_options(args))
        tic = time.perf_counter()
        written = write_predictions(group, est, data, proba=bool(args.proba), client=client)
        seconds = time.perf_counter() - tic
        n_per = np.asarray(written.summaries["labels"], dtype=np.int64)
        group.attrs[OUTPUT_ATTR] = _output_attrs(
            "predict", model=args.model, data=data, n_samples=n, proba=bool(args.proba),
            counts=n_per.tolist())
    _say(_written_line(args.output, written, n, seconds))
    _say(_counts_line(n_per))
    return 0


# -- sample ----------------------------------------------------------------------------------


def _row_seed(seed: int) -> int:
    """The seed of the drawn rows: ``seed`` mixed with a key of its own (see the module doc)."""
    state = np.random.SeedSequence([int(seed), _SAMPLE_KEY]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _sample_block(params: dict, row_seed: int, start: int, stop: int):
    """Rows ``[start, stop)`` drawn from ``params`` and their components (on a worker)."""
    x, labels = mixture_rows(params, row_seed, start, stop, return_labels=True)
    return x, labels.astype(np.int64, copy=False)


def _family_sample_block(family, params: dict, row_seed: int, start: int, stop: int):
    """Rows ``[start, stop)`` from any family's ``sample``, with a generator keyed by the
    seed and the block's first row (so the output does not depend on the cluster), shuffled
    within the block (``sample`` groups rows by component)."""
    rng = np.random.default_rng([row_seed, start])
    x, labels = family.sample(params, stop - start, rng)
    order = rng.permutation(stop - start)
    return x[order], np.asarray(labels, dtype=np.int64)[order]


def _sample_function(est, row_seed: int):
    """The block function of ``dmix sample`` for ``est``: the keyed Gaussian generator of
    :func:`dmix.datasets.mixture_rows` for Gaussian mixtures, the family's sampler else."""
    from dmix.families.gaussian import Gaussian

    if not isinstance(est._family, Gaussian):
        return functools.partial(_family_sample_block, est._scoring_family, est._params,
                                 row_seed)
    k, d = est.means_.shape
    cov = est._family.covariance
    params = {"weights": np.asarray(est.weights_, dtype=np.float64),
              "means": np.asarray(est.means_, dtype=np.float64),
              "covariances": cov.dense(est.covariances_, k, d)}
    return functools.partial(_sample_block, params, row_seed)


def _cmd_sample(args) -> int:
    what = "the samples"
    est = load_estimator(args.model)
    check_output_target(args.output, args.overwrite, inputs=(args.model,), what=what)
    if args.seed is None:
        args.seed = seed_sequence_int(None) % 2**32
        _say(f"Seed: {args.seed} (pass --seed {args.seed} to repeat this sample)")
    n, k, d = args.n_samples, est.n_components, est.n_features_in_
    rows = args.chunk_size or max(1, _SAMPLE_BLOCK_BYTES // (8 * d))
    rows = min(rows, n)
    row_seed = _row_seed(args.seed)
    block_fn = _sample_function(est, row_seed)
    _say(_describe_model(args.model, est))
    with output_group(args.output, overwrite=args.overwrite, inputs=(args.model,),
                      what=what) as group, \
            _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
        tic = time.perf_counter()
        written = write_generated(
            group, n, block_fn, {"X": ((d,), np.float64), "labels": ((), np.int64)}, rows,
            summaries={"labels": functools.partial(np.bincount, minlength=k)}, client=client)
        seconds = time.perf_counter() - tic
        n_per = np.asarray(written.summaries["labels"], dtype=np.int64)
        group.attrs[OUTPUT_ATTR] = _output_attrs(
            "sample", model=args.model, n_samples=n, seed=args.seed, row_seed=row_seed,
            generator=("dmix.datasets.mixture_rows" if hasattr(est, "covariance_type")
                       else f"{type(est._family).__name__}.sample"), counts=n_per.tolist())
    _say(_written_line(args.output, written, n, seconds))
    _say(_counts_line(n_per))
    _say(f"Model weights:     {_fmt_vector(est.weights_, limit=16)}")
    _say(f"Sample fractions:  {_fmt_vector(n_per / n, limit=16)}")
    return 0


# -- the parsers -----------------------------------------------------------------------------


def _add_io_options(p, *, data: bool) -> None:
    if data:
        p.add_argument("data", metavar="DATA.zarr", help="path or URL of a Zarr array or group")
        p.add_argument("--array", metavar="NAME",
                       help="the array inside the group DATA (default: X, or its only array)")
        p.add_argument("--chunk-size", type=_positive_int, metavar="ROWS",
                       help="rows per block and per stored chunk of the output (default: "
                            "whole stored chunks, equal blocks of at most 32 MiB)")
    p.add_argument("--model", "-m", required=True, metavar="MODEL_DIR",
                   help="a model saved by `dmix fit --output`")
    p.add_argument("--output", "-o", required=True, metavar="OUT.zarr",
                   help="path or URL of the Zarr group to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing Zarr group or array at OUT (never a model or the "
                        "input)")


def add_commands(sub) -> None:
    """Register the inference commands on the ``dmix`` subparsers ``sub``."""

    p = sub.add_parser(
        "score", help="write the log-density of every row to Zarr",
        description="Write log p(x) of every row of DATA under a saved model to the Zarr "
                    "group OUT (array log_density, float64) and print the mean "
                    "log-likelihood per row (GaussianMixture.score).")
    _add_io_options(p, data=True)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "predict", help="write the most probable component of every row to Zarr",
        description="Write the most probable component of every row of DATA under a saved "
                    "model to the Zarr group OUT (array labels, int64) and, with --proba, the "
                    "responsibilities (array proba, float64, one column per component).")
    _add_io_options(p, data=True)
    p.add_argument("--proba", action="store_true",
                   help="also write the responsibilities (n x K)")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "sample", help="draw rows from a saved model into Zarr",
        description="Draw N rows from a saved model, block by block on the cluster, into the "
                    "Zarr group OUT (arrays X and labels). The rows depend on the model, the "
                    "seed and their index only, not on --chunk-size.")
    _add_io_options(p, data=False)
    p.add_argument("--n-samples", "-n", type=_positive_int, required=True, metavar="N")
    p.add_argument("--seed", type=_non_negative_int, metavar="S",
                   help="seed of the drawn rows (default: fresh entropy, printed)")
    p.add_argument("--chunk-size", type=_positive_int, metavar="ROWS",
                   help="rows per block and per stored chunk (default: about 16 MiB of rows)")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_sample)
