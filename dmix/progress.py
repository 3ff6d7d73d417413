"""Progress of a fit: per-iteration lines, a live bar over the rows of each pass, JSON lines,
and a notebook display. Each is a :class:`~dmix.engine.loop.Monitor`, given to
``fit(X, monitor=...)``::

    gm.fit("data.zarr", monitor=dmix.progress.NotebookProgress())

The bar counts the rows whose E-step has finished within the current pass
(:meth:`~dmix.engine.loop.Monitor.block_done`, fed by the engine as blocks finish) and
estimates the time left in the pass from the rows per second so far (the previous pass's rate
before the first block finishes).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import sys
import time

from dmix.engine.loop import IterationRecord, Monitor

__all__ = ["JsonProgress", "NotebookProgress", "TextProgress", "bar_text"]


def _seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


def bar_text(label: str, done: int, total: int, elapsed: float, *, rate: float | None = None,
             width: int = 24) -> str:
    """One line of the live bar: ``label``, the bar (none if ``width`` is 0), percent, rows,
    rows/s and the ETA.

    ``rate`` (rows per second) is used for the ETA before any row is done; afterwards the
    rate is ``done / elapsed``.
    """
    frac = done / total if total else 1.0
    filled = int(round(width * frac))
    if done and elapsed > 0:
        rate = done / elapsed
    eta = (total - done) / rate if rate else math.inf
    speed = f"{rate:,.0f} rows/s" if rate else "- rows/s"
    drawn = f"[{'#' * filled}{'.' * (width - filled)}] " if width else ""
    return (f"{label} {drawn}{100 * frac:3.0f}%  {done:,}/{total:,} rows  {speed}  "
            f"ETA {_seconds(eta)}")


class _PassCounter(Monitor):
    """Counts the rows of the current pass; remembers the last pass's rate for early ETAs."""

    def __init__(self):
        self.rows_total = self.rows_done = 0
        self.pass_tic = time.perf_counter()
        self.last_rate: float | None = None

    def pass_started(self, n_rows: int, n_blocks: int) -> None:
        if self.rows_done and self.rows_total:  # the previous pass, finished
            elapsed = time.perf_counter() - self.pass_tic
            self.last_rate = self.rows_done / elapsed if elapsed > 0 else None
        self.rows_total, self.rows_done = int(n_rows), 0
        self.pass_tic = time.perf_counter()

    def block_done(self, rows: int) -> None:
        self.rows_done += int(rows)

    def pass_bar(self, label: str, width: int = 24) -> str:
        return bar_text(label, self.rows_done, self.rows_total,
                        time.perf_counter() - self.pass_tic, rate=self.last_rate, width=width)


class TextProgress(_PassCounter):
    """Prints one line per EM iteration: number, mean log-likelihood per row, change, seconds;
    on a terminal, also a live bar of the current pass (one line, redrawn with ``\\r``).

    Parameters
    ----------
    n_init : int, default=1
        Number of initialisations (a heading is printed per initialisation when more than 1).
    init_params : str, optional
        Name of the initialisation method, for the heading.
    file : file-like, optional
        Where to print; default ``sys.stdout`` (looked up at each call).
    bar : bool, optional
        Draw the live bar; default: when ``file`` is a terminal (``isatty()``).
    min_interval : float, default=0.1
        Seconds between redraws of the bar (the last block of a pass always redraws).
    """

    def __init__(self, n_init: int = 1, init_params: str | None = None, file=None,
                 bar: bool | None = None, min_interval: float = 0.1):
        super().__init__()
        self.n_init = n_init
        self.init_params = init_params
        self.file = file
        self.bar = bar
        self.min_interval = min_interval
        self._header = False
        self._shown = 0  # characters of the bar now on the line (0: none)
        self._drawn_at = -math.inf
        self._iteration = 1

    @property
    def _out(self):
        return self.file or sys.stdout

    def _bar_on(self) -> bool:
        if self.bar is None:
            isatty = getattr(self._out, "isatty", None)
            self.bar = bool(isatty and isatty())
        return self.bar

    def _clear(self) -> None:
        if self._shown:
            self._out.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _print(self, text: str) -> None:
        self._clear()
        print(text, file=self._out, flush=True)

    def _draw(self) -> None:
        label = f"{'pass' if self.n_init > 1 else 'iter'} {self._iteration:>4d}"
        text = self.pass_bar(label)
        self._out.write("\r" + text + " " * max(0, self._shown - len(text)))
        self._out.flush()
        self._shown = max(self._shown, len(text))  # what the clearing must cover
        self._drawn_at = time.perf_counter()

    def pass_started(self, n_rows: int, n_blocks: int) -> None:
        super().pass_started(n_rows, n_blocks)
        if self._bar_on():
            self._draw()

    def block_done(self, rows: int) -> None:
        super().block_done(rows)
        if self._bar_on() and (self.rows_done >= self.rows_total or
                               time.perf_counter() - self._drawn_at >= self.min_interval):
            self._draw()

    def resumed(self, directory: str, name: str, init: int, iteration: int) -> None:
        self._print(f"Resuming from the checkpoint {name} in {directory}: initialization "
                    f"{init + 1}/{self.n_init} after iteration {iteration}")
        self._resumed = init
        self._iteration = iteration + 1

    def begin_init(self, init: int) -> None:
        how = f" ({self.init_params})" if self.init_params else ""
        if init == getattr(self, "_resumed", None):
            how = " (resumed from the checkpoint)"
        else:
            self._iteration = 1
        self._print(f"Initialization {init + 1}/{self.n_init}{how}...")
        self._header = False

    def end_iteration(self, record: IterationRecord) -> None:
        # Restarts run side by side (one pass for all): a column says whose line it is.
        init = self.n_init > 1
        if not self._header:
            self._print(("  init" if init else "") + f"{'iter':>6}  {'log-likelihood':>16}  "
                        f"{'change':>11}  {'seconds':>8}")
            self._header = True
        self._print((f"{record.init + 1:>6d}" if init else "") + f"{record.iteration:>6d}  "
                    f"{record.lower_bound:>16.6f}  {record.change:>11.3e}  "
                    f"{record.seconds:>8.3f}")
        self._iteration = record.iteration + 1

    def end_init(self, init: int, result, seconds: float) -> None:
        state = "converged" if result.converged else "did not converge"
        self._print(f"Initialization {init + 1}/{self.n_init} {state} after {result.n_iter} "
                    f"iterations ({seconds:.2f} s): lower bound {result.lower_bound:.6f}")


