"""Running a pipeline: data -> cluster -> fit (or select) -> evaluate -> outputs -> report.

Every stage prints one or two lines; :func:`run_pipeline` returns a summary dict that says
what was read, fitted and written.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import numpy as np

from dmix import __version__
from dmix.errors import InvalidParameterError
from dmix.pipeline.schema import Pipeline, load_pipeline

__all__ = ["plan", "run_pipeline"]


def _say(text: str) -> None:
    from dmix.cli._common import _say as say  # one printing helper for every command

    say(text)


def _cpu_count() -> int:
    from dmix.engine.cluster import cpu_count

    return cpu_count()


# -- paths ------------------------------------------------------------------------------------


def _output_paths(p: Pipeline) -> dict:
    """``{label: {"model": path or None, "labels": ..., "scores": ...}, "report": ...}``.

    One model writes into ``outputs.directory``; compared models each into a subdirectory
    named by their label (the report stays at the top)."""
    out = p.outputs
    top = out["directory"] or os.path.join("dmix-out", p.name)
    names = {"model": "model", "labels": "labels.zarr", "scores": "scores.zarr"}
    paths = {"directory": top}
    for m in p.models:
        base = top if len(p.models) == 1 else os.path.join(top, m["label"])
        paths[m["label"]] = {
            key: (None if out[key] is False else
                  os.path.join(base, names[key] if out[key] is True else out[key]))
            for key in names}
    report = out["report"]
    paths["report"] = (None if report is False else
                       os.path.join(top, "report.html" if report is True else report))
    return paths


def _store(p: Pipeline, paths: dict) -> str:
    return p.data["store"] or os.path.join(paths["directory"], "data.zarr")


def _checkpoint_dir(p: Pipeline, label: str) -> str | None:
    if p.checkpoint is None:
        return None
    root = p.checkpoint["directory"]
    return root if len(p.models) == 1 else os.path.join(root, label)


# -- estimators -------------------------------------------------------------------------------


def _estimator(p: Pipeline, model: dict, client=None, *, selection: bool = False):
    """The estimator of one ``[model]`` with the checkpoint and cluster settings; option
    values are checked here, and an error names the key's line in the file."""
    options = dict(model["options"])
    if p.cluster["gpus"] is not None and "device" not in options:
        options["device"] = "cuda"  # gpus = ... computes on them, as dmix fit --gpus does
    ckpt = _checkpoint_dir(p, model["label"])
    if ckpt is not None and not selection:
        options.update(checkpoint=ckpt, checkpoint_every=p.checkpoint["every"],
                       checkpoint_keep=p.checkpoint["keep"])
    if selection:
        options.setdefault("n_components", min(p.selection["n_components"]))
    try:
        est = model["cls"](**options, client=client)
        est._check_parameters()
    except (InvalidParameterError, TypeError, ValueError) as exc:
        key = next((k for k in model["options"] if f"'{k}'" in str(exc)), None)
        p._checker.fail("model", key, f"[model] {model['label']}: {exc}",
                        p.models.index(model))
    return est


