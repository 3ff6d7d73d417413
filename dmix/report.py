"""A fitted model as one self-contained HTML page: the fit's table, the log-likelihood and the
seconds of every iteration, the component weights, the criteria of a model selection, and
the model over (a sample of) its data.

Everything is in the one file: inline CSS, figures as base64 PNG ``data:`` URIs drawn with
matplotlib's Agg canvas, no scripts and no external resources, so the page can be mailed,
archived, or opened offline::

    dmix.report.write_report("fit.html", gm, data="data.zarr", history=history)
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from collections import defaultdict

import numpy as np

from dmix import _report_plots as plots
from dmix.errors import DmixError

__all__ = ["write_report"]

#: Rows of the data read for the scatter plots (a bounded sample, see ``preview_rows``).
SAMPLE_ROWS = 5000
#: Points per side of the grid the 2-D log-density is evaluated on.
GRID_POINTS = 120

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 60em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
border-bottom: 1px solid #ddd; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { font-weight: bold; background: #f3f8ff; } img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
"""


def _img(fig, alt: str) -> str:
    data = base64.b64encode(plots.png(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value, fmt: str = ".6f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return format(float(value), fmt)


def _row(label: str, key: str, value) -> str:
    shown = value if isinstance(value, str) else _num(value)
    cls = "" if isinstance(value, str) else ' class="num"'
    return (f'<tr><th>{html.escape(label)}</th><td{cls} data-key="{key}">'
            f"{html.escape(shown)}</td></tr>")


def _family_options(est) -> str:
    from dmix.families.base import family_spec

    spec = family_spec(est._family)
    return ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name")


def _data_scores(est, data) -> dict:
    """Rows, total log-likelihood, BIC and AIC of ``est`` on ``data`` (one streamed pass)."""
    from dmix.io.source import as_source

    n = as_source(data).shape[0]
    loglik = est.score(data) * n
    p = est._n_parameters()
    return {"n": n, "loglik": loglik, "bic": -2 * loglik + p * math.log(n),
            "aic": -2 * loglik + 2 * p, "n_parameters": p}


def _fit_section(est, scores: dict | None) -> str:
    weights = np.asarray(est.weights_)
    rows = [
        _row("model", "model", type(est).__name__),
        _row("family options", "family", _family_options(est)),
        _row("components", "n_components", int(weights.size)),
        _row("features", "n_features", int(est.n_features_in_)),
        _row("iterations", "n_iter", int(est.n_iter_)),
        _row("converged", "converged", bool(est.converged_)),
        _row("lower bound (mean log-likelihood per row)", "lower_bound",
             float(est.lower_bound_)),
        _row("fit seconds", "fit_seconds", getattr(est, "fit_seconds_", None)),
    ]
    if getattr(est, "n_reseeded_", 0):
        rows.append(_row("components re-seeded", "n_reseeded", int(est.n_reseeded_)))
    if scores is not None:
        rows += [
            _row("rows of the data", "n_samples", int(scores["n"])),
            _row("free parameters", "n_parameters", int(scores["n_parameters"])),
            _row("log-likelihood of the data (sum)", "loglik", scores["loglik"]),
            _row("BIC", "bic", scores["bic"]),
            _row("AIC", "aic", scores["aic"]),
        ]
    return (f'<section id="fit"><h2>Fit</h2><table>{"".join(rows)}</table></section>')


def _by_init(records, field: str) -> dict[int, list[float]]:
    out = defaultdict(list)
    for r in records:
        out[r.init].append(getattr(r, field))
    return dict(out)


def _history_sections(est, records, selection=None) -> str:
    kept = [float(v) for v in getattr(est, "lower_bounds_", [])]
    runs = _by_init(records, "lower_bound") if records else {}
    # One restart whose bounds are the kept run's: draw it once.
    if len(runs) == 1 and np.allclose(next(iter(runs.values())), kept):
        runs = {}
    out = ['<section id="loglik"><h2>Log-likelihood per iteration</h2>']
    if kept or runs:
        out.append(_img(plots.loglik_figure(runs, kept), "log-likelihood per iteration"))
        out.append(f'<p class="note">{len(kept)} iteration(s) of the kept run'
                   + (f", {len(runs)} restart(s) recorded" if runs else "") + ".</p>")
    else:
        out.append('<p class="note">No iteration recorded.</p>')
    out.append('</section><section id="timing"><h2>Seconds per iteration</h2>')
    seconds = _by_init(records, "seconds") if records else {}
    passes = list(getattr(selection, "pass_seconds", None) or [])
    if seconds:
        every = [s for v in seconds.values() for s in v]
        out.append(_img(plots.seconds_figure(seconds), "seconds per iteration"))
        out.append(f'<p class="note">median {np.median(every):.3f} s, max '
                   f"{np.max(every):.3f} s per iteration.</p>")
    elif passes:  # a selection: every model's iteration shares one pass over the data
        out.append(_img(plots.seconds_figure({0: passes}, label="all models"),
                        "seconds per pass"))
        out.append(f'<p class="note">The {len(selection.table)} models of the selection '
                   f"iterate together, one pass over the data for all: {len(passes)} "
                   f"pass(es), median {np.median(passes):.3f} s, max "
                   f"{np.max(passes):.3f} s.</p>")
    else:
        out.append('<p class="note">Not recorded: pass the records of a '
                   "<code>dmix.engine.History</code> monitor (<code>history=</code>).</p>")
    out.append("</section>")
    return "".join(out)


def _weights_section(est) -> str:
    weights = np.asarray(est.weights_, dtype=np.float64)
    negative = int(np.sum(weights < 0))
    note = (f"{negative} negative weight(s), in red (a squared mixture subtracts those "
            "components)." if negative else "")
    cells = "".join(f'<td class="num" data-key="weight-{j}">{w:.6f}</td>'
                    for j, w in enumerate(weights))
    table = ("<table><tr><th>component</th>"
             + "".join(f"<th>{j}</th>" for j in range(weights.size))
             + f"</tr><tr><th>weight</th>{cells}</tr></table>" if weights.size <= 16 else "")
    return ('<section id="weights"><h2>Component weights</h2>'
            + _img(plots.weights_figure(weights), "component weights")
            + table + (f'<p class="note">{note}</p>' if note else "") + "</section>")


def _selection_section(selection) -> str:
    best = (selection.best.n_components, selection.best.covariance_type)
    head = ("K", "covariance", "parameters", "log-likelihood", "BIC", "AIC", "ICL",
            "converged", "iterations")
    keys = ("n_components", "covariance_type", "n_parameters", "log_likelihood", "bic", "aic",
            "icl", "converged", "n_iter")
    lines = []
    for row in selection.table:
        mark = (row["n_components"], row["covariance_type"]) == best
        cells = "".join(
            f'<td class="num" data-key="{k}">{_num(row[k])}</td>' if k != "covariance_type"
            else f'<td data-key="{k}">{html.escape(row[k])}</td>' for k in keys)
        lines.append(f'<tr{" class=best" if mark else ""}>{cells}</tr>')
    return ('<section id="selection"><h2>Model selection</h2>'
            + _img(plots.selection_figure(selection.table), "BIC and AIC per model")
            + f'<p class="note">Chosen by {selection.criterion.upper()} (lower is better): '
            f"K = {best[0]}, {html.escape(best[1])} (bold).</p>"
            + "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(lines) + "</table></section>")


def _covariances(est, d: int):
    """The components' covariance matrices (K, D, D), or None if the model has none."""
    cov = getattr(est, "covariances_", None)
    if cov is None:
        return None
    cov, k = np.asarray(cov, dtype=np.float64), np.asarray(est.weights_).size
    kind = str(getattr(est, "covariance_type", "full"))
    if kind.startswith("tied"):
        cov = np.broadcast_to(cov, (k, *cov.shape))
        kind = kind[len("tied_"):] if kind != "tied" else "full"
    if kind == "full":
        return cov if cov.shape == (k, d, d) else None
    if kind == "diag" and cov.shape == (k, d):
        return cov[:, :, None] * np.eye(d)
    if kind == "spherical" and cov.shape == (k,):
        return cov[:, None, None] * np.eye(d)
    return None


def _grid_range(sample, means, covs):
    if sample is not None and len(sample):
        low, high = sample.min(axis=0), sample.max(axis=0)
    else:
        spread = (np.sqrt(np.max(np.diagonal(covs, axis1=1, axis2=2), axis=0))
                  if covs is not None else np.ones(means.shape[1]))
        low, high = means.min(axis=0) - 3 * spread, means.max(axis=0) + 3 * spread
    pad = 0.05 * np.maximum(high - low, 1e-9)
    return low - pad, high + pad


def _data_section(est, data) -> str:
    from dmix.io.preview import preview_rows

    means = np.asarray(getattr(est, "means_", None), dtype=np.float64)
    weights = np.asarray(est.weights_, dtype=np.float64)
    d = int(est.n_features_in_)
    if means.ndim != 2 or means.shape[1] != d:
        return ""
    sample = preview_rows(data, SAMPLE_ROWS) if data is not None else None
    covs = _covariances(est, d)
    n_shown = 0 if sample is None else len(sample)
    if d == 1:
        return ""
    if d == 2:
        low, high = _grid_range(sample, means, covs)
        gx, gy = np.meshgrid(np.linspace(low[0], high[0], GRID_POINTS),
                             np.linspace(low[1], high[1], GRID_POINTS))
        try:
            z = np.asarray(est.score_samples(np.column_stack([gx.ravel(), gy.ravel()])))
            z = z.reshape(gx.shape)
        except DmixError:  # a log-density that is not finite on the grid
            z = None
        fig = plots.density_figure(gx, gy, z, sample, means, weights)
        what = "Contours of the log-density (<code>score_samples</code>) over a grid"
        title = "Density"
    else:
        if data is not None:
            from dmix.engine.init import data_moments
            from dmix.io.source import as_source

            _, center, cov = data_moments(as_source(data).array)
            source = "of the data (a streamed pass)"
        else:
            w = np.abs(weights) / np.abs(weights).sum()
            center = w @ means
            cov = (means - center).T @ ((means - center) * w[:, None])
            source = "of the component means"
        values, vectors = np.linalg.eigh(cov)
        axes = vectors[:, ::-1][:, :2]  # the two largest
        share = values[::-1][:2] / max(values.sum(), 1e-300)
        names = [f"PC{i + 1} ({100 * s:.0f}% of the variance)" for i, s in enumerate(share)]
        sample2 = None if sample is None else (sample - center) @ axes
        covs2 = None if covs is None else axes.T @ covs @ axes
        fig = plots.projection_figure(sample2, (means - center) @ axes, covs2, weights, names)
        what = f"The first two principal components {source}, with the component means"
        what += " and their two-standard-deviation ellipses" if covs is not None else ""
        title = "Projection"
    note = (f"{what}; {n_shown:,} rows of the data drawn (a bounded sample of evenly spaced "
            "windows)." if n_shown else f"{what}; no data given.")
    note += " Means are crosses sized by |weight|; negative components in red."
    return (f'<section id="data"><h2>{title}</h2>{_img(fig, title)}'
            f'<p class="note">{note}</p></section>')


def write_report(path, estimator, *, history=None, data=None, selection=None,
                 title: str | None = None):
    """Write an HTML report of a fitted ``estimator`` to ``path``: one self-contained file.

    Parameters
    ----------
    path : str or os.PathLike
        The HTML file to write (replaced if it exists).
    estimator : fitted dmix mixture
        ``GaussianMixture``, ``SquaredGaussianMixture``, ... (or a model loaded with
        :func:`dmix.load`).
    history : dmix.engine.History or list of IterationRecord, optional
        The records of the fit's monitor: every restart's log-likelihood and the seconds of
        every iteration (without it, only the kept run's lower bounds are known).
    data : array-like, dask array, zarr array, or path/URL of a Zarr array, optional
        The data: one streamed pass for the log-likelihood, BIC and AIC (and one for the
        principal components when there are more than 2 features); at most
        :data:`SAMPLE_ROWS` rows are read for the plots.
    selection : dmix.Selection, optional
        A :func:`dmix.select` result: its criteria are plotted and tabulated.
    title : str, optional
        Heading of the page; default the model's class and number of components.

    Returns
    -------
    path
        ``path``, as given.
    """
    if not hasattr(estimator, "weights_"):
        raise DmixError(f"This {type(estimator).__name__} is not fitted: there is nothing to "
                        "report. Call 'fit' first.")
    records = getattr(history, "records", history)
    k = np.asarray(estimator.weights_).size
    title = title or f"{type(estimator).__name__}, {k} components"
    scores = _data_scores(estimator, data) if data is not None else None
    body = [_fit_section(estimator, scores), _history_sections(estimator, records, selection),
            _weights_section(estimator)]
    if selection is not None:
        body.append(_selection_section(selection))
    body.append(_data_section(estimator, data))
    from dmix import __version__

    written = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f'<p class="meta">dmix {__version__} report, written {written}</p>'
            + "".join(body) + "</body></html>\n")
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(page)
    return path
