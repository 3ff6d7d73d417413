"""``dmix score``, ``predict`` and ``sample``: streamed over Zarr, written to Zarr."""

from __future__ import annotations


def add_commands(sub) -> None:
    """Register the inference commands on the ``dmix`` subparsers ``sub``."""
