"""Shared pytest configuration: tests marked ``gpu`` run only where CuPy finds a CUDA GPU."""

from __future__ import annotations

import pytest


def gpu_available() -> bool:
    """Whether CuPy is installed and ``cupy.is_available()`` (a usable CUDA GPU)."""
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: cupy.is_available() is false here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
