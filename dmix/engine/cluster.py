"""A local ``distributed`` cluster with the worker layout a pipeline asks for."""

from __future__ import annotations

import contextlib
import os

__all__ = ["cpu_count", "local_client"]


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def local_client(n_workers: int | None = None, threads_per_worker: int = 1,
                 memory_limit="auto", dashboard_address: str | None = ":8787"):
    """A ``distributed.Client`` of a new in-process ``LocalCluster`` of worker processes.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: one per core).
    threads_per_worker : int, default=1
    memory_limit : str or int, default='auto'
        Per worker, e.g. ``'2GiB'``; ``'auto'`` shares the machine's memory equally.
    dashboard_address : str, optional
        ``':0'`` picks a free port; None serves no dashboard.

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, LocalCluster

    if n_workers is None:
        n_workers = cpu_count()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                           processes=True, memory_limit=memory_limit,
                           dashboard_address=dashboard_address)
    with cluster, Client(cluster) as client:
        yield client
