"""A live ``/dmix`` page in the Dask dashboard: every running fit's progress.

How it works:

- :class:`DmixDashboard`, a scheduler plugin, adds two Tornado routes to the scheduler's HTTP
  application (``scheduler.http_application``, distributed's ``RoutingApplication``, which
  also serves ``/status`` and the other dashboard pages): ``/dmix``, one self-contained HTML
  page whose inline script polls ``/dmix/data.json`` every second, and ``/dmix/data.json``.
- The driver of a fit (:func:`watch`, used by ``BaseMixture.fit`` when it runs on a
  ``distributed.Client``) registers the plugin once per client and sends one small event per
  iteration with ``client.log_event("dmix", {...})``. The scheduler hands every event to its
  plugins (``SchedulerPlugin.log_event``); the plugin keeps the last :attr:`max_fits` fits.
- The whole fit runs inside ``distributed.span("dmix", fit_id)`` and every iteration inside a
  child span ``iteration-N`` (:func:`dmix.engine.reduce.iteration_span`), so the dashboard's
  Fine Performance Metrics group the tasks by fit and iteration.

The scheduler must be able to import dmix (true for every local cluster); where it cannot,
registration fails with a logged warning and the fit goes on without the page.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
import weakref
from collections import OrderedDict

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from dmix._dashboard_page import PAGE
from dmix.engine.loop import Monitor, block_progress
from dmix.engine.reduce import span

__all__ = ["TOPIC", "DashboardMonitor", "DmixDashboard", "page_link", "register", "watch"]

logger = logging.getLogger(__name__)

#: The event topic of dmix's messages (``client.get_events("dmix")`` lists them too).
TOPIC = "dmix"
PLUGIN_NAME = "dmix-dashboard"

# -- the scheduler side ---------------------------------------------------------------------


def _finite(x):
    """``x`` as a float, or None where JSON has no number (inf, nan)."""
    x = float(x)
    return x if math.isfinite(x) else None


class DmixDashboard(SchedulerPlugin):
    """Serves ``/dmix`` and ``/dmix/data.json`` from the scheduler's dashboard.

    Parameters
    ----------
    max_fits : int, default=20
        Fits kept in memory, the newest ones (a finished fit stays until pushed out).
    max_iterations : int, default=100_000
        Iteration records kept per fit; older ones are dropped past it.
    """

    name = PLUGIN_NAME
    #: Registering again (a second client, a second fit) keeps the running plugin.
    idempotent = True

    def __init__(self, max_fits: int = 20, max_iterations: int = 100_000):
        self.max_fits = max_fits
        self.max_iterations = max_iterations
        self.fits: OrderedDict[str, dict] = OrderedDict()

    async def start(self, scheduler) -> None:
        app = getattr(scheduler, "http_application", None)
        if app is None:  # a scheduler started without its HTTP server
            return
        prefix = _http_prefix(app)
        app.add_handlers(r".*", [
            (rf"{prefix}dmix/data\.json", DataHandler, {"plugin": self}),
            (rf"{prefix}dmix/?", PageHandler, {"plugin": self}),
        ])

    def log_event(self, topic: str, msg) -> None:
        if topic == TOPIC and isinstance(msg, dict) and isinstance(msg.get("fit"), str):
            self.record(msg)

    def record(self, msg: dict) -> None:
        """Apply one event of a fit (kinds ``start``, ``resumed``, ``iteration``,
        ``end_init`` and ``end``)."""
        kind, fit_id = msg.get("kind"), msg["fit"]
        fit = self.fits.get(fit_id)
        if fit is None:
            fit = self.fits[fit_id] = {
                "id": fit_id, "info": {}, "status": "running", "started": msg.get("time"),
                "updated": msg.get("time"), "records": [], "weights": None,
                "checkpoint": None, "inits": {}, "resumed": None, "error": None,
            }
            while len(self.fits) > self.max_fits:
                self.fits.popitem(last=False)
        fit["updated"] = msg.get("time", fit["updated"])
        if msg.get("checkpoint") is not None:
            fit["checkpoint"] = msg["checkpoint"]
        if kind == "start":
            fit["info"] = msg.get("info", {})
        elif kind == "resumed":
            fit["resumed"] = {k: msg.get(k) for k in ("name", "init", "iteration")}
        elif kind == "iteration":
            fit["records"].append({k: msg.get(k) for k in (
                "init", "iteration", "lower_bound", "change", "seconds", "time")})
            del fit["records"][:-self.max_iterations]
            if msg.get("weights") is not None:
                fit["weights"] = msg["weights"]
        elif kind == "end_init":
            fit["inits"][str(msg.get("init"))] = {k: msg.get(k) for k in (
                "converged", "n_iter", "lower_bound", "seconds")}
        elif kind == "end":
            fit["status"] = msg.get("status", "finished")
            fit["error"] = msg.get("error")

    def snapshot(self) -> dict:
        """What ``/dmix/data.json`` serves: the fits, newest first, with their curves."""
        return {"time": time.time(), "fits": [_summary(f) for f in reversed(self.fits.values())]}


def _summary(fit: dict) -> dict:
    records, info = fit["records"], fit["info"]
    curves: dict[str, list] = {}
    seconds: dict[str, list] = {}
    for r in records:
        curves.setdefault(str(r["init"]), []).append(r["lower_bound"])
        seconds.setdefault(str(r["init"]), []).append(r["seconds"])
    last = records[-1] if records else None
    n_rows = info.get("n_rows")
    per_iter = last["seconds"] if last else None
    return {
        "id": fit["id"], "info": info, "status": fit["status"], "error": fit["error"],
        "started": fit["started"], "updated": fit["updated"], "resumed": fit["resumed"],
        "iteration": max((r["iteration"] for r in records), default=0),
        "lower_bound": last["lower_bound"] if last else None,
        "change": last["change"] if last else None,
        "seconds_per_iteration": per_iter,
        "rows_per_second": (n_rows / per_iter) if n_rows and per_iter else None,
        "lower_bounds": curves, "seconds": seconds, "weights": fit["weights"],
        "checkpoint": fit["checkpoint"], "inits": fit["inits"],
    }


def _http_prefix(app) -> str:
    """The prefix of the scheduler's routes (``Scheduler(http_prefix=...)``), found from its
    ``/health`` route; ``/`` by default."""
    stack = [app.default_router]
    while stack:
        for rule in stack.pop().rules:
            target = rule.target
            if hasattr(target, "rules"):
                stack.append(target)
            pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", "")
            found = re.fullmatch(r"(.*/)health\$?", pattern)
            if found:
                return found.group(1)
    return "/"


class DataHandler(web.RequestHandler):
    """``/dmix/data.json``: :meth:`DmixDashboard.snapshot`."""

    def initialize(self, plugin: DmixDashboard) -> None:
        self.plugin = plugin

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(self.plugin.snapshot(), allow_nan=False))


class PageHandler(web.RequestHandler):
    """``/dmix``: the page (:data:`dmix._dashboard_page.PAGE`), which polls ``data.json``."""

    def initialize(self, plugin: DmixDashboard) -> None:
        self.plugin = plugin

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE)


def dask_setup(scheduler) -> None:
    """``dask scheduler --preload dmix.dashboard``: the page from the scheduler's start."""
    scheduler.add_plugin(DmixDashboard())


