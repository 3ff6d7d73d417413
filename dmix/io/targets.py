"""Output targets of the dmix commands: what may be written where, and groups that exist only
when complete.

Command outputs (``dmix score``, ``predict``, ``sample``, ``dmix run``) are Zarr groups made with
:func:`output_group`: it refuses to replace existing data without ``overwrite``, never replaces
a dmix model or the command's own inputs, and removes the group again if the command fails, so
a group at the path is always a complete output. The commands write the attribute
:data:`OUTPUT_ATTR` last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import zarr

from dmix.errors import DataError
from dmix.io.store import MODEL_SCHEMA, check_target, create_group

__all__ = ["OUTPUT_ATTR", "check_output_target", "output_group", "remove_node"]

#: Attribute that the ``dmix`` inference commands write last on their output group.
OUTPUT_ATTR = "dmix_output"


def _is_url(path: str) -> bool:
    return "://" in path


def _normalised(path) -> str:
    path = os.fspath(path)
    if _is_url(path):
        return path.rstrip("/")
    return os.path.normcase(os.path.realpath(path))


def _holds_model(path: str, storage_options: dict | None) -> bool:
    try:
        group = zarr.open_group(store=path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        return False
    return group.attrs.get("schema") == MODEL_SCHEMA


def check_output_target(path, overwrite: bool, *, inputs: Sequence = (),
                        storage_options: dict | None = None, what: str = "an output") -> None:
    """Check that ``what`` may be written to ``path`` (a cheap test before a long computation).

    Refuses: ``path`` equal to an input or containing one (replacing it would delete the data
    being read), any dmix model, and, unless ``overwrite``, any existing Zarr node; never
    replaces non-Zarr data (:func:`dmix.io.store.check_target`).

    Raises
    ------
    DataError
        Naming the path and what is in the way.
    """
    path = os.fspath(path)
    target = _normalised(path)
    for source in inputs:
        if source is None:
            continue
        src = _normalised(source)
        if src == target or src.startswith(target.rstrip("/") + "/"):
            raise DataError(
                f"Cannot write {what} to {path!r}: it is, or contains, the input "
                f"{os.fspath(source)!r}. Choose another path."
            )
    if overwrite and _holds_model(path, storage_options):
        raise DataError(
            f"Refusing to overwrite {path!r}: it holds a dmix model. Choose another path."
        )
    check_target(path, overwrite, storage_options, what)


def remove_node(path, storage_options: dict | None = None) -> None:
    """Delete whatever is at ``path`` (a local path or fsspec URL), if anything."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))
    if fs.exists(root):
        fs.rm(root, recursive=True)


@contextlib.contextmanager
def output_group(path, *, overwrite: bool = False, inputs: Sequence = (),
                 storage_options: dict | None = None,
                 what: str = "an output") -> Iterator[zarr.Group]:
    """Create the Zarr group ``path`` for a command's output; remove it if the block fails.

    :func:`check_output_target` runs first. If the ``with`` block raises (or is interrupted),
    the group and whatever was written into it are deleted (best effort) and the exception
    propagates: an output group that exists is one that was completed.
    """
    path = os.fspath(path)
    check_output_target(path, overwrite, inputs=inputs, storage_options=storage_options,
                        what=what)
    group = create_group(path, overwrite=overwrite, storage_options=storage_options,
                         what=what)
    try:
        yield group
    except BaseException:
        with contextlib.suppress(OSError):
            remove_node(path, storage_options)
        raise
