"""How dmix's time per EM iteration grows with N, K and D: curves for docs/bench/scaling.*.

Usage::

    python pipelines/bench/scaling.py                 # N up to 1e8 (12.8 GB streamed), ~30 min
    python pipelines/bench/scaling.py --max-n 1e7     # without the 1e8-row dataset
    python pipelines/bench/scaling.py --quick         # small sizes: checks that everything runs

Three sweeps, full covariances, each point one ``run_dmix.py`` process (a fresh
``LocalCluster`` of one worker per core, median of ``--n-iter`` iterations):

- N = 1e5, 1e6, 1e7, 1e8 rows at D = K = 16, streamed from an uncompressed Zarr store every
  iteration, and for N <= 1e7 also in memory (persisted on the workers); the 1e8-row store
  (12.8 GB) is larger than the workers' share of memory and is only streamed;
- K = 4 .. 64 at N = 1e6, D = 16, in memory;
- D = 4 .. 64 at N = 2e5, K = 16, in memory.

Datasets come from ``data.py`` (generated once under ``--data-root``). Writes
``<out>/scaling.json``, ``scaling.md`` and ``scaling.png``. Runs with the Python that runs it
(dmix installed; matplotlib for the plot), no peers needed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import prepare  # noqa: E402
from run import REPO, command, machine, nominal_flops, run_one, write_report  # noqa: E402


def sweeps(max_n: float, quick: bool) -> list[dict]:
    """The points to run: ``{"sweep", "n", "d", "k", "source"}``."""
    if quick:
        ns, ks, ds, kn, dn = [10_000, 40_000], [4, 8], [4, 8], 20_000, 20_000
    else:
        ns = [n for n in (100_000, 1_000_000, 10_000_000, 100_000_000) if n <= max_n]
        ks, ds, kn, dn = [4, 8, 16, 32, 64], [4, 8, 16, 32, 64], 1_000_000, 200_000
    points = []
    for n in ns:
        points.append(dict(sweep="N", n=n, d=16, k=16, source="zarr"))
        if n <= 10_000_000:
            points.append(dict(sweep="N", n=n, d=16, k=16, source="memory"))
    points += [dict(sweep="K", n=kn, d=16, k=k, source="memory") for k in ks]
    points += [dict(sweep="D", n=dn, d=d, k=16, source="memory") for d in ds]
    return points


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, sweep, key in zip(axes, "NKD", ("n", "k", "d"), strict=True):
        for source, marker in (("memory", "o-"), ("zarr", "s--")):
            pts = sorted((r[key], r["s_per_iter"]) for r in results
                         if r["sweep"] == sweep and r["source"] == source and "s_per_iter" in r)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, label=f"{source}")
        fixed = {"N": "D = K = 16", "K": "N = 1e6, D = 16", "D": "N = 2e5, K = 16"}[sweep]
        ax.set(xscale="log", yscale="log", xlabel=sweep, title=f"{sweep} grows ({fixed})",
               ylabel="seconds per EM iteration")
        ticks = sorted({r[key] for r in results if r["sweep"] == sweep})
        ax.set_xticks(ticks, [f"{t:.0e}" if key == "n" else str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=8)
    fig.suptitle("dmix GaussianMixture, full covariances, one worker per core")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ",
             f"Date: {report['date']}; machine: {report['machine']['cpu']}, "
             f"{report['machine']['cores']} cores.", "",
             "| sweep | N | D | K | data | s/iter | rows/s | nominal GFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "s_per_iter" not in r:
            lines.append(f"| {r['sweep']} | {r['n']:,} | {r['d']} | {r['k']} | {r['source']} "
                         f"| failed: {r['error']} | | |")
            continue
        gf = nominal_flops(r["n"], r["d"], r["k"], "full") / 1e9 / r["s_per_iter"]
        lines.append(f"| {r['sweep']} | {r['n']:,} | {r['d']} | {r['k']} | {r['source']} "
                     f"| {r['s_per_iter']:.3g} | {r['n'] / r['s_per_iter']:.3g} | {gf:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=float, default=1e8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-iter", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--data-root", type=Path, default=HERE / ".data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = parser.parse_args(argv)

    results = []
    for p in sweeps(args.max_n, args.quick):
        # Datasets only ever streamed (the 1e8 one) are not written as .npy.
        data = prepare(args.data_root, p["n"], p["d"], p["k"], npy=p["n"] <= 10_000_000)
        r = run_one(command("dmix" if p["source"] == "memory" else "dmix-zarr", data, "full",
                            args.n_iter), args.timeout)
        r.update(p)
        results.append(r)
        shown = f"{r['s_per_iter']:.3f} s/iter" if "s_per_iter" in r else r["error"]
        print(f"{p['sweep']}: N={p['n']:,} D={p['d']} K={p['k']} {p['source']}: {shown}",
              flush=True)
    report = {"command": " ".join(["python pipelines/bench/scaling.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "n_iter": args.n_iter, "results": results}
    write_report(args.out, "scaling-quick" if args.quick else "scaling", report,
                 markdown(report), lambda path: plot(results, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