# -- the driver side ------------------------------------------------------------------------

#: Clients that registered the plugin, with the scheduler they registered it on.
_registered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scheduler_id(client):
    return (client.scheduler_info() or {}).get("id") or client.scheduler.address


def register(client) -> bool:
    """Register :class:`DmixDashboard` on ``client``'s scheduler, once per client (again after
    the client moved to another scheduler). Returns whether the page is served; a scheduler
    that cannot import dmix gives False and a logged warning."""
    sid = _scheduler_id(client)
    if _registered.get(client) == sid:
        return True
    try:
        client.register_plugin(DmixDashboard(), name=PLUGIN_NAME)
    except Exception as exc:  # e.g. ModuleNotFoundError on a scheduler without dmix
        logger.warning("dmix: no /dmix page on the scheduler %s: %s", sid, exc)
        return False
    _registered[client] = sid
    return True


def page_link(client) -> str:
    """The page's address, from ``client.dashboard_link`` (``http://HOST:PORT/status``)."""
    link = client.dashboard_link
    base = link[: -len("status")] if link.endswith("/status") else link.rstrip("/") + "/"
    return base + "dmix"


class DashboardMonitor(Monitor):
    """Forwards every call to ``inner`` and sends the iteration to the scheduler.

    ``send(kind, **fields)`` publishes one event; ``checkpoint`` (a
    :class:`dmix.io.checkpoint.CheckpointDir` or None) gives the checkpoint status.
    """

    def __init__(self, inner: Monitor, send, checkpoint=None):
        self.inner, self.send, self.checkpoint = inner, send, checkpoint

    def checkpoint_status(self) -> dict | None:
        ckpt = self.checkpoint
        if ckpt is None:
            return None
        saved = list(ckpt.saved)
        return {"url": str(ckpt.url), "every": int(ckpt.every), "saved": len(saved),
                "last": saved[-1] if saved else None}

    def resumed(self, directory, name, init, iteration) -> None:
        self.inner.resumed(directory, name, init, iteration)
        self.send("resumed", name=name, init=int(init), iteration=int(iteration))

    def begin_init(self, init) -> None:
        self.inner.begin_init(init)

    @property
    def wants_block_progress(self) -> bool:
        """Blocks are counted only for an inner monitor that shows them."""
        return block_progress(self.inner) is not None

    def pass_started(self, n_rows, n_blocks) -> None:
        self.inner.pass_started(n_rows, n_blocks)

    def block_done(self, rows) -> None:
        self.inner.block_done(rows)

    def end_iteration(self, record) -> None:
        # Sent first: the page shows the iteration even if the inner monitor fails.
        weights = getattr(record, "weights", None)
        self.send("iteration", init=int(record.init), iteration=int(record.iteration),
                  lower_bound=_finite(record.lower_bound), change=_finite(record.change),
                  seconds=float(record.seconds),
                  weights=None if weights is None else [float(w) for w in weights],
                  checkpoint=self.checkpoint_status())
        self.inner.end_iteration(record)

    def end_init(self, init, result, seconds) -> None:
        self.inner.end_init(init, result, seconds)
        self.send("end_init", init=int(init), converged=bool(result.converged),
                  n_iter=int(result.n_iter), lower_bound=_finite(result.lower_bound),
                  seconds=float(seconds), checkpoint=self.checkpoint_status())


