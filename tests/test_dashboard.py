"""The live ``/dmix`` page (dmix/dashboard.py) on a real cluster, rendered by headless Chromium.

A fit on a ``LocalCluster`` of worker processes runs in a thread, slowed by a monitor that
sleeps, while Chromium loads ``/dmix``, runs its script (which fetches ``/dmix/data.json``)
and dumps the DOM and a screenshot. The screenshot is kept in ``tests/artifacts/`` (git-ignored).

Chromium must be installed (``chromium`` or ``chromium-browser``; ``.ci/run`` installs Debian's
package): without it the browser test fails, unless ``DMIX_NO_BROWSER=1`` is set, which skips
it. Every other test here needs no browser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

import dmix
from dmix import dashboard
from dmix.cli._common import _say_dashboard
from dmix.engine.loop import Monitor

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PNG = b"\x89PNG\r\n\x1a\n"


class Slow(Monitor):
    """Sleeps after every iteration, so that the page can be looked at while the fit runs."""

    def __init__(self, seconds: float, fail_at: int | None = None):
        self.seconds, self.fail_at = seconds, fail_at

    def end_iteration(self, record) -> None:
        time.sleep(self.seconds)
        if record.iteration == self.fail_at:
            raise RuntimeError(f"stopped at iteration {record.iteration}")


def find_chromium() -> str:
    """The Chromium binary; skip with DMIX_NO_BROWSER=1, else fail where there is none."""
    if os.environ.get("DMIX_NO_BROWSER") == "1":
        pytest.skip("DMIX_NO_BROWSER=1: the headless Chromium test is switched off")
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed (neither 'chromium' nor 'chromium-browser' is on "
                "PATH): install it (Debian: apt-get install chromium; .ci/run does) or set "
                "DMIX_NO_BROWSER=1 to skip this test.")


def chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless=new", "--disable-gpu", "--no-sandbox",
                           "--virtual-time-budget=3000", *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.load(r)


def fit_data(client) -> dict:
    return get_json(dashboard.page_link(client) + "/data.json")


def fit_ids(client) -> set[str]:
    """The fits the page shows (none before dmix registered its plugin: then a 404)."""
    try:
        return {f["id"] for f in fit_data(client)["fits"]}
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return set()


def fit_of(client, fit_id: str) -> dict:
    return next(f for f in fit_data(client)["fits"] if f["id"] == fit_id)


def new_fit(client, before: set[str], timeout: float = 60) -> str:
    """The id of the fit that appears on the page and is not in ``before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = fit_ids(client) - before
        if fresh:
            return fresh.pop()
        time.sleep(0.1)
    raise AssertionError("no new fit appeared on /dmix/data.json")


def zarr_data(path: Path, n: int = 6000) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    x[: n // 2] += 3.0
    store = zarr.create_array(str(path), shape=x.shape, chunks=(1000, 2), dtype="float64")
    store[:] = x
    return str(path)


def start_fit(est, X, monitor):
    errors = []

    def target():
        try:
            est.fit(X, monitor=monitor)
        except Exception as exc:  # the main thread checks it
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_page_in_chromium_while_fitting(client, tmp_path):
    binary = find_chromium()
    X = zarr_data(tmp_path / "x.zarr")
    est = dmix.GaussianMixture(3, max_iter=30, tol=0.0, random_state=0, client=client,
                               chunk_size=1000, checkpoint=str(tmp_path / "ckpt"), checkpoint_every=2)
    before = fit_ids(client)
    thread, errors = start_fit(est, X, Slow(0.25))
    fit_id = new_fit(client, before)
    deadline = time.monotonic() + 60
    while fit_of(client, fit_id)["iteration"] < 3:
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.1)

    url = dashboard.page_link(client)
    tic = time.perf_counter()
    dom = chromium(binary, "--dump-dom", url).stdout
    print(f"chromium --dump-dom: {time.perf_counter() - tic:.1f} s")
    card = re.search(rf'<div class="fit" data-fit="{fit_id}" data-status="(\w+)">(.*?)'
                     r'(?=<div class="fit"|$)', dom, re.S)
    assert card, dom[-2000:]
    assert card.group(1) == "running"
    shown = int(re.search(r'<b class="iteration">(\d+) / 30</b>', card.group(2)).group(1))
    assert shown >= 3
    points = re.search(r'<polyline points="([^"]*)"', card.group(2)).group(1).split()
    assert len(points) >= 2 and all(re.fullmatch(r"[\d.]+,[\d.]+", p) for p in points)
    assert 'class="rows-per-second">' in card.group(2)
    assert re.search(r'class="checkpoint">\d+ saved \(every 2\)', card.group(2))
    assert card.group(2).count("<rect ") == 3  # one bar per component weight

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "dashboard.png"
    png.unlink(missing_ok=True)
    chromium(binary, f"--screenshot={png}", "--window-size=1200,800", url)
    print(f"screenshot of /dmix: {png}")
    data = png.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000

    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    fit = fit_of(client, fit_id)
    assert fit["status"] == ("converged" if est.converged_ else "did not converge")
    assert fit["lower_bounds"] == {"0": est.lower_bounds_}
    assert fit["iteration"] == est.n_iter_ == len(fit["seconds"]["0"])
    assert fit["lower_bound"] == est.lower_bound_
    np.testing.assert_allclose(fit["weights"], est.weights_, rtol=1e-12)
    assert fit["info"]["n_rows"] == 6000 and fit["info"]["n_blocks"] == 6
    assert fit["rows_per_second"] == pytest.approx(6000 / fit["seconds_per_iteration"])
    assert fit["checkpoint"]["last"] == est.checkpoints_[-1]
    assert fit["inits"]["0"]["n_iter"] == est.n_iter_


