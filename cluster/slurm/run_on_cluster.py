"""Start a Dask cluster, run one command against it, stop the cluster; exit with its status.

Meant to run inside a batch job (cluster/slurm/dmix-fit.sbatch): the scheduler lives in this
process, the workers are SLURM jobs that dask-jobqueue submits, and the command (the dmix
driver) runs next to the scheduler for as long as the batch job lasts::

    python cluster/slurm/run_on_cluster.py --config cluster/slurm/jobqueue.yaml --jobs 4 -- \\
        dmix fit /shared/data.zarr -k 16 --scheduler {scheduler} \\
            --checkpoint /shared/runs/run-1/ckpt --resume --output /shared/runs/run-1/model.zarr

``{scheduler}`` in the command is replaced by the scheduler's address, which is also exported
as ``DASK_SCHEDULER_ADDRESS``. ``--local N`` starts a ``distributed.LocalCluster`` of N
single-threaded worker processes instead of SLURM jobs: the same script without SLURM (this is
how the test suite runs it). ``--jobs`` needs dask-jobqueue (``pip install dask-jobqueue``;
not a dependency of dmix).

SIGTERM (SLURM's preemption, scancel, kill) is passed on to the command; the cluster is closed
afterwards, which cancels the worker jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _load_config(path: str) -> None:
    import dask.config
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    # Merged into the current config, so that keys this file lacks keep their defaults.
    dask.config.update(dask.config.config, config, priority="new")


def _start_cluster(args):
    if args.local:
        from distributed import LocalCluster

        return LocalCluster(n_workers=args.local, threads_per_worker=1, processes=True,
                            dashboard_address=args.dashboard_address), args.local
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit("run_on_cluster.py: --jobs needs dask-jobqueue (pip install dask-jobqueue)")
    cluster = SLURMCluster()  # everything from the jobqueue.slurm config
    print(cluster.job_script(), flush=True)  # the worker job script, for the log
    if args.adapt:  # jobs that end (walltime, --lifetime) are replaced
        cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    else:
        cluster.scale(jobs=args.jobs)
    # Worker processes per job, as dask-jobqueue computed them (1 if that ever moves).
    per_job = getattr(getattr(cluster, "_dummy_job", None), "worker_processes", 1)
    return cluster, args.jobs * per_job


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: run_on_cluster.py [options] -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(prog="run_on_cluster.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a dask config file (cluster/slurm/jobqueue.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--jobs", type=int, help="SLURM worker jobs (dask-jobqueue)")
    where.add_argument("--local", type=int, metavar="N",
                       help="a LocalCluster of N worker processes instead (no SLURM)")
    p.add_argument("--adapt", action="store_true",
                   help="keep --jobs jobs running, replacing those that end")
    p.add_argument("--wait-workers", type=int, default=1, metavar="M",
                   help="start the command once M workers are connected (default 1; "
                        "0: at once)")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                   help="give up when they are not there after S seconds (default: wait)")
    p.add_argument("--dashboard-address", default=":8787",
                   help="the scheduler's dashboard (default %(default)s)")
    args = p.parse_args(own)
    if not command:
        p.error("no command after --")
    if args.config:
        _load_config(args.config)

    from distributed import Client

    cluster, expected = _start_cluster(args)
    child = None
    try:
        address = cluster.scheduler_address
        print(f"Dask scheduler at {address}, dashboard {cluster.dashboard_link}; "
              f"{expected} worker(s) requested", flush=True)
        if args.wait_workers:
            tic = time.monotonic()
            with Client(address) as client:
                client.wait_for_workers(min(args.wait_workers, expected),
                                        timeout=args.wait_timeout)
            print(f"{min(args.wait_workers, expected)} worker(s) connected after "
                  f"{time.monotonic() - tic:.0f} s", flush=True)
        command = [arg.replace("{scheduler}", address) for arg in command]
        env = dict(os.environ, DASK_SCHEDULER_ADDRESS=address)
        child = subprocess.Popen(command, env=env)

        def forward(signum, frame):
            if child.poll() is None:
                child.send_signal(signum)

        # SIGTERM for this process alone (kill PID) goes on to the command; Ctrl-C reaches
        # the command directly (same process group), so here it only must not stop the wait.
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