def _finite(value):
    """JSON has no inf or nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonProgress(_PassCounter):
    """One JSON object per line and iteration: the :class:`~dmix.engine.loop.IterationRecord`
    fields (``init``, ``iteration``, ``lower_bound``, ``change``, ``seconds``, and whatever
    else the record carries), plus ``rows`` (rows of the iteration's pass) and
    ``rows_per_second``. Non-finite numbers (the first change) are ``null``.

    Parameters
    ----------
    file : file-like, optional
        Where to write; default ``sys.stdout`` (looked up at each call).
    """

    def __init__(self, file=None):
        super().__init__()
        self.file = file

    def end_iteration(self, record: IterationRecord) -> None:
        line = {key: _finite(value) for key, value in dataclasses.asdict(record).items()}
        rows = self.rows_done if self.rows_total else None
        line["rows"] = rows
        line["rows_per_second"] = (rows / record.seconds if rows and record.seconds > 0
                                   else None)
        print(json.dumps(line), file=self.file or sys.stdout, flush=True)


def _ipython_display():
    """IPython's ``display`` when running under an IPython kernel or shell, else None."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    return display if get_ipython() is not None else None


class NotebookProgress(TextProgress):
    """Progress in a notebook: a bar of the current pass and the last iterations, updated in
    place through IPython's display; plain text (:class:`TextProgress`) outside IPython.

    Parameters
    ----------
    n_init : int, default=1
    last : int, default=5
        Iterations shown in the table below the bar.
    min_interval : float, default=0.25
        Seconds between redraws while a pass runs.
    display : callable, optional
        ``display(obj, display_id=True)`` returning a handle with ``update(obj)``; default
        IPython's, when IPython runs.
    """

    def __init__(self, n_init: int = 1, last: int = 5, min_interval: float = 0.25,
                 display=None):
        super().__init__(n_init=n_init, min_interval=min_interval)
        self.last = last
        self._display = display or _ipython_display()
        self._handle = None
        self._records: list[IterationRecord] = []

    def html(self) -> str:
        """The HTML shown: the pass's bar, then the last ``last`` iterations."""
        total = max(self.rows_total, 1)
        bar = html.escape(self.pass_bar("", width=0).strip())
        rows = "".join(
            f"<tr><td>{r.init + 1}</td><td>{r.iteration}</td><td>{r.lower_bound:.6f}</td>"
            f"<td>{r.change:.3e}</td><td>{r.seconds:.3f}</td></tr>"
            for r in self._records[-self.last:])
        return (f"<div><b>iteration {self._iteration}</b> "
                f"<progress value='{self.rows_done}' max='{total}' style='width:40%'>"
                f"</progress> <code>{bar}</code>"
                "<table><tr><th>init</th><th>iter</th><th>log-likelihood</th><th>change</th>"
                f"<th>seconds</th></tr>{rows}</table></div>")

    def _render(self) -> None:
        from IPython.display import HTML

        if self._handle is None:
            self._handle = self._display(HTML(self.html()), display_id=True)
        else:
            self._handle.update(HTML(self.html()))
        self._drawn_at = time.perf_counter()

    def pass_started(self, n_rows: int, n_blocks: int) -> None:
        if self._display is None:
            return super().pass_started(n_rows, n_blocks)
        _PassCounter.pass_started(self, n_rows, n_blocks)
        self._render()

    def block_done(self, rows: int) -> None:
        if self._display is None:
            return super().block_done(rows)
        _PassCounter.block_done(self, rows)
        if time.perf_counter() - self._drawn_at >= self.min_interval:
            self._render()

    def end_iteration(self, record: IterationRecord) -> None:
        if self._display is None:
            return super().end_iteration(record)
        self._records.append(record)
        self._iteration = record.iteration + 1
        self._render()

    def begin_init(self, init: int) -> None:
        if self._display is None:
            return super().begin_init(init)
        self._iteration = 1

    def end_init(self, init: int, result, seconds: float) -> None:
        if self._display is None:
            return super().end_init(init, result, seconds)
