"""``dmix run PIPELINE.toml``: a declarative job (data -> cluster -> fit -> outputs -> report).

::

    dmix run PIPELINE.toml [--set SECTION.KEY=VALUE ...] [--dry-run]
"""

from __future__ import annotations

__all__ = ["add_commands"]


def _cmd_run(args) -> int:
    from dmix.pipeline import run_pipeline

    run_pipeline(args.pipeline, args.set or (), dry_run=args.dry_run)
    return 0


def add_commands(sub) -> None:
    """Register ``run`` on the ``dmix`` subparsers ``sub``."""
    p = sub.add_parser(
        "run", help="run a pipeline file (data, cluster, fit, outputs, report)",
        description="Run the end-to-end job described by a TOML pipeline file: make, read or "
                    "ingest the data, start or reach a Dask cluster, fit the model(s) or select "
                    "one from a grid, write the model, labels, scores and report. See "
                    "pipelines/ for examples and dmix.pipeline.SCHEMA for every key.")
    p.add_argument("pipeline", metavar="PIPELINE.toml", help="the pipeline file")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a key (the value is read as TOML, else as a string); "
                        "model.KEY sets it for every [[model]], model.LABEL.KEY for one; "
                        "repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the file and print the plan without running it")
    p.set_defaults(func=_cmd_run)
