"""Progress: per-block counts from the engine, the live bar, JSON lines, quiet, notebooks."""

import io
import json
import re

import numpy as np
import pytest

import dmix
from dmix.cli import main
from dmix.engine.loop import IterationRecord, Monitor, block_progress
from dmix.io.model import load_model
from dmix.progress import JsonProgress, NotebookProgress, TextProgress, bar_text

N, CHUNK = 6000, 500
ITERATION_LINE = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(\S+)\s+(\d+\.\d+)\s*$", re.MULTILINE)


class Passes(Monitor):
    """Rows and blocks announced and counted per pass."""

    def __init__(self):
        self.passes = []

    def pass_started(self, n_rows, n_blocks):
        self.passes.append({"n_rows": n_rows, "n_blocks": n_blocks, "rows": 0, "blocks": 0})

    def block_done(self, rows):
        self.passes[-1]["rows"] += rows
        self.passes[-1]["blocks"] += 1


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    return np.vstack([rng.normal(size=(N // 2, 2)), rng.normal(size=(N // 2, 2)) + 4])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("progress") / "d.zarr")
    assert main(["make-data", path, "-n", str(N), "-d", "2", "-k", "2", "--seed", "1",
                 "--chunk-size", str(CHUNK)]) == 0
    return path


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def test_only_monitors_that_count_blocks_get_block_progress():
    assert block_progress(None) is None
    assert block_progress(Monitor()) is None
    assert block_progress(TextProgress()) is not None
    assert block_progress(Passes()) is not None


@pytest.mark.parametrize("n_init", [1, 2])
def test_block_counts_sum_to_the_rows_of_every_pass(x, n_init):
    """Counted on the local scheduler; restarts side by side share one pass per iteration."""
    passes = Passes()
    options = dict(chunk_size=CHUNK, n_init=n_init, random_state=0, max_iter=6, tol=0.0)
    gm = dmix.GaussianMixture(2, **options).fit(x, monitor=passes)
    assert len(passes.passes) == gm.n_iter_ == 6
    assert all(p == {"n_rows": N, "n_blocks": N // CHUNK, "rows": N, "blocks": N // CHUNK}
               for p in passes.passes)
    plain = dmix.GaussianMixture(2, **options).fit(x)
    assert gm.lower_bounds_ == plain.lower_bounds_  # bit for bit: counting changes nothing
    np.testing.assert_array_equal(gm.means_, plain.means_)


def test_block_counts_with_a_distributed_client(x, scheduler):
    from distributed import Client

    with Client(scheduler) as client:
        for split_every in (None, 4):  # the leaves as the top, and under reduce tasks
            passes = Passes()
            options = dict(chunk_size=CHUNK, random_state=0, max_iter=3, tol=0.0,
                           client=client, split_every=split_every)
            gm = dmix.GaussianMixture(2, **options).fit(x, monitor=passes)
            assert [p["rows"] for p in passes.passes] == [N] * 3
            assert [p["blocks"] for p in passes.passes] == [N // CHUNK] * 3
            assert gm.lower_bounds_ == dmix.GaussianMixture(2, **options).fit(x).lower_bounds_


def test_fit_json_prints_one_line_per_iteration(store, scheduler, capsys, tmp_path):
    model = str(tmp_path / "model")
    status = main(["fit", store, "-k", "2", "--seed", "0", "--max-iter", "5", "--tol", "0",
                   "--chunk-size", str(CHUNK), "--scheduler", scheduler, "--json",
                   "--output", model])
    out, err = capsys.readouterr()
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]  # stdout holds only JSON
    fitted = load_model(model)
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5]
    assert [r["lower_bound"] for r in lines] == fitted.lower_bounds_
    assert lines[0]["change"] is None  # -inf -> null
    assert lines[1]["change"] == pytest.approx(lines[1]["lower_bound"] - lines[0]["lower_bound"])
    for r in lines:
        assert r["init"] == 0 and r["rows"] == N and r["seconds"] > 0
        assert r["rows_per_second"] == pytest.approx(N / r["seconds"])
        assert {"n_reseeded", "inverse_temperature"} <= set(r)
    assert "Converged" in err and "Data:" in err  # the other messages, on stderr


def test_fit_quiet_prints_no_progress(store, scheduler, capsys):
    status = main(["fit", store, "-k", "2", "--seed", "0", "--max-iter", "3",
                   "--scheduler", scheduler, "--quiet"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert not ITERATION_LINE.search(out) and "Initialization" not in out
    assert "Lower bound" in out  # the result is still printed


def test_quiet_and_json_exclude_each_other(store, capsys):
    assert main(["fit", store, "-k", "2", "--quiet", "--json"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_bar_text():
    assert (bar_text("iter 1", 250, 1000, 2.0, width=8)
            == "iter 1 [##......]  25%  250/1,000 rows  125 rows/s  ETA 6.0 s")
    # Before any row: the previous pass's rate gives the ETA; without one, it is unknown.
    assert bar_text("iter 2", 0, 1000, 0.0, rate=500.0, width=4).endswith("500 rows/s  ETA 2.0 s")
    assert bar_text("iter 2", 0, 1000, 0.0, width=4).endswith("- rows/s  ETA ?")
    assert bar_text("", 5, 10, 1.0, width=0) == "  50%  5/10 rows  5 rows/s  ETA 1.0 s"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _record(iteration, lower_bound=-1.5, change=0.25):
    return IterationRecord(0, iteration, lower_bound, change, 0.5)


def test_live_bar_on_a_terminal():
    tty = FakeTerminal()
    monitor = TextProgress(file=tty, min_interval=0.0)
    monitor.begin_init(0)
    monitor.pass_started(1000, 4)
    for _ in range(4):
        monitor.block_done(250)
    monitor.end_iteration(_record(1))
    text = tty.getvalue()
    bars = re.findall(r"\r(iter +1 \[[#.]{24}\] +(\d+)%  ([\d,]+)/1,000 rows)", text)
    assert [int(b[1]) for b in bars] == [0, 25, 50, 75, 100]
    assert [b[2] for b in bars] == ["0", "250", "500", "750", "1,000"]
    # The bar is cleared before the iteration's line, which keeps the non-terminal format.
    width = max(len(b) for b in re.findall(r"\r(iter[^\r]*)", text))
    assert "\r" + " " * width + "\r  iter    log-likelihood" in text
    assert ITERATION_LINE.search(text).groups() == ("1", "-1.500000", "2.500e-01", "0.500")
    # The next pass's bar is labelled with the next iteration.
    monitor.pass_started(1000, 4)
    assert tty.getvalue().endswith("\r" + tty.getvalue().rsplit("\r", 1)[1])
    assert "iter    2 [" in tty.getvalue().rsplit("\r", 1)[1]


def test_no_bar_when_not_a_terminal():
    out = io.StringIO()
    monitor = TextProgress(file=out)
    monitor.begin_init(0)
    monitor.pass_started(1000, 4)
    monitor.block_done(1000)
    monitor.end_iteration(_record(1))
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines()[1:] == [
        "  iter    log-likelihood       change   seconds",
        "     1         -1.500000    2.500e-01     0.500"]


def test_json_progress_without_block_counts():
    out = io.StringIO()
    JsonProgress(file=out).end_iteration(_record(3, change=float("-inf")))
    line = json.loads(out.getvalue())
    assert line["iteration"] == 3 and line["change"] is None
    assert line["rows"] is None and line["rows_per_second"] is None


class FakeHandle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, obj):
        self.shown.append(obj.data)


def test_notebook_progress_updates_one_display(x):
    pytest.importorskip("IPython")
    shown = []

    def display(obj, display_id):
        assert display_id is True
        shown.append(obj.data)
        return FakeHandle(shown)

    monitor = NotebookProgress(display=display, min_interval=0.0)
    gm = dmix.GaussianMixture(2, chunk_size=CHUNK, random_state=0, max_iter=3, tol=0.0)
    gm.fit(x, monitor=monitor)
    # Per iteration: the pass's start, 12 blocks and the record; one display, then updates.
    assert len(shown) == 3 * (1 + N // CHUNK + 1)
    assert f"<progress value='{N}' max='{N}'" in shown[-2]
    last = shown[-1]
    assert last.count("<tr><td>") == 3
    assert f"{gm.lower_bounds_[-1]:.6f}" in last


def test_notebook_progress_falls_back_to_text(capsys):
    monitor = NotebookProgress(display=None)
    monitor._display = None  # as outside IPython
    monitor.begin_init(0)
    monitor.end_iteration(_record(1))
    assert ITERATION_LINE.search(capsys.readouterr().out)