class _Sender:
    """``send(kind, **fields)``: ``client.log_event`` of one event; after a failure it logs a
    warning and sends nothing more (the page is not worth stopping a fit for)."""

    def __init__(self, client, fit_id: str):
        self.client, self.fit_id, self.broken = client, fit_id, False

    def __call__(self, kind: str, **fields) -> None:
        if self.broken:
            return
        msg = {"kind": kind, "fit": self.fit_id, "time": time.time(), **fields}
        try:
            self.client.log_event(TOPIC, msg)
        except Exception as exc:
            self.broken = True
            logger.warning("dmix: could not send progress to the scheduler: %s", exc)


def _info(estimator, source, n_init: int) -> dict:
    n_rows, n_features = (int(n) for n in source.shape)
    return {"estimator": type(estimator).__name__,
            "n_components": int(getattr(estimator, "n_components", 0) or 0),
            "n_init": int(n_init), "max_iter": int(getattr(estimator, "max_iter", 0) or 0),
            "tol": float(getattr(estimator, "tol", 0.0) or 0.0), "n_rows": n_rows,
            "n_features": n_features, "source": str(source.description),
            "n_blocks": int(source.array.numblocks[0])}


@contextlib.contextmanager
def watch(client, monitor: Monitor, *, estimator, source, n_init: int = 1, checkpoint=None):
    """The monitor a fit should use: ``monitor`` itself without a ``distributed.Client``;
    with one, a :class:`DashboardMonitor` over it that feeds the ``/dmix`` page, the
    plugin registered, and the fit inside ``span("dmix", fit_id)``. The page shows the fit
    finished (converged or not) or failed when the block ends."""
    if client is None:
        yield monitor
        return
    register(client)
    fit_id = f"{type(estimator).__name__}-{uuid.uuid4().hex[:8]}"
    send = _Sender(client, fit_id)
    watcher = DashboardMonitor(monitor, send, checkpoint)
    send("start", info=_info(estimator, source, n_init), checkpoint=watcher.checkpoint_status())
    try:
        with span("dmix", fit_id):
            yield watcher
    except BaseException as exc:
        send("end", status="failed", error=f"{type(exc).__name__}: {exc}"[:500],
             checkpoint=watcher.checkpoint_status())
        raise
    converged = getattr(estimator, "converged_", None)
    status = {True: "converged", False: "did not converge"}.get(converged, "finished")
    send("end", status=status, checkpoint=watcher.checkpoint_status())

