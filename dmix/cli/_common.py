"""Shared pieces of the ``dmix`` commands: argument types, output, progress, the cluster."""

from __future__ import annotations

import argparse
import contextlib
import os

import numpy as np

from dmix.engine.loop import Monitor
from dmix.errors import DmixError
from dmix.families.covariance import COVARIANCE_TYPES
from dmix.progress import JsonProgress, TextProgress

DEFAULT_DASHBOARD = ":8787"

# -- argument types --------------------------------------------------------------------------


def _int_at_least(low: int, phrase: str):
    """An argparse type: an integer >= ``low``, else an error saying ``expected {phrase}``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {phrase}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _cpu_count() -> int:
    from dmix.engine.cluster import cpu_count

    return cpu_count()


# -- output ----------------------------------------------------------------------------------


def _say(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def _fmt_vector(v, digits: int = 4, limit: int = 8) -> str:
    v = np.asarray(v, dtype=np.float64).ravel()
    shown = " ".join(f"{x:.{digits}f}" for x in v[:limit])
    return f"[{shown}{' ...' if v.size > limit else ''}]"


def _nbytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# -- EM progress -----------------------------------------------------------------------------


#: The per-iteration lines (and, on a terminal, the live bar) of ``fit`` and ``resume``.
ProgressMonitor = TextProgress


def _add_progress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("progress").add_mutually_exclusive_group()
    g.add_argument("--quiet", "-q", action="store_true",
                   help="print no progress (no line per iteration, no bar)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per iteration on stdout (init, iteration, "
                        "lower_bound, change, seconds, rows, rows_per_second, ...); the "
                        "other messages go to stderr")


def progress_monitor(args, n_init: int, init_params: str | None, file=None) -> Monitor:
    """The monitor ``--quiet`` / ``--json`` / the default ask for (``file``: where it writes)."""
    if getattr(args, "quiet", False):
        return Monitor()
    if getattr(args, "json", False):
        return JsonProgress(file=file)
    return ProgressMonitor(n_init, init_params, file=file)


# -- the cluster -----------------------------------------------------------------------------


def _gpus(text: str) -> str | int:
    """``--gpus``: 'all' or a positive number of GPUs."""
    if text.strip().lower() == "all":
        return "all"
    return _positive_int(text)


def compute_options(args) -> dict:
    """``device`` and ``dtype`` of the estimator from ``--device``, ``--compute-dtype`` and
    ``--gpus`` (which implies ``--device cuda``)."""
    device = args.device or ("cuda" if args.gpus is not None else "cpu")
    if device == "cpu" and args.gpus is not None:
        raise DmixError("--gpus starts one worker per GPU for --device cuda; it cannot be "
                        "used with --device cpu.")
    return {"device": device, "dtype": args.compute_dtype}


def first_visible_gpus(n: int, visible: str | None = None) -> str:
    """The first ``n`` GPUs of ``CUDA_VISIBLE_DEVICES`` (all GPUs from 0 when it is unset), as
    dask-cuda takes them: a mask set by the user or a batch system is kept."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    return ",".join(ids[:n] if ids is not None else (str(i) for i in range(n)))


