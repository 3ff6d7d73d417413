"""``dmix report``: a saved model as one self-contained HTML page."""

from __future__ import annotations

from dmix.cli._common import _say
from dmix.io.model import load_model


def _cmd_report(args) -> int:
    from dmix.report import write_report

    est = load_model(args.model)
    write_report(args.output, est, data=args.data, title=args.title)
    _say(f"Wrote the report of {args.model} to {args.output}")
    return 0


def add_commands(sub) -> None:
    """Register ``report`` on the ``dmix`` subparsers ``sub``."""
    p = sub.add_parser("report", help="write an HTML report of a saved model",
                       description="Write one self-contained HTML file (figures embedded) "
                                   "describing the model saved in MODEL_DIR: the fit, its "
                                   "log-likelihood per iteration, the weights, and with --data "
                                   "the BIC/AIC and the model over a sample of the data.")
    p.add_argument("model", metavar="MODEL_DIR", help="path or URL of the model")
    p.add_argument("--data", metavar="DATA.zarr",
                   help="the data (a Zarr array or group): BIC, AIC and the data plots")
    p.add_argument("--output", "-o", required=True, metavar="REPORT.html",
                   help="the HTML file to write")
    p.add_argument("--title", help="heading of the page (default: the model and K)")
    p.set_defaults(func=_cmd_report)
