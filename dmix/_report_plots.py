"""The figures of :mod:`dmix.report`, drawn with matplotlib's Agg canvas (no display, no
pyplot state) and returned as PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np

from dmix.errors import DmixError

#: Positive weights, negative weights (squared mixtures), the kept run.
BLUE, RED, DARK = "#1f77b4", "#d62728", "#222222"


def _figure(width: float = 6.4, height: float = 3.4):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DmixError("The report needs matplotlib: pip install 'dmix[report]'.") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, explicitly: no window, no pyplot
    return fig


def png(fig) -> bytes:
    """``fig`` as PNG bytes (without the PNG's 'Software' text, which holds a URL)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def loglik_figure(runs: dict[int, list[float]], kept: list[float]):
    """Mean log-likelihood per iteration: every restart of ``runs`` ({init: bounds}), and
    the kept run ``kept`` in bold."""
    fig = _figure()
    ax = fig.add_subplot()
    for init, bounds in sorted(runs.items()):
        ax.plot(np.arange(1, len(bounds) + 1), bounds, lw=1, alpha=0.7, marker=".",
                label=f"restart {init + 1}")
    if kept:
        ax.plot(np.arange(1, len(kept) + 1), kept, lw=2.2, color=DARK, label="kept run")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean log-likelihood per row")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def seconds_figure(runs: dict[int, list[float]], label: str | None = None):
    """Wall-clock seconds per iteration, one line per restart (or one line called
    ``label``)."""
    fig = _figure(height=2.8)
    ax = fig.add_subplot()
    for init, seconds in sorted(runs.items()):
        ax.plot(np.arange(1, len(seconds) + 1), seconds, marker=".", lw=1,
                label=label or f"restart {init + 1}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def weights_figure(weights: np.ndarray):
    """A bar per component; negative weights (squared mixtures) below zero, in red."""
    fig = _figure(height=2.8)
    ax = fig.add_subplot()
    k = np.arange(weights.size)
    ax.bar(k, weights, color=np.where(weights < 0, RED, BLUE))
    ax.axhline(0, color=DARK, lw=0.8)
    ax.set_xlabel("component")
    ax.set_ylabel("weight")
    if weights.size <= 32:
        ax.set_xticks(k)
    return fig


def selection_figure(table: list[dict]):
    """BIC (solid) and AIC (dashed) against the number of components, a line per covariance
    type."""
    fig = _figure()
    ax = fig.add_subplot()
    for cov in dict.fromkeys(row["covariance_type"] for row in table):
        rows = sorted((r for r in table if r["covariance_type"] == cov),
                      key=lambda r: r["n_components"])
        ks = [r["n_components"] for r in rows]
        line, = ax.plot(ks, [r["bic"] for r in rows], marker="o", label=f"BIC {cov}")
        ax.plot(ks, [r["aic"] for r in rows], ls="--", color=line.get_color(), alpha=0.6,
                label=f"AIC {cov}")
    ax.set_xlabel("components")
    ax.set_ylabel("criterion (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _ellipses(ax, means2, covs2, weights):
    """Two-standard-deviation ellipses of 2-D covariances ``covs2`` (K, 2, 2)."""
    from matplotlib.patches import Ellipse

    for mean, cov, w in zip(means2, covs2, weights, strict=True):
        values, vectors = np.linalg.eigh(cov)
        values = np.clip(values, 0, None)
        angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
        ax.add_patch(Ellipse(mean, 4 * math.sqrt(values[1]), 4 * math.sqrt(values[0]),
                             angle=angle, fill=False, lw=1.2, color=RED if w < 0 else DARK))


def _means(ax, means2, weights):
    size = 30 + 300 * np.abs(weights) / max(np.abs(weights).max(), 1e-12)
    ax.scatter(means2[:, 0], means2[:, 1], s=size, c=np.where(weights < 0, RED, DARK),
               marker="X", edgecolors="white", linewidths=0.8, zorder=3)


def density_figure(grid_x, grid_y, log_density, sample, means, weights):
    """Contours of the log-density over a grid, with the data sample and the means."""
    fig = _figure(width=6.0, height=5.0)
    ax = fig.add_subplot()
    if sample is not None and len(sample):
        ax.scatter(sample[:, 0], sample[:, 1], s=3, alpha=0.3, color="#7f7f7f", lw=0)
    if log_density is not None:
        z = np.where(np.isfinite(log_density), log_density, np.nan)
        low, high = np.nanpercentile(z, 2), np.nanmax(z)
        levels = np.linspace(low, high, 14) if high > low else 10
        cs = ax.contour(grid_x, grid_y, z, levels=levels, cmap="viridis", linewidths=1)
        fig.colorbar(cs, ax=ax, label="log-density")
    _means(ax, means, weights)
    ax.set_xlabel("feature 0")
    ax.set_ylabel("feature 1")
    return fig


def projection_figure(sample2, means2, covs2, weights, axis_names):
    """The data sample and the components projected on two axes."""
    fig = _figure(width=6.0, height=5.0)
    ax = fig.add_subplot()
    if sample2 is not None and len(sample2):
        ax.scatter(sample2[:, 0], sample2[:, 1], s=3, alpha=0.3, color="#7f7f7f", lw=0)
    if covs2 is not None:
        _ellipses(ax, means2, covs2, weights)
    _means(ax, means2, weights)
    ax.autoscale_view()
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    return fig