def test_data_json_matches_the_fit(client):
    X = np.random.default_rng(1).normal(size=(3000, 2))
    before = fit_ids(client)
    est = dmix.GaussianMixture(2, n_init=2, max_iter=5, tol=0.0, random_state=1,
                               client=client).fit(X)
    (fit_id,) = fit_ids(client) - before
    fit = fit_of(client, fit_id)
    assert fit["info"]["n_init"] == 2 and fit["info"]["estimator"] == "GaussianMixture"
    assert set(fit["lower_bounds"]) == {"0", "1"}
    assert est.lower_bounds_ in fit["lower_bounds"].values()
    assert all(len(v) == 5 for v in fit["lower_bounds"].values())
    assert fit["checkpoint"] is None
    # The fit's passes are grouped by iteration in the dashboard's spans.
    spans = client.run_on_scheduler(_span_names)
    assert ("dmix", fit_id, "iteration-5", "estep") in spans
    with urllib.request.urlopen(dashboard.page_link(client), timeout=30) as r:
        assert r.status == 200 and b"data.json" in r.read()


def _span_names(dask_scheduler) -> list:
    return [s.name for s in dask_scheduler.extensions["spans"].spans.values()]


def test_failed_fit_is_shown_failed(client):
    X = np.random.default_rng(2).normal(size=(2000, 2))
    before = fit_ids(client)
    with pytest.raises(RuntimeError, match="stopped at iteration 2"):
        dmix.GaussianMixture(2, max_iter=10, tol=0.0, client=client).fit(
            X, monitor=Slow(0.0, fail_at=2))
    (fit_id,) = fit_ids(client) - before
    fit = fit_of(client, fit_id)
    assert fit["status"] == "failed" and "stopped at iteration 2" in fit["error"]
    assert fit["iteration"] == 2


def _dmix_routes(dask_scheduler) -> int:
    app = dask_scheduler.http_application
    stack, n = [app.default_router], 0
    while stack:
        for rule in stack.pop().rules:
            if hasattr(rule.target, "rules"):
                stack.append(rule.target)
            n += "dmix" in getattr(getattr(rule.matcher, "regex", None), "pattern", "")
    return n


def test_registering_twice_is_harmless(client):
    assert dashboard.register(client) and dashboard.register(client)
    ids = [f["id"] for f in fit_data(client)["fits"]]
    client.register_plugin(dashboard.DmixDashboard(), name=dashboard.PLUGIN_NAME)
    # The running plugin, with the fits it holds, is kept; its routes are added once.
    assert [f["id"] for f in fit_data(client)["fits"]] == ids
    assert client.run_on_scheduler(_dmix_routes) == 2


def test_no_distributed_client_does_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the dashboard was used without a distributed client")

    monkeypatch.setattr(dashboard, "register", fail)
    monkeypatch.setattr(dashboard, "watch", fail)
    X = np.random.default_rng(3).normal(size=(500, 2))
    with dask.config.set(scheduler="sync"):
        est = dmix.GaussianMixture(2, max_iter=3, tol=0.0, random_state=0).fit(X)
    assert est.n_iter_ == 3


def test_page_link_and_cli_line(client, capsys):
    class Fake:
        dashboard_link = "http://example.org:8787/status"

    assert dashboard.page_link(Fake()) == "http://example.org:8787/dmix"
    _say_dashboard(client)
    out = capsys.readouterr().out
    assert f"dmix live page: {dashboard.page_link(client)}" in out
    assert dashboard.page_link(client).startswith("http://127.0.0.1:")
