"""The HTML report: its sections, its embedded figures, and its numbers against the model's."""

import base64
import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest

import dmix
from dmix.cli import main
from dmix.datasets import make_shape
from dmix.engine import History
from dmix.io.model import save_model
from dmix.io.preview import preview_rows
from dmix.io.source import as_source
from dmix.report import write_report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Sections (by id), images (their src), and every cell with a data-key, in order."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.links, self.cells = [], [], [], []
        self._key = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("src", "href"):
            if attrs.get(name) and not attrs[name].startswith("data:"):
                self.links.append(attrs[name])
        self._key = attrs.get("data-key") if tag == "td" else None

    def handle_data(self, data):
        if self._key is not None:
            self.cells.append((self._key, data))
            self._key = None


def _parse(path) -> _Page:
    text = open(path, encoding="utf-8").read()
    page = _Page()
    page.feed(text)
    # Self-contained: nothing fetched from elsewhere, no scripts, inline CSS only.
    assert page.links == [] and "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|url\(\s*["']?https?:""", text)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    return page


def _cell(page, key) -> str:
    return next(v for k, v in page.cells if k == key)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    return np.vstack([rng.normal(size=(400, 2)), rng.normal(size=(400, 2)) + 5])


def test_gaussian_2d_report_with_history_and_data(blobs, tmp_path):
    history = History()
    gm = dmix.GaussianMixture(2, n_init=2, random_state=0).fit(blobs, monitor=history)
    out = write_report(tmp_path / "r.html", gm, history=history, data=blobs, title="Blobs")
    assert out == tmp_path / "r.html"
    page = _parse(out)
    assert page.sections == ["fit", "loglik", "timing", "weights", "data"]
    # log-likelihood, seconds, weights, density: four figures.
    assert len(page.images) == 4
    assert float(_cell(page, "lower_bound")) == pytest.approx(gm.lower_bound_, abs=5e-7)
    assert _cell(page, "model") == "GaussianMixture"
    assert "covariance_type='full'" in _cell(page, "family")
    assert int(_cell(page, "n_iter")) == gm.n_iter_
    assert _cell(page, "converged") == ("yes" if gm.converged_ else "no")
    assert float(_cell(page, "bic")) == pytest.approx(gm.bic(blobs), rel=1e-9)
    assert float(_cell(page, "aic")) == pytest.approx(gm.aic(blobs), rel=1e-9)
    assert int(_cell(page, "n_samples")) == len(blobs)
    weights = [float(_cell(page, f"weight-{j}")) for j in range(2)]
    np.testing.assert_allclose(weights, gm.weights_, atol=5e-7)


def test_projection_report_of_5d_data_without_history(tmp_path):
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 4])
    gm = dmix.GaussianMixture(2, covariance_type="diag", random_state=0).fit(x)
    page = _parse(write_report(tmp_path / "r.html", gm, data=x))
    # No history: no timing figure, but the section says why.
    assert page.sections == ["fit", "loglik", "timing", "weights", "data"]
    assert len(page.images) == 3
    text = open(tmp_path / "r.html").read()
    assert "Projection" in text and "principal components of the data" in text
    assert "Not recorded" in text
    assert float(_cell(page, "lower_bound")) == pytest.approx(gm.lower_bound_, abs=5e-7)


