"""dmix against its peers, side by side in one run, with this machine's ceilings.

Usage::

    python pipelines/bench/run.py --suite cpu                 # the whole suite (~40 min, 2 cores)
    python pipelines/bench/run.py --suite cpu --quick         # small shapes, 1 repeat: a smoke run
    python pipelines/bench/run.py --peers sklearn --covariances full --repeats 3

The command creates (once) the benchmark virtual environment of ``env.py`` -- the peers are not
dmix dependencies -- and re-runs itself inside it. It then

1. measures the machine's ceilings (``ceilings.py``: matrix products in float64 and float32,
   copy bandwidth, exp/log rates);
2. generates every dataset once (``data.py``): N = 1e6 rows with (D, K) = (16, 16) and N = 2e5
   with (D, K) = (64, 32), float64, on disk as ``.npy`` and as an uncompressed Zarr store;
3. runs, for each dataset and covariance type, every library in its own process, interleaved
   (dmix, dmix streamed from Zarr, scikit-learn, pomegranate, pycave, Spark, then again), and
   ``--repeats`` times; each process reports seconds per EM iteration from the same start
   (``run_dmix.py`` and ``peers.py`` say how they time), and this process samples the summed
   resident memory of its whole process tree (workers, JVM) every 20 ms for the peak;
4. writes ``<out>/cpu.json`` (every run, ceilings, machine), ``<out>/cpu.md`` (the tables the
   README quotes) and ``<out>/cpu.png``.

Achieved GFLOP/s are a nominal count over the measured time: the floating-point operations of
the textbook EM iteration, ``N K (2 D^2 + 7 D)`` for full covariances (whitening ``U^T (x -
mu)``, its squared norm, and the weighted second moments ``sum_i r_ik x_i x_i^T`` using their
symmetry) and ``9 N K D`` for diagonal ones; exp/log and the M-step are not counted. The same
count divides every library's time, so GFLOP/s rank them exactly as seconds do, and the
percentage of the machine's float64 matrix-product rate says how far each is from the hardware.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SHAPES = [(1_000_000, 16, 16), (200_000, 64, 32)]
QUICK_SHAPES = [(50_000, 16, 16), (20_000, 64, 32)]
RUNNERS = ["dmix", "dmix-zarr", "sklearn", "pomegranate", "pycave", "spark"]
FULL_ONLY = {"spark"}  # Spark ML has full covariances only


def nominal_flops(n: int, d: int, k: int, covariance: str) -> float:
    """Floating-point operations of one textbook EM iteration (see the module docstring)."""
    per_pair = 2 * d * d + 7 * d if covariance == "full" else 9 * d
    return float(n) * k * per_pair


# -- running one library, with its peak memory ---------------------------------------------------


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; return its last-line JSON with ``peak_rss_bytes`` and ``wall_s`` added."""
    import psutil

    tic = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=REPO)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(proc))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in proc.children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": err[-2000:]}
    finally:
        done.set()
        sampler.join()
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": err[-2000:]}
    result = json.loads(lines[-1])
    result["peak_rss_bytes"] = peak[0]
    result["wall_s"] = time.perf_counter() - tic
    return result


def command(runner: str, data: Path, covariance: str, n_iter: int) -> list[str]:
    if runner.startswith("dmix"):
        source = "zarr" if runner == "dmix-zarr" else "memory"
        return [sys.executable, str(HERE / "run_dmix.py"), "--data", str(data), "--covariance",
                covariance, "--n-iter", str(n_iter), "--source", source]
    return [sys.executable, str(HERE / "peers.py"), "--peer", runner, "--data", str(data),
            "--covariance", covariance, "--n-iter", str(n_iter)]


# -- summary -------------------------------------------------------------------------------------