def _describe_options(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# -- the plan ---------------------------------------------------------------------------------


def plan(p: Pipeline) -> list[str]:
    """What :func:`run_pipeline` would do, one line per step (``dmix run --dry-run``)."""
    paths = _output_paths(p)
    d = p.data
    store = _store(p, paths)
    if d["generate"] == "mixture":
        what = (f"generate a Gaussian mixture: {d['n_samples']} rows x {d['n_features']} "
                f"features, {d['n_components']} components, seed {d['seed']} -> {store}")
    elif d["generate"] == "shape":
        what = f"generate the 2-D shape {d['shape']!r}: {d['n_samples']} rows -> {store}"
    elif d["ingest"] is not None:
        what = f"ingest {d['ingest']} -> {store}"
    else:
        what = f"read {d['path']}" + (f" (array {d['array']})" if d["array"] else "")
    lines = [f"data:       {what}"]
    if d["holdout_fraction"]:
        lines.append(f"holdout:    the last {d['holdout_fraction']:.0%} of the rows are scored, "
                     "not fitted")
    c = p.cluster
    if c["address"]:
        lines.append(f"cluster:    the scheduler at {c['address']}")
    elif c["gpus"] is not None:
        lines.append(f"cluster:    a local CUDA cluster, gpus = {c['gpus']}")
    else:
        lines.append(f"cluster:    a local cluster of {c['n_workers'] or _cpu_count()} "
                     f"worker(s) x {c['threads_per_worker']} thread(s), memory_limit "
                     f"{c['memory_limit']}")
    for m in p.models:
        _estimator(p, m, selection=p.selection is not None)  # option errors in a dry run too
        lines.append(f"model:      {m['label']}: {m['cls'].__name__}("
                     f"{_describe_options(m['options'])})")
    if p.selection is not None:
        s = p.selection
        lines.append(f"selection:  n_components {s['n_components']} x covariance types "
                     f"{s['covariance_types']}, by {s['criterion']}")
    if p.checkpoint is not None:
        lines.append(f"checkpoint: {p.checkpoint['directory']} (every {p.checkpoint['every']},"
                     f" resume {str(p.checkpoint['resume']).lower()})")
    for m in p.models:
        written = [f"{k} {v}" for k, v in paths[m["label"]].items() if v]
        lines.append(f"outputs:    {m['label']}: " + (", ".join(written) or "none"))
    if paths["report"]:
        lines.append(f"report:     {paths['report']}")
    return lines


# -- stages -----------------------------------------------------------------------------------


def _data(p: Pipeline, store: str) -> tuple[str, dict]:
    """Generate or ingest the data when the pipeline says so; return the data path and a
    description. A store written earlier from the same settings is reused."""
    from dmix.io.ingest import expand_files, ingest, ingest_signature, read_attr, write_attr

    d = p.data
    if d["path"] is not None:
        path = d["path"] if not d["array"] else f"{d['path'].rstrip('/')}/{d['array']}"
        return path, {"source": "path", "path": path, "reused": True}
    if d["generate"] is not None:
        keys = (("n_samples", "n_features", "n_components", "separation")
                if d["generate"] == "mixture" else ("n_samples", "shape"))
        settings = {"generate": d["generate"], **{k: d[k] for k in keys},
                    **{k: d[k] for k in ("seed", "chunk_size", "dtype")}}
    else:
        files = expand_files(d["ingest"])
        settings = {"ingest": ingest_signature(files, d["columns"], d["dtype"]),
                    "chunk_size": d["chunk_size"], "delimiter": d["delimiter"]}
    if read_attr(store, "dmix_pipeline_data") == settings:
        _say(f"[data] reusing {store} (written earlier from the same settings)")
        return store, {"source": d["generate"] or "ingest", "path": store, "reused": True}
    tic = time.perf_counter()
    if d["generate"] is not None:
        from dmix.cli.train import _write_dataset
        from dmix.datasets import make_mixture, make_shape

        if d["generate"] == "mixture":
            dataset = make_mixture(d["n_samples"], d["n_features"], d["n_components"],
                                   d["seed"], dtype=d["dtype"], separation=d["separation"])
        else:
            dataset = make_shape(d["shape"], d["n_samples"], d["seed"], dtype=d["dtype"])
        _write_dataset(store, dataset, d["chunk_size"], None, d["overwrite"],
                       min(4, _cpu_count()))
    else:
        x = ingest(files, store, chunk_size=d["chunk_size"], dtype=d["dtype"],
                   columns=d["columns"], delimiter=d["delimiter"], overwrite=d["overwrite"])
        _say(f"[data] ingested {len(files)} file(s) into {store}: X {x.shape} {x.dtype} in "
             f"{time.perf_counter() - tic:.2f} s")
    write_attr(store, "dmix_pipeline_data", settings)
    return store, {"source": d["generate"] or "ingest", "path": store, "reused": False}


@contextlib.contextmanager
def _cluster(p: Pipeline, client=None):
    """The client of ``[cluster]``, or ``client`` when the caller gives one."""
    c = p.cluster
    if client is not None:
        yield client, "given"
        return
    if c["address"] is not None or c["gpus"] is not None:
        from dmix.cli._common import _dask_client

        with _dask_client(c["address"], None, c["dashboard_address"], c["gpus"]) as client:
            yield client, "address" if c["address"] else "gpus"
        return
    from dmix.engine.cluster import local_client

    memory = c["memory_limit"]
    with local_client(c["n_workers"], c["threads_per_worker"], memory,
                      c["dashboard_address"]) as client:
        n = len(client.scheduler_info()["workers"])
        _say(f"[cluster] local: {n} worker(s) x {c['threads_per_worker']} thread(s), "
             f"memory_limit {memory}; dashboard {client.dashboard_link}")
        yield client, "local"


def _fit(fit):
    """``fit()`` with warnings printed as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit()
    for w in caught:
        if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning):
            _say(f"  warning: {w.message}")
    return result


def _write_outputs(est, data: str, source, paths: dict, outputs: dict, client) -> dict:
    """Save the model; stream labels and log-densities to Zarr (as ``dmix predict`` and
    ``dmix score`` do). Returns the mean log-likelihood and the counts per component."""
    from dmix.io.model import save_model
    from dmix.io.output import write_arrays, write_predictions
    from dmix.io.targets import OUTPUT_ATTR, output_group

    result, n = {}, source.shape[0]
    if paths["model"]:
        save_model(est, paths["model"], overwrite=outputs["overwrite"], data={
            "source": data, "description": source.description, "shape": list(source.shape),
            "dtype": np.dtype(source.dtype).name})
    attrs = {"model": paths["model"], "data": data, "n_samples": n, "dmix_version": __version__}
    if paths["scores"]:
        with output_group(paths["scores"], overwrite=outputs["overwrite"], inputs=(data,),
                          what="the log-densities") as group:
            written = write_arrays(group, {"log_density": est.score_samples(data)},
                                   dtypes={"log_density": np.float64},
                                   summaries={"log_density": np.sum}, client=client)
            result["score"] = float(written.summaries["log_density"]) / n
            group.attrs[OUTPUT_ATTR] = {"command": "score", **attrs,
                                        "mean_log_likelihood": result["score"]}
    else:
        result["score"] = est.score(data)
    if paths["labels"]:
        with output_group(paths["labels"], overwrite=outputs["overwrite"], inputs=(data,),
                          what="the predictions") as group:
            written = write_predictions(group, est, data, proba=bool(outputs["proba"]),
                                        client=client)
            result["counts"] = np.asarray(written.summaries["labels"], np.int64).tolist()
            group.attrs[OUTPUT_ATTR] = {"command": "predict", **attrs,
                                        "proba": outputs["proba"], "counts": result["counts"]}
    return result


def _report(path, est, selection, history, data) -> str:
    """Write the HTML report with :func:`dmix.report.write_report` when this dmix has it.

    The outputs are written by then, so a failing report is said, not raised."""
    # ---- REPORT CALL SITE: the only call into dmix.report (written alongside this runner).
    try:
        from dmix.report import write_report
    except ImportError:
        return "skipped: this version of dmix has no dmix.report.write_report"
    try:
        write_report(path, est, history=history, data=data, selection=selection)
    except Exception as exc:  # noqa: BLE001 - the run's outputs are complete already
        return f"failed: {type(exc).__name__}: {exc}"
    return "written"


# -- the run ----------------------------------------------------------------------------------


def run_pipeline(pipeline, sets=(), *, dry_run: bool = False, client=None) -> dict:
    """Run a pipeline file end to end.

    Parameters
    ----------
    pipeline : str, os.PathLike or Pipeline
        A TOML file, TOML text, or a :class:`~dmix.pipeline.Pipeline`.
    sets : sequence of str
        ``section.key=value`` overrides (``dmix run --set``).
    dry_run : bool, default=False
        Validate and print the plan; write nothing.
    client : distributed.Client, optional
        Run on this client instead of the one ``[cluster]`` describes.

    Returns
    -------
    dict
        ``pipeline``, ``data`` (``path``, ``source``, ``n_samples``, ``n_features``,
        ``n_fit``, ``n_holdout``, ``reused``), ``cluster``, ``models`` (by label:
        ``estimator``, ``n_components``, ``converged``, ``n_iter``, ``iterations_run``
        (computed by this run: fewer than ``n_iter`` after a resume; None for a selection),
        ``lower_bound``,
        ``score`` (mean log-likelihood of every row), ``holdout_score``, ``counts``,
        ``fit_seconds``, and the paths ``model``, ``labels``, ``scores``), ``best`` (the label
        with the highest held-out score, else the highest score), ``compared_on``,
        ``selection`` (``criterion``, ``table``, ``best``) or None, ``report``,
        ``report_status`` and ``seconds``. A dry run returns ``plan`` (the lines printed).
    """
    from dmix.io.source import as_source

    tic = time.perf_counter()
    p = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline, sets)
    lines = plan(p)
    if dry_run:
        _say(f"dmix run {p.path}: the plan (dry run, nothing is written)")
        for line in lines:
            _say(f"  {line}")
        return {"pipeline": p.path, "dry_run": True, "plan": lines}
    paths = _output_paths(p)
    _say(f"dmix run {p.path}: {len(p.models)} model(s); outputs in {paths['directory']}")
    data, data_info = _data(p, _store(p, paths))
    first = p.models[0]["options"]
    source = as_source(data, chunk_size=first.get("chunk_size"))
    n, n_features = source.shape
    n_holdout = round(n * p.data["holdout_fraction"])
    fit_data = source.array[: n - n_holdout] if n_holdout else data
    test_data = source.array[n - n_holdout:] if n_holdout else None
    data_info.update(n_samples=n, n_features=n_features, n_fit=n - n_holdout,
                     n_holdout=n_holdout)
    _say(f"[data] {source.description}: {n} rows x {n_features} features"
         + (f"; {n_holdout} held out" if n_holdout else ""))
    summary = {"pipeline": p.path, "data": data_info, "models": {}, "selection": None}
    resume = bool(p.checkpoint and p.checkpoint["resume"])
    with _cluster(p, client) as (client, kind):
        summary["cluster"] = {"kind": kind, "n_workers": len(client.scheduler_info()["workers"]),
                              "dashboard": client.dashboard_link}
        fitted = {}
        for m in p.models:
            if p.selection is not None:
                from dmix.selection import select

                s = p.selection
                _estimator(p, m, client, selection=True)  # the option values, checked
                options = dict(m["options"])
                ckpt = _checkpoint_dir(p, m["label"])
                if ckpt is not None:
                    options.update(checkpoint=ckpt, resume=resume,
                                   checkpoint_every=p.checkpoint["every"],
                                   checkpoint_keep=p.checkpoint["keep"])
                t0 = time.perf_counter()
                sel = _fit(lambda: select(fit_data, s["n_components"], s["covariance_types"],
                                          criterion=s["criterion"], client=client, **options))
                est, seconds = sel.best, time.perf_counter() - t0
                _say(f"[select] {len(sel.table)} models in {seconds:.1f} s; best by "
                     f"{s['criterion']}: {est.n_components} component(s), "
                     f"{est.covariance_type}")
                for row in sel.to_string().splitlines():
                    _say(f"  {row}")
                summary["selection"] = {
                    "criterion": s["criterion"], "table": sel.table,
                    "best": {"n_components": est.n_components,
                             "covariance_type": est.covariance_type}}
                selection, history, ran = sel, None, None
            else:
                from dmix.engine.loop import History

                est, selection, history = _estimator(p, m, client), None, History()
                t0 = time.perf_counter()
                _fit(lambda est=est: est.fit(fit_data, resume=resume, monitor=history))
                seconds = time.perf_counter() - t0
                ran = len(history.records)
                resumed = (f" (resumed after iteration {est.n_iter_ - ran})"
                           if ran < est.n_iter_ else "")
                _say(f"[fit] {m['label']}: {type(est).__name__}, {est.n_iter_} iterations"
                     f"{resumed}, converged {str(bool(est.converged_)).lower()}, lower bound "
                     f"{est.lower_bound_:.6f} ({seconds:.1f} s)")
            info = {"estimator": type(est).__name__, "n_components": int(est.n_components),
                    "converged": bool(est.converged_), "n_iter": int(est.n_iter_),
                    # iterations this run computed (fewer than n_iter after a resume)
                    "iterations_run": ran,
                    "lower_bound": float(est.lower_bound_), "fit_seconds": seconds,
                    "holdout_score": None, **paths[m["label"]]}
            if test_data is not None:
                info["holdout_score"] = est.score(test_data)
                _say(f"[evaluate] {m['label']}: held-out mean log-likelihood "
                     f"{info['holdout_score']:.6f} over {n_holdout} rows")
            info.update(_write_outputs(est, data, source, paths[m["label"]], p.outputs, client))
            written = [k for k in ("model", "labels", "scores") if info[k]]
            _say(f"[outputs] {m['label']}: mean log-likelihood {info['score']:.6f}; wrote "
                 + (", ".join(f"{k} {info[k]}" for k in written) or "nothing"))
            summary["models"][m["label"]] = info
            fitted[m["label"]] = (est, selection, history)
        on = "holdout_score" if n_holdout else "score"
        best = max(summary["models"], key=lambda label: summary["models"][label][on])
        summary.update(best=best, compared_on="holdout" if n_holdout else "data")
        if len(p.models) > 1:
            _say(f"[compare] best by {'held-out' if n_holdout else 'full-data'} mean "
                 f"log-likelihood: {best} "
                 + " ".join(f"{k}={v[on]:.6f}" for k, v in summary["models"].items()))
        summary["report"] = paths["report"]
        if paths["report"]:
            summary["report_status"] = _report(paths["report"], *fitted[best], data)
            _say(f"[report] {paths['report']}: {summary['report_status']}")
        else:
            summary["report_status"] = "not asked for"
    summary["seconds"] = time.perf_counter() - tic
    _say(f"dmix run: done in {summary['seconds']:.1f} s; best model {best}")
    return summary