def test_squared_mixture_report_shows_negative_weights(tmp_path):
    x = make_shape("donut", 2000, seed=0).rows(0, 2000)
    c = np.cov(x.T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq = dmix.SquaredGaussianMixture(
            3, random_state=0, max_iter=0, weights_init=[1.0, -1.0, 0.2],
            means_init=np.zeros((3, 2)), covariances_init=np.array([c, 0.5 * c, 0.7 * c]),
        ).fit(x)
    assert (sq.weights_ < 0).sum() == 1
    page = _parse(write_report(tmp_path / "sq.html", sq, data=x))
    assert len(page.images) == 2  # weights, density (max_iter=0: no iteration to plot)
    weights = [float(_cell(page, f"weight-{j}")) for j in range(3)]
    np.testing.assert_allclose(weights, sq.weights_, atol=5e-7)
    assert weights[1] == pytest.approx(-1.0)
    assert "1 negative weight(s), in red" in open(tmp_path / "sq.html").read()
    assert _cell(page, "model") == "SquaredGaussianMixture"


def test_selection_report_tabulates_the_grid(blobs, tmp_path):
    sel = dmix.select(blobs, [1, 2, 3], ["full", "spherical"], random_state=0)
    page = _parse(write_report(tmp_path / "sel.html", sel.best, selection=sel))
    assert page.sections == ["fit", "loglik", "timing", "weights", "selection", "data"]
    # log-likelihood, seconds per shared pass, weights, BIC grid, density
    assert len(page.images) == 5
    assert len(sel.pass_seconds) == max(row["n_iter"] for row in sel.table)
    assert all(s > 0 for s in sel.pass_seconds)
    first = [k for k, _ in page.cells].index("covariance_type") - 1  # after the fit's table
    table = [(k, v) for k, v in page.cells[first:]
             if k in ("n_components", "covariance_type", "bic", "aic", "log_likelihood")]
    shown = [dict(table[i:i + 5]) for i in range(0, len(table), 5)]
    assert len(shown) == len(sel.table) == 6
    for row, expected in zip(shown, sel.table, strict=True):
        assert int(row["n_components"]) == expected["n_components"]
        assert row["covariance_type"] == expected["covariance_type"]
        for key in ("bic", "aic", "log_likelihood"):
            assert float(row[key]) == pytest.approx(expected[key], abs=5e-7)
    text = open(tmp_path / "sel.html").read()
    assert f"K = {sel.best.n_components}, {sel.best.covariance_type}" in text
    assert (f"The 6 models of the selection iterate together, one pass over the data for "
            f"all: {len(sel.pass_seconds)} pass(es), median "
            f"{np.median(sel.pass_seconds):.3f} s") in text


def test_preview_reads_a_bounded_sample_of_a_zarr_store(tmp_path):
    path = str(tmp_path / "d.zarr")
    assert main(["make-data", path, "-n", "30000", "-d", "2", "-k", "2",
                 "--chunk-size", "1000"]) == 0
    rows = preview_rows(path, max_rows=800)
    assert rows.shape == (800, 2)
    x = as_source(path).array.compute()
    # Eight windows of 100 rows, the first at row 0 and the last ending at the last row.
    np.testing.assert_array_equal(rows[:100], x[:100])
    np.testing.assert_array_equal(rows[-100:], x[-100:])


def test_dmix_report_command(tmp_path, capsys):
    data = str(tmp_path / "d.zarr")
    model = str(tmp_path / "model")
    assert main(["make-data", data, "-n", "3000", "-d", "3", "-k", "2",
                 "--chunk-size", "500"]) == 0
    gm = dmix.GaussianMixture(2, random_state=0).fit(data)
    save_model(gm, model)
    capsys.readouterr()
    out = str(tmp_path / "report.html")
    assert main(["report", model, "--data", data, "--output", out]) == 0
    assert f"to {out}" in capsys.readouterr().out
    page = _parse(out)
    assert page.sections == ["fit", "loglik", "timing", "weights", "data"]
    assert len(page.images) == 3
    assert float(_cell(page, "lower_bound")) == pytest.approx(gm.lower_bound_, abs=5e-7)
    assert float(_cell(page, "bic")) == pytest.approx(gm.bic(data), rel=1e-9)
    # Without data: no BIC, and the projection is of the component means.
    assert main(["report", model, "-o", out]) == 0
    page = _parse(out)
    assert "bic" not in dict(page.cells)
    assert "principal components of the component means" in open(out).read()
