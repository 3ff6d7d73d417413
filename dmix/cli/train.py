"""``dmix make-data``, ``fit``, ``resume``, ``info`` and ``quickstart``."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import zarr

from dmix._registry import family_defaults
from dmix.cli._common import (
    _add_cluster_options,
    _add_fit_options,
    _add_progress_options,
    _cpu_count,
    _dask_client,
    _fmt_vector,
    _nbytes,
    _non_negative_int,
    _positive_float,
    _positive_int,
    _say,
    compute_options,
    progress_monitor,
)
from dmix.datasets import SHAPES, ShapeDataset, make_mixture, make_shape, match_components
from dmix.errors import DmixError
from dmix.estimators import resume as dmix_resume
from dmix.io.checkpoint import CheckpointDir
from dmix.io.model import load_model, save_model
from dmix.io.source import as_source
from dmix.io.store import (
    check_model_target,
    create_group,
    read_model,
    write_blocks,
    write_params,
)
from dmix.rng import seed_sequence_int

# -- make-data -------------------------------------------------------------------------------


#: make-data's codecs. Float features barely compress (1.04x with zstd, 1.08x with blosc-lz4)
#: and decompression cuts read throughput 2-5x (docs/bench_stream.json), so none is the default.
CODECS = {
    "none": lambda: None,
    "zstd": lambda: "auto",  # zarr's default: zstd level 0
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}


def _write_dataset(out: str, dataset, chunk_size: int | None, shard_size: int | None,
                   overwrite: bool, threads: int, codec: str = "none"):
    """Write ``dataset`` to the group ``out``: array ``X`` block by block, and for a mixture
    its true parameters in the group ``truth``."""
    d = dataset.n_features
    if chunk_size is None:  # about 16 MiB per chunk, at most all rows
        chunk_size = max(1, min(dataset.n_samples, 16 * 2**20 // (d * dataset.dtype.itemsize)))
    group = create_group(out, overwrite=overwrite, what="a dataset")
    tic = time.perf_counter()
    x = write_blocks(group, dataset.n_samples, d, dataset.rows, chunk_size, dataset.dtype,
                     shard_size, name="X", max_workers=threads, compressors=CODECS[codec]())
    seconds = time.perf_counter() - tic
    n_chunks = -(-dataset.n_samples // chunk_size)
    shards = f", shards of {shard_size} rows" if shard_size else ""
    if isinstance(dataset, ShapeDataset):
        group.attrs["dmix_dataset"] = {
            "generator": "dmix.datasets.make_shape", "shape": dataset.shape_name,
            "n_samples": dataset.n_samples, "n_features": 2, "seed": dataset.seed,
            "dtype": dataset.dtype.name}
        _say(f"Wrote {out}")
        _say(f"  X      shape {x.shape}, {dataset.dtype.name}, {n_chunks} chunk(s) of "
             f"{chunk_size} rows{shards}; {_nbytes(x.nbytes)} in {seconds:.2f} s")
        _say(f"  a 2-D {dataset.shape_name}; seed {dataset.seed}")
        return x
    write_params(group, "truth", dataset.params)
    group.attrs["dmix_dataset"] = {
        "generator": "dmix.datasets.make_mixture",
        "n_samples": dataset.n_samples,
        "n_features": d,
        "n_components": dataset.n_components,
        "seed": dataset.seed,
        "dtype": dataset.dtype.name,
    }
    _say(f"Wrote {out}")
    _say(f"  X      shape {x.shape}, {dataset.dtype.name}, {n_chunks} chunk(s) of {chunk_size} "
         f"rows{shards}; {_nbytes(x.nbytes)} in {seconds:.2f} s")
    _say(f"  truth  weights ({dataset.n_components},), means ({dataset.n_components}, {d}), "
         f"covariances ({dataset.n_components}, {d}, {d}); seed {dataset.seed}")
    return x


def _cmd_make_data(args) -> int:
    if args.shape is not None:
        if args.n_features not in (None, 2) or args.n_components is not None:
            raise DmixError(f"--shape {args.shape} makes 2-D data without components: drop "
                            "-d/--n-features and -k/--n-components.")
        dataset = make_shape(args.shape, args.n_samples, args.seed, dtype=args.dtype)
    elif args.n_features is None or args.n_components is None:
        raise DmixError("make-data needs -d/--n-features and -k/--n-components for a "
                        f"Gaussian mixture, or --shape (one of {sorted(SHAPES)}).")
    else:
        dataset = make_mixture(args.n_samples, args.n_features, args.n_components, args.seed,
                               dtype=args.dtype, separation=args.separation)
    _write_dataset(args.out, dataset, args.chunk_size, args.shard_size, args.overwrite,
                   args.threads, args.codec)
    return 0


# -- fit -------------------------------------------------------------------------------------


#: Gradient-training flags and the estimator parameters they set.
_GRADIENT_FLAGS = {"optimizer": "optimizer", "learning_rate": "learning_rate",
                   "lr_schedule": "learning_rate_schedule", "batch_fraction": "batch_fraction",
                   "validation_fraction": "validation_fraction",
                   "n_iter_no_change": "n_iter_no_change"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model(args):
    """The estimator class of ``--model`` and its own options."""
    from dmix._registry import MODELS, estimator_classes

    cls = estimator_classes().get(MODELS[args.model])
    if cls is None:
        raise DmixError(f"--model {args.model}: this version of dmix does not have it.")
    deep = args.model in ("dgmm", "gmn")
    for flag, value in (("--layer-sizes", args.layer_sizes), ("--layer-dims", args.layer_dims)):
        if value is not None and not deep:
            raise DmixError(f"{flag} is an option of --model dgmm and gmn, not {args.model}.")
    methods = {"dgmm": ("exact", "stochastic"), "gmn": ("exact", "stochastic"),
               "gmm": ("em", "gradient")}.get(args.model, ())
    if args.fit_method is not None and args.fit_method not in methods:
        raise DmixError(f"--fit-method {args.fit_method} is not a method of --model "
                        f"{args.model}" + (f" (one of {list(methods)})." if methods else "."))
    gradient = args.model == "squared" or args.fit_method == "gradient"
    own = {param: getattr(args, flag) for flag, param in _GRADIENT_FLAGS.items()
           if getattr(args, flag) is not None}
    if own and not gradient:
        raise DmixError(f"{_flag(next(k for k in _GRADIENT_FLAGS if getattr(args, k) is not None))}"
                        " is an option of gradient training (--model squared, or --model gmm "
                        "--fit-method gradient).")
    if args.init_params == "nested" and args.model != "squared":
        raise DmixError("--init-params nested is an option of --model squared.")
    if args.model == "gmm":
        return cls, {"covariance_type": args.covariance_type, **own,
                     "fit_method": args.fit_method or "em"}
    if args.model == "squared":
        if args.covariance_type not in ("full", "diag"):
            raise DmixError(f"--covariance-type {args.covariance_type}: squared mixtures have "
                            "full or diag covariances.")
        return cls, {"covariance_type": args.covariance_type, **own}
    if args.covariance_type != "full":
        raise DmixError(f"--covariance-type is an option of --model gmm and squared, not "
                        f"{args.model}.")
    if args.model == "skew":
        return cls, {"form": args.skew_form}
    sizes = args.layer_sizes or (args.n_components, 1)
    if sizes[0] != args.n_components:
        raise DmixError(f"--layer-sizes {','.join(map(str, sizes))}: the first layer's size is "
                        f"the number of clusters, so it must equal -k {args.n_components}.")
    return cls, {"layer_sizes": sizes, "layer_dims": args.layer_dims,
                 "fit_method": args.fit_method or "exact"}


def _estimator(args, client):
    resume = getattr(args, "resume", False)
    if args.seed is None and not resume:  # draw one, so that it is printed and saved
        args.seed = seed_sequence_int(None) % 2**32
        _say(f"Seed: {args.seed} (pass --seed {args.seed} to repeat this fit)")
    cls, own = _model(args)
    if "layer_sizes" not in own:
        own["n_components"] = args.n_components
    # The estimator's own defaults unless given (EM's and gradient training's differ).
    own.update({k: getattr(args, k) for k in ("tol", "max_iter") if getattr(args, k) is not None})
    return cls(
        **own,
        reg_covar=args.reg_covar, n_init=args.n_init,
        init_params=args.init_params, random_state=args.seed, chunk_size=args.chunk_size,
        client=client, split_every=args.split_every,
        persist={"auto": "auto", "yes": True, "no": False}[args.persist],
        checkpoint=getattr(args, "checkpoint", None),
        checkpoint_every=getattr(args, "checkpoint_every", 1),
        checkpoint_keep=getattr(args, "checkpoint_keep", 3),
        **compute_options(args),
    )


def _fit(fit, n_init: int, init_params: str, args=None):
    """Return ``fit(monitor)`` run with the progress monitor of ``--quiet`` / ``--json`` (the
    JSON lines go to the stdout of :func:`_json_stdout`); warnings (non-convergence, a skipped
    checkpoint) become one line each on stderr."""
    monitor = progress_monitor(args, n_init, init_params, file=getattr(args, "stdout", None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = fit(monitor)
    for w in caught:
        if issubclass(w.category, DeprecationWarning | PendingDeprecationWarning):
            continue
        _say(f"dmix: warning: {w.message}", file=sys.stderr)
    return est


def _print_result(est) -> None:
    state = "yes" if est.converged_ else "no"
    _say(f"Converged: {state} (n_iter = {est.n_iter_})")
    _say(f"Lower bound (mean log-likelihood per row): {est.lower_bound_:.6f}")
    _say(f"Weights: {_fmt_vector(est.weights_, limit=16)}")


def _data_summary(source) -> str:
    rows = source.array.chunks[0]
    return (f"Data: {source.description}: {source.shape[0]} rows x {source.shape[1]} features, "
            f"{np.dtype(source.dtype).name}, {len(rows)} block(s) of up to {max(rows)} rows")


def _finish(est, source, data: str, args) -> None:
    """Print the result of a fit and save the model if ``--output`` asks for it."""
    _print_result(est)
    if args.output:
        save_model(est, args.output, overwrite=args.overwrite, data={
            "source": data, "description": source.description, "shape": list(source.shape),
            "dtype": np.dtype(source.dtype).name})
        _say(f"Saved the model to {args.output}")


@contextlib.contextmanager
def _json_stdout(args):
    """With ``--json``, stdout is for the JSON lines only: the other messages go to stderr
    (``args.stdout`` keeps the real stdout for the monitor)."""
    if not getattr(args, "json", False):
        yield
        return
    args.stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _cmd_fit(args) -> int:
    with _json_stdout(args):
        return _fit_command(args)


def _fit_command(args) -> int:
    compute_options(args)  # option errors before a cluster starts
    data = args.data if not args.array else f"{args.data.rstrip('/')}/{args.array}"
    source = as_source(data, chunk_size=args.chunk_size)
    if args.output:  # before the fit, not after: a fit can take hours
        check_model_target(args.output, args.overwrite)
    _say(_data_summary(source))
    with _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
        est = _estimator(args, client)
        _fit(lambda monitor: est.fit(data, resume=args.resume, monitor=monitor), est.n_init,
             est.init_params, args)
    _finish(est, source, data, args)
    return 0


# -- resume ----------------------------------------------------------------------------------


def _cmd_resume(args) -> int:
    with _json_stdout(args):
        return _resume_command(args)


def _resume_command(args) -> int:
    compute_options(args)  # option errors before a cluster starts
    with warnings.catch_warnings():  # the fit below reports what load() warns about
        warnings.simplefilter("ignore")
        loaded = CheckpointDir(args.checkpoint).load()
    if loaded is None:
        raise DmixError(f"No complete checkpoint found in {args.checkpoint!r}: nothing to "
                        "resume.")
    settings, data = loaded.attrs["settings"], args.data or loaded.attrs["data"]["location"]
    if data is None:
        raise DmixError(f"The checkpoints in {args.checkpoint!r} were written for "
                        f"{loaded.attrs['data']['source']}, which has no path: pass --data.")
    if args.output:
        check_model_target(args.output, args.overwrite)
    source = as_source(data, chunk_size=settings["chunk_size"])
    _say(_data_summary(source))
    with _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
        compute = compute_options(args) if args.device or args.gpus is not None else {}
        if args.compute_dtype:
            compute["dtype"] = args.compute_dtype
        est = _fit(lambda monitor: dmix_resume(args.checkpoint, data, max_iter=args.max_iter,
                                               client=client, monitor=monitor, **compute),
                   loaded.attrs["options"]["n_init"], settings["init_params"], args)
    _finish(est, source, data, args)
    return 0


# -- info ------------------------------------------------------------------------------------


def _cmd_info(args) -> int:
    family, _, attrs = read_model(args.model)
    defaults = family_defaults(family.get("name"))
    # The estimator's own weights_ and means_: for the deep families, those of the clusters
    # (each a mixture of paths), not of any layer.
    est = load_model(args.model)
    weights = np.asarray(getattr(est, "weights_", np.empty(0)))
    means = np.asarray(getattr(est, "means_", np.empty((0, 0))))
    k, d = int(est.n_components), int(est.n_features_in_)
    lines = [
        ("family", family.get("name")),
        # the hyperparameters that differ from the defaults (always the covariance type)
        *((key.replace("_", " "), value) for key, value in family.items()
          if key == "covariance_type" or (key != "name" and value != defaults.get(key))),
        ("n_components", k),
        ("n_features", d),
        ("n_iter", attrs.get("n_iter_")),
        ("converged", attrs.get("converged_")),
    ]
    lower = attrs.get("lower_bound_")
    if lower is not None:
        lines.append(("lower bound", f"{lower:.6f} (mean log-likelihood per row)"))
    data = attrs.get("data") or {}
    if data:
        lines.append(("fitted on", f"{data.get('source')} {tuple(data.get('shape', ()))} "
                                   f"{data.get('dtype', '')}".rstrip()))
    lines.append(("dmix version", attrs.get("dmix_version")))
    _say(f"Model: {args.model}")
    for key, value in lines:
        _say(f"  {key:<16} {value}")
    if weights.shape == (k,) and means.shape == (k, d):
        shown = min(d, 6)
        cols = f"first {shown} of {d} features" if d > shown else f"{d} features"
        _say(f"Components (weight, ||mean||, mean: {cols}):")
        for j in np.argsort(-weights):
            mean = means[j]
            _say(f"  {j:>3}  {weights[j]:.4f}  {np.linalg.norm(mean):>10.4f}  "
                 f"{_fmt_vector(mean, limit=6)}")
    return 0


# -- quickstart ------------------------------------------------------------------------------


def _compare_with_truth(est, truth: dict) -> None:
    order = match_components(truth["means"], est.means_)
    w_err = np.abs(est.weights_[order] - truth["weights"])
    m_err = np.linalg.norm(est.means_[order] - truth["means"], axis=1)
    _say("Fitted vs true components (matched by means):")
    _say(f"  {'k':>3}  {'true weight':>11}  {'fitted':>8}  {'||mean error||':>14}  "
         f"{'||true mean||':>13}")
    for j, f in enumerate(order):
        _say(f"  {j:>3}  {truth['weights'][j]:>11.4f}  {est.weights_[f]:>8.4f}  "
             f"{m_err[j]:>14.4f}  {np.linalg.norm(truth['means'][j]):>13.4f}")
    _say(f"Max |weight error| = {w_err.max():.4f}; max ||mean error|| = {m_err.max():.4f}")
    if est.covariance_type == "full":
        c_err = np.abs(est.covariances_[order] - truth["covariances"]).max()
        _say(f"Max |covariance error| = {c_err:.4f}")


def _cmd_quickstart(args) -> int:
    compute_options(args)  # option errors before a cluster starts
    tic = time.perf_counter()
    dataset = make_mixture(args.n_samples, args.n_features, args.n_components, args.seed,
                           dtype=args.dtype, separation=args.separation)
    with contextlib.ExitStack() as stack:
        if args.out is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="dmix-quickstart-"))
        else:
            root = args.out
            os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "data.zarr")
        # Eight stored chunks, one block each, so that every worker has work to show.
        args.chunk_size = args.chunk_size or max(1, -(-args.n_samples // 8))
        _write_dataset(path, dataset, args.chunk_size, None, True, min(4, _cpu_count()))
        source = as_source(path, chunk_size=args.chunk_size)
        _say(_data_summary(source))
        with _dask_client(args.scheduler, args.n_workers, args.dashboard_address,
                      args.gpus) as client:
            est = _estimator(args, client)
            _fit(lambda monitor: est.fit(path, monitor=monitor), est.n_init, est.init_params)
            dashboard = client.dashboard_link
        _print_result(est)
        _compare_with_truth(est, dataset.params)
        if args.out is None:
            _say("(The data were in a temporary directory, now removed; pass --out DIR to "
                 "keep them.)")
    _say(f"Quickstart done in {time.perf_counter() - tic:.1f} s. The Dask dashboard was at "
         f"{dashboard}")
    return 0



def add_commands(sub) -> None:
    """Register make-data, fit, resume, info and quickstart on the ``dmix`` subparsers ``sub``."""

    p = sub.add_parser("make-data", help="write synthetic data to a Zarr group",
                       description="Write a synthetic Gaussian mixture to the Zarr group OUT: "
                                   "array X, written block by block, and its true parameters "
                                   "in the subgroup truth; or, with --shape, a 2-D shape "
                                   "(ring/donut, banana, cosine, funnel, spiral).")
    p.add_argument("out", metavar="OUT.zarr", help="path or URL of the group to create")
    p.add_argument("--n-samples", "-n", type=_positive_int, required=True, metavar="N")
    p.add_argument("--n-features", "-d", type=_positive_int, metavar="D",
                   help="features of the Gaussian mixture (not with --shape)")
    p.add_argument("--n-components", "-k", type=_positive_int, metavar="K",
                   help="components of the Gaussian mixture (not with --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="write this 2-D shape instead of a Gaussian mixture")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                   help="seed of the parameters and of the rows (default %(default)s)")
    p.add_argument("--chunk-size", type=_positive_int, metavar="ROWS",
                   help="rows per stored chunk (default: about 16 MiB of rows)")
    p.add_argument("--shard-size", type=_positive_int, metavar="ROWS",
                   help="rows per shard, a multiple of --chunk-size (default: no sharding)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--separation", type=_positive_float, default=6.0,
                   help="minimum distance between means in standard deviations "
                        "(default %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=min(4, _cpu_count()), metavar="N",
                   help="blocks generated and written at once (default %(default)s)")
    p.add_argument("--codec", choices=sorted(CODECS), default="none",
                   help="compression of X (default %(default)s: float data barely compress and "
                        "decompression slows every pass; see docs/bench_stream.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Zarr group")
    p.set_defaults(func=_cmd_make_data)

    p = sub.add_parser("fit", help="fit a mixture model to a Zarr array",
                       description="Fit a mixture model (--model) by EM to the Zarr array DATA (or "
                                   "the array X of the group DATA) on a Dask cluster.")
    p.add_argument("data", metavar="DATA.zarr", help="path or URL of a Zarr array or group")
    p.add_argument("--array", metavar="NAME",
                   help="the array inside the group DATA (default: X, or its only array)")
    _add_fit_options(p, n_components_required=True)
    p.add_argument("--seed", type=_non_negative_int, metavar="S",
                   help="random_state of the initialisation (default: fresh entropy)")
    p.add_argument("--output", "-o", metavar="MODEL_DIR", help="save the fitted model here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", metavar="DIR_OR_URL",
                   help="save the state of the fit here after every --checkpoint-every "
                        "iterations (a local directory or an fsspec URL)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                   help="iterations between checkpoints (default %(default)s)")
    g.add_argument("--checkpoint-keep", type=_positive_int, default=3, metavar="N",
                   help="complete checkpoints kept (default %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint if there is one "
                        "(for jobs that are requeued with the same command)")
    _add_progress_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("resume", help="continue an interrupted fit from its checkpoints",
                       description="Continue the fit whose checkpoints are in CKPT_DIR, with "
                                   "the options and data it was started with. The result is "
                                   "the one the uninterrupted fit would have given.")
    p.add_argument("checkpoint", metavar="CKPT_DIR", help="path or URL of the checkpoints")
    p.add_argument("--data", metavar="DATA.zarr",
                   help="the data (default: the path recorded in the checkpoint)")
    p.add_argument("--max-iter", type=_non_negative_int, metavar="N",
                   help="new iteration limit per initialisation (default: the fit's own)")
    p.add_argument("--output", "-o", metavar="MODEL_DIR", help="save the fitted model here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    _add_progress_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("info", help="describe a saved model",
                       description="Print what a model saved by `dmix fit --output` holds.")
    p.add_argument("model", metavar="MODEL_DIR", help="path or URL of the model")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("quickstart", help="make data, start a local cluster, fit, compare",
                       description="Write a synthetic mixture to a local Zarr store, fit it on "
                                   "a local Dask cluster, and compare the fit with the truth.")
    p.add_argument("--n-samples", "-n", type=_positive_int, default=200_000, metavar="N",
                   help="default %(default)s")
    p.add_argument("--n-features", "-d", type=_positive_int, default=8, metavar="D",
                   help="default %(default)s")
    p.add_argument("--n-components", "-k", type=_positive_int, default=4, metavar="K",
                   help="default %(default)s")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                   help="seed of the data and of the fit (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--separation", type=_positive_float, default=6.0,
                   help="minimum distance between means in standard deviations "
                        "(default %(default)s)")
    p.add_argument("--out", metavar="DIR",
                   help="keep the data in DIR/data.zarr (default: a temporary directory)")
    _add_fit_options(p, n_components_required=False)
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_quickstart)