def summarize(runs: list[dict], ceilings: dict) -> list[dict]:
    """One row per (shape, covariance, library): medians over the repeats, ratios to dmix."""
    peak64 = ceilings["float64_gflops"]["best"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["n"], r["d"], r["k"], r["covariance"], r["runner"]), []).append(r)
    rows = []
    for (n, d, k, cov, runner), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row = {"n": n, "d": d, "k": k, "covariance": cov, "library": runner,
               "repeats": len(ok), "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            s = [r["s_per_iter"] for r in ok]
            row.update(
                s_per_iter=statistics.median(s), s_min=min(s), s_max=max(s),
                peak_rss_gb=statistics.median(r["peak_rss_bytes"] for r in ok) / 1e9,
                dtype=ok[0]["dtype"], version=ok[0]["version"],
                lower_bound=ok[-1].get("lower_bound"), notes=ok[0].get("notes", []),
                setup_s={key: statistics.median(r["setup_s"].get(key, 0.0) for r in ok)
                         for key in ok[0].get("setup_s", {})},
            )
            row["gflops"] = nominal_flops(n, d, k, cov) / 1e9 / row["s_per_iter"]
            row["pct_float64_peak"] = 100 * row["gflops"] / peak64
        rows.append(row)
    for row in rows:
        dm = next((r for r in rows if r["library"] == "dmix" and all(
            r[key] == row[key] for key in ("n", "d", "k", "covariance"))), None)
        if dm and "s_per_iter" in dm and "s_per_iter" in row:
            row["vs_dmix"] = row["s_per_iter"] / dm["s_per_iter"]
    return rows


def _fmt_s(row) -> str:
    if "s_per_iter" not in row:
        return "failed: " + "; ".join(row["errors"])[:80]
    return f"{row['s_per_iter']:.3g} ({row['s_min']:.3g}-{row['s_max']:.3g})"


def ceiling_rows(c: dict) -> list[str]:
    """Markdown rows of the ceilings that ``ceilings.py`` measured."""
    rows = []
    for dtype in ("float64", "float32"):
        m = c[f"{dtype}_gflops"]
        rows.append(f"| {dtype} matrix product {m.get('n', '')}^3: NumPy / torch / best "
                    f"| {m['numpy']:.0f} / {m['torch']:.0f} / **{m['best']:.0f}** GFLOP/s |")
    if "tall_skinny_float64_gflops" in c:
        t = c["tall_skinny_float64_gflops"]
        rows.append(f"| float64 tall-skinny, {t['shape']}: best `X@W` / `X.T@X` "
                    f"| {t['best']['X@W']:.0f} / {t['best']['X.T@X']:.0f} GFLOP/s |")
    if "copy_GBps" in c:
        rows.append(f"| memory copy (read + write bytes) | {c['copy_GBps']['best']:.1f} GB/s |")
    for fn in ("exp", "log"):
        if fn in c.get("exp_log_Gelem_per_s", {}):
            r = c["exp_log_Gelem_per_s"][fn]["numpy"]
            rows.append(f"| float64 {fn}, NumPy: 1 thread / all threads "
                        f"| {r['1_thread']:.2f} / {r['all_threads']:.2f} G elements/s |")
    return rows


LABELS = {"dmix": "dmix", "dmix-zarr": "dmix, Zarr", "sklearn": "scikit-learn",
          "pomegranate": "pomegranate", "pycave": "pycave", "spark": "Spark ML"}


def side_by_side(summary: list[dict]) -> str:
    """One row per dataset and covariance type, one column per library: seconds per iteration
    and, in brackets, how many times dmix's (in memory) that is."""
    cases = sorted({(r["n"], r["d"], r["k"], r["covariance"]) for r in summary},
                   key=lambda c: (-c[0], c[3] != "full"))
    libs = [lib for lib in RUNNERS if any(r["library"] == lib for r in summary)]
    lines = ["| N x D x K | covariance | " + " | ".join(LABELS[lib] for lib in libs) + " |",
             "|---|---|" + "---|" * len(libs)]
    for n, d, k, cov in cases:
        cells = []
        for lib in libs:
            r = next((r for r in summary if (r["n"], r["d"], r["k"], r["covariance"], r["library"])
                      == (n, d, k, cov, lib)), None)
            if r is None:
                cells.append("-")
            elif "s_per_iter" not in r:
                cells.append("failed")
            elif lib == "dmix":
                cells.append(f"**{r['s_per_iter']:.3g}**")
            else:
                cells.append(f"{r['s_per_iter']:.3g} ({r['vs_dmix']:.1f}x)")
        lines.append(f"| {n:,} x {d} x {k} | {cov} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The tables of ``cpu.md``."""
    c = report["ceilings"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; machine: {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, {report['machine']['memory_gb']:.0f} GB; "
        f"{report['repeats']} repeats, {report['n_iter']} timed EM iterations per fit.",
        "",
        "Seconds per EM iteration (median of the repeats) and, in brackets, the ratio to dmix "
        "in memory (> 1: dmix is faster):",
        "",
        side_by_side(report["summary"]),
        "",
        "Seconds per EM iteration: median (min-max) over the repeats; `x dmix`: the library's "
        "median over dmix's (in memory); GFLOP/s: nominal textbook flops per second "
        "(see run.py); `% peak`: of the float64 matrix-product ceiling below; memory: peak "
        "resident set of the library's whole process tree.",
        "",
        "| N | D | K | covariance | library | dtype | s/iter | x dmix | GFLOP/s | % peak "
        "| peak memory GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        ratio = f"{r['vs_dmix']:.2f}" if "vs_dmix" in r else "-"
        gf = f"{r['gflops']:.1f}" if "gflops" in r else "-"
        pct = f"{r['pct_float64_peak']:.0f}%" if "gflops" in r else "-"
        mem = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "-"
        lines.append(f"| {r['n']:,} | {r['d']} | {r['k']} | {r['covariance']} | {r['library']} "
                     f"| {r.get('dtype', '-')} | {_fmt_s(r)} | {ratio} | {gf} | {pct} | {mem} |")
    lines += [
        "",
        "Machine ceilings measured in the same run (`ceilings.py`):",
        "",
        "| measure | value |",
        "|---|---|",
        *ceiling_rows(c),
    ]
    setups = [r for r in report["summary"] if r.get("setup_s")]
    lines += ["", "One-off costs (seconds, medians), not in the per-iteration times:", ""]
    for r in setups:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["setup_s"].items())
        lines.append(f"- {r['library']} {r['n']:,}x{r['d']}x{r['k']} {r['covariance']}: {parts}")
    notes = sorted({(r["library"], n) for r in report["summary"] for n in r.get("notes", [])})
    lines += ["", "Notes from the runners:", ""] + [f"- {lib}: {n}" for lib, n in notes]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Grouped bars of seconds per iteration (log scale), one group per dataset and type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["summary"] if "s_per_iter" in r]
    cases = sorted({(r["n"], r["d"], r["k"], r["covariance"]) for r in rows},
                   key=lambda c: (-c[0], c[3]))
    libs = [lib for lib in RUNNERS if any(r["library"] == lib for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(libs))
    for j, lib in enumerate(libs):
        xs, ys = [], []
        for i, case in enumerate(cases):
            r = next((r for r in rows if (r["n"], r["d"], r["k"], r["covariance"]) == case
                      and r["library"] == lib), None)
            if r:
                xs.append(i + (j - (len(libs) - 1) / 2) * width)
                ys.append(r["s_per_iter"])
        ax.bar(xs, ys, width, label=lib)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"N={n:,}\nD={d} K={k} {c}" for n, d, k, c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("seconds per EM iteration (log)")
    ax.set_title(f"Gaussian mixture EM, {report['machine']['cores']} cores "
                 f"({report['date'][:10]})")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, stem: str, report: dict, text: str, draw) -> None:
    """``<out>/<stem>.json``, ``.md`` (``text``, also printed) and ``.png`` (``draw(path)``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(text)
    draw(out / f"{stem}.png")
    print(text)


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "memory_gb": psutil.virtual_memory().total / 1e9, "python": platform.python_version()}


# -- main ----------------------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple[int, int, int]:
    n, d, k = (int(float(v)) for v in text.lower().split("x"))
    return n, d, k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and 1 repeat: checks that everything runs")
    parser.add_argument("--shapes", type=lambda s: [_parse_shape(v) for v in s.split(",")],
                        help="NxDxK,... (default: the suite's)")
    parser.add_argument("--covariances", default="full,diag")
    parser.add_argument("--peers", default=",".join(RUNNERS),
                        help=f"comma-separated subset of {','.join(RUNNERS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-iter", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per library run")
    parser.add_argument("--data-root", type=Path, default=HERE / ".data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--venv", type=Path, help="benchmark venv (default: env.py's)")
    parser.add_argument("--here", action="store_true",
                        help="use this Python as it is (it must have the peers asked for)")
    parser.add_argument("--from-json", type=Path,
                        help="only write the Markdown and the plot again from this report")
    args = parser.parse_args(argv)

    if not args.here:  # re-run inside the benchmark venv
        sys.path.insert(0, str(HERE))
        from env import ensure_env

        python = Path(ensure_env(args.venv))
        if Path(sys.executable).resolve() != python.resolve():
            argv = sys.argv[1:] if argv is None else list(argv)
            os.execv(str(python), [str(python), __file__, *argv, "--here"])

    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["summary"] = summarize(report["runs"], report["ceilings"])
        write_report(args.from_json.parent, args.from_json.stem, report, markdown(report),
                     lambda path: plot(report, path))
        return 0
    sys.path.insert(0, str(HERE))
    from data import prepare

    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    repeats = 1 if args.quick else args.repeats
    covariances = args.covariances.split(",")
    runners = [r for r in args.peers.split(",") if r]
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown --peers {unknown}; choose from {RUNNERS}")
    command_line = "python pipelines/bench/run.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--here")

    print("measuring the machine's ceilings ...", flush=True)
    ceil_cmd = [sys.executable, str(HERE / "ceilings.py")] + (["--quick"] if args.quick else [])
    ceilings = json.loads(subprocess.run(ceil_cmd, check=True, capture_output=True, text=True,
                                         cwd=REPO).stdout.splitlines()[-1])
    runs = []
    for n, d, k in shapes:
        print(f"dataset N={n:,} D={d} K={k} ...", flush=True)
        data = prepare(args.data_root, n, d, k)
        for cov in covariances:
            todo = [r for r in runners if not (cov != "full" and r in FULL_ONLY)]
            for rep in range(repeats):
                for runner in todo:  # interleaved: every library once per repeat
                    result = run_one(command(runner, data, cov, args.n_iter), args.timeout)
                    result.update(runner=runner, repeat=rep, n=n, d=d, k=k, covariance=cov)
                    runs.append(result)
                    shown = (f"{result['s_per_iter']:.3f} s/iter, peak "
                             f"{result['peak_rss_bytes'] / 1e9:.2f} GB"
                             if "error" not in result else f"FAILED: {result['error']}")
                    print(f"  {cov:4s} {runner:12s} repeat {rep}: {shown}", flush=True)

    report = {
        "command": command_line,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "repeats": repeats, "n_iter": args.n_iter,
        "ceilings": ceilings, "runs": runs,
    }
    report["summary"] = summarize(runs, ceilings)
    write_report(args.out, args.suite + ("-quick" if args.quick else ""), report, markdown(report),
                 lambda path: plot(report, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
