"""The ``dmix`` command: make data, fit, resume, inspect, score, predict, sample, and a
quickstart.

::

    dmix make-data OUT.zarr --n-samples N --n-features D --n-components K --seed S \
        --chunk-size C
    dmix fit DATA.zarr --n-components K --covariance-type full [--scheduler ADDRESS] \
        [--output MODEL_DIR]
    dmix fit DATA.zarr -k K --checkpoint CKPT_DIR [--resume]
    dmix resume CKPT_DIR [--max-iter N] [--scheduler ADDRESS] [--output MODEL_DIR]
    dmix info MODEL_DIR
    dmix score DATA.zarr --model MODEL_DIR --output OUT.zarr
    dmix predict DATA.zarr --model MODEL_DIR --output OUT.zarr [--proba]
    dmix sample --model MODEL_DIR --n-samples N --output OUT.zarr
    dmix report MODEL_DIR [--data DATA.zarr] --output REPORT.html
    dmix quickstart [--n-samples 200000 --n-features 8 --n-components 4 --out DIR]
    dmix run PIPELINE.toml [--set SECTION.KEY=VALUE ...] [--dry-run]

``fit`` and ``quickstart`` start a ``distributed.LocalCluster`` in process (one single-threaded
worker process per core) unless ``--scheduler`` names a running scheduler, and print the
address of the Dask dashboard. Usage errors exit with status 2 (argparse); errors in the data,
the options or the files exit with status 1 and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from dmix import __version__
from dmix.cli import infer, report, run, train
from dmix.cli._common import _say
from dmix.errors import DmixError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dmix`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="dmix",
        description="Mixture models fitted out of core: Dask-streamed E-steps over Zarr data.",
    )
    parser.add_argument("--version", action="version", version=f"dmix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_commands(sub)
    infer.add_commands(sub)
    report.add_commands(sub)
    run.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dmix`` command with ``argv`` (default ``sys.argv[1:]``); return its status.

    0 on success, 2 for usage errors (with argparse's message), 1 for a
    :class:`~dmix.errors.DmixError` (its message on stderr, no traceback), 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except DmixError as exc:
        _say(f"dmix {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `dmix info MODEL | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _say(f"dmix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