def _local_cuda_cluster(gpus, dashboard_address: str):
    """A dask-cuda ``LocalCUDACluster``: one worker process per GPU (``gpus``: 'all' or N)."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise DmixError("--gpus needs dask-cuda (and CuPy): pip install 'dmix[gpu]'.") from None
    options = {}
    if gpus != "all":
        options["CUDA_VISIBLE_DEVICES"] = first_visible_gpus(gpus)
    return LocalCUDACluster(dashboard_address=dashboard_address, **options)


def _say_dashboard(client) -> None:
    """Print the Dask dashboard's address and that of dmix's live page in it."""
    from dmix.dashboard import page_link, register

    _say(f"Dask dashboard: {client.dashboard_link}")
    if register(client):
        _say(f"dmix live page: {page_link(client)}")


@contextlib.contextmanager
def _dask_client(scheduler: str | None, n_workers: int | None, dashboard_address: str,
                 gpus=None):
    """A ``distributed.Client``: to ``scheduler`` if given, else to a new in-process cluster
    (of one worker per GPU with ``gpus``)."""
    from distributed import Client

    if scheduler and gpus is not None:
        raise DmixError("--gpus starts a local cluster; with --scheduler, start one "
                        "'dask cuda worker SCHEDULER' process per GPU host instead (cluster/"
                        "README.md) and pass --device cuda.")
    if gpus is not None:
        with _local_cuda_cluster(gpus, dashboard_address) as cluster, Client(cluster) as client:
            n = len(client.scheduler_info()["workers"])
            _say(f"Started a local Dask CUDA cluster: {n} worker process(es), one per GPU")
            _say_dashboard(client)
            yield client
        return
    if scheduler:
        try:
            client = Client(scheduler)  # timeout: distributed.comm.timeouts.connect
        except (OSError, TimeoutError, ValueError) as exc:
            raise DmixError(
                f"Could not connect to the Dask scheduler at {scheduler!r}: {exc}"
            ) from None
        with client:
            n = len(client.scheduler_info().get("workers", {}))
            _say(f"Connected to the Dask scheduler at {scheduler} ({n} workers)")
            _say_dashboard(client)
            yield client
        return
    from dmix.engine.cluster import local_client

    n_workers = n_workers or _cpu_count()
    # memory_limit="auto": the machine's memory shared equally between the workers.
    with local_client(n_workers, 1, "auto", dashboard_address) as client:
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
        per = f", {min(limits) / 2**30:.1f} GiB memory limit each" if all(limits) else ""
        _say(f"Started a local Dask cluster: {n_workers} worker process(es) x 1 thread{per}")
        _say_dashboard(client)
        yield client


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running Dask scheduler (e.g. tcp://host:8786); default: "
                        "start a local cluster in this process")
    g.add_argument("--n-workers", type=_positive_int, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    g.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD, metavar="ADDR",
                   help="where the local cluster serves its dashboard (default %(default)s; "
                        "':0' picks a free port)")
    g.add_argument("--gpus", type=_gpus, metavar="all|N",
                   help="start a local cluster of one worker per GPU (all of them, or the "
                        "first N; needs dmix[gpu]) and compute on them")
    g.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the E-steps run (default: cuda with --gpus, else cpu)")
    g.add_argument("--compute-dtype", choices=["float32", "float64"],
                   help="precision of the E-step arithmetic (default: float32 on cuda, "
                        "float64 on cpu); statistics are summed in float64")



def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 3,2), got {text!r}")
    return values


def _add_fit_options(p: argparse.ArgumentParser, *, n_components_required: bool) -> None:
    from dmix._registry import MODELS

    g = p.add_argument_group("model")
    g.add_argument("--model", default="gmm", choices=list(MODELS),
                   help="the mixture family: gmm (Gaussian), skew (skew-normal), dgmm (deep "
                        "Gaussian mixture), gmn (Gaussian mixture network), squared (squared "
                        "mixture with real weights, trained by gradients); default gmm")
    g.add_argument("--skew-form", choices=["restricted", "unrestricted"], default="restricted",
                   help="skew-normal form (--model skew; default %(default)s)")
    g.add_argument("--layer-sizes", type=_int_list, metavar="K1,K2,...",
                   help="components per layer, the first being the clusters (--model dgmm or "
                        "gmn; default K,1)")
    g.add_argument("--fit-method", choices=["exact", "stochastic", "em", "gradient"],
                   help="--model gmm: em (default) or gradient (Adam on the EM statistics); "
                        "--model dgmm or gmn: exact EM (default) or the paper's stochastic EM")
    g.add_argument("--layer-dims", type=_int_list, metavar="R1,R2,...",
                   help="latent dimensions per layer, non-increasing (--model dgmm or gmn; "
                        "default: D-1, then halved per layer)")
    if n_components_required:
        g.add_argument("--n-components", "-k", type=_positive_int, required=True, metavar="K",
                       help="number of mixture components")
    g.add_argument("--covariance-type", default="full",
                   choices=[*COVARIANCE_TYPES, "tied_full"], metavar="TYPE",
                   help="one of %(choices)s (default %(default)s)")
    g.add_argument("--max-iter", type=_non_negative_int, metavar="N",
                   help="EM iterations or gradient steps per initialisation (default 100 for "
                        "EM, 300 for gradient training)")
    g.add_argument("--tol", type=_non_negative_float,
                   help="EM: stop when the mean log-likelihood changes by less (default "
                        "1e-3); gradient training: when it has not risen by more in "
                        "--n-iter-no-change steps (default 1e-4)")
    g.add_argument("--reg-covar", type=_non_negative_float, default=1e-6, metavar="EPS",
                   help="added to the covariance diagonals (default %(default)s)")
    g.add_argument("--init-params", default="kmeans", metavar="METHOD",
                   choices=["kmeans", "k-means++", "random", "random_from_data", "nested"],
                   help="one of %(choices)s (default %(default)s; nested: --model squared)")
    g.add_argument("--n-init", type=_positive_int, default=1, metavar="N",
                   help="initialisations; the best is kept (default %(default)s)")
    g.add_argument("--chunk-size", type=_positive_int, metavar="ROWS",
                   help="rows per block (default: whole stored chunks, equal blocks of at "
                        "most 32 MiB, a multiple of the worker threads in number)")
    g.add_argument("--split-every", type=_positive_int, metavar="N",
                   help="fan-in of the reduction tree (default 16)")
    g.add_argument("--persist", choices=["auto", "yes", "no"], default="auto",
                   type=str.lower,
                   help="keep the data in cluster memory between iterations (yes), stream them "
                        "from the store every iteration (no), or persist when they take at "
                        "most half of the workers' memory (auto, the default)")
    g = p.add_argument_group("gradient training (--model squared, --fit-method gradient)")
    g.add_argument("--optimizer", choices=["adam", "lbfgs"],
                   help="adam (default) or lbfgs (full batches)")
    g.add_argument("--learning-rate", type=_positive_float, metavar="LR",
                   help="Adam's step size (default 0.05)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "exponential"],
                   help="decay of the step size over --max-iter steps (default constant)")
    g.add_argument("--batch-fraction", type=_positive_float, metavar="F",
                   help="fraction of the chunks read per step (default 1: full batch)")
    g.add_argument("--validation-fraction", type=_non_negative_float, metavar="F",
                   help="fraction of the rows held out for early stopping (default 0)")
    g.add_argument("--n-iter-no-change", type=_positive_int, metavar="N",
                   help="patience of the stopping rule (default 10)")


