"""Checkpoints: the state of a fit after an iteration, one immutable Zarr group each.

A checkpoint directory (local path or fsspec URL) looks like::

    CKPT_DIR/
      init000-iter000000.zarr/   after the initialisation of restart 0
      init000-iter000001.zarr/   after iteration 1 of restart 0
        run/params/...           the parameters after the M-step (one array each)
        run/state/...            the M-step state (empty for closed-form families)
        best/params/...          the best finished restart so far, if any
        user_init/...            user-given initial parameters, if any
        attrs                    schema, dmix version, family spec, options, data
                                 fingerprint, seed, restart, iteration, lower bounds,
                                 a SHA-256 of every array, and ``complete: true`` last
      LATEST                     {"name": "init000-iter000001.zarr", ...}, replaced atomically

The order of writes makes a crash harmless at any moment: a group is created with mode
``"w-"`` (never over another), its arrays are written, then its attributes (``complete``
included) in one write, then ``LATEST`` is replaced -- on a local disk by writing a temporary
file in the same directory and ``os.replace`` (atomic on POSIX; fsspec's local transactions
are not, they may copy across filesystems), on an object store by one PUT. Only then are old
groups deleted, keeping the last ``keep``. A group newer than ``LATEST`` is debris of a crash
and is removed when the fit resumes; a ``LATEST`` naming an incomplete or corrupt group makes
:meth:`CheckpointDir.load` fall back to the newest complete one, with a warning.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import zarr

from dmix.engine.loop import EMResult, Snapshot
from dmix.errors import CheckpointMismatchError, CheckpointWarning, DmixError
from dmix.io.store import _jsonable

__all__ = [
    "CHECKPOINT_SCHEMA",
    "CheckpointDir",
    "Loaded",
    "check_compatible",
    "data_fingerprint",
    "data_location",
    "digest",
    "fingerprint_rows",
    "group_name",
]

#: The ``schema`` attribute of a checkpoint group; a loader exists for each version.
CHECKPOINT_SCHEMA = "dmix-ckpt/1"
LATEST = "LATEST"
#: Rows whose bytes the fingerprint hashes (fixed positions, so chunking does not matter).
FINGERPRINT_ROWS = 16
_NAME = re.compile(r"^init(\d{3,})-iter(\d{6,})\.zarr$")


def group_name(restart: int, iteration: int) -> str:
    """Name of the checkpoint group after ``iteration`` of ``restart`` (sorts by time)."""
    return f"init{restart:03d}-iter{iteration:06d}.zarr"


def _sort_key(name: str) -> tuple[int, int]:
    m = _NAME.match(name)
    return int(m.group(1)), int(m.group(2))


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (hex)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# -- the data fingerprint --------------------------------------------------------------------


def fingerprint_rows(n_samples: int) -> list[int]:
    """The row indices hashed by :func:`data_fingerprint`: first, last, evenly spaced."""
    return sorted({int(round(i)) for i in np.linspace(0, n_samples - 1, FINGERPRINT_ROWS)})


def data_location(X) -> str | None:
    """Where ``X`` can be reopened by a resume: its URL, or its absolute path (a resume may run
    from another directory); None for in-memory data."""
    if not isinstance(X, str | os.PathLike):
        return None
    location = os.fspath(X)
    return location if "://" in location else os.path.abspath(location)


def data_fingerprint(array, description: str, location: str | None = None,
                     client=None) -> dict:
    """Shape, dtype, where the data came from, and a SHA-256 of a fixed sample of rows.

    The sample is :data:`FINGERPRINT_ROWS` rows at positions fixed by the number of rows, so
    the fingerprint does not depend on how the data are chunked; reading it touches at most
    that many blocks.
    """
    import dask
    import dask.array as da

    n, d = array.shape
    rows = fingerprint_rows(n)
    if isinstance(array, np.ndarray):
        sample = array[rows]
    else:
        picked = da.concatenate([array[i : i + 1] for i in rows])
        sample = client.compute(picked).result() if client is not None else dask.compute(
            picked)[0]
    return {
        "shape": [int(n), int(d)],
        "dtype": np.dtype(array.dtype).name,
        "source": description,
        "location": location,
        "sample_rows": len(rows),
        "sample_sha256": digest(np.asarray(sample)),
    }


def check_compatible(saved: dict, *, family: dict, options: dict, fingerprint: dict,
                     where: str) -> None:
    """Raise :class:`~dmix.errors.CheckpointMismatchError` naming every difference that
    makes the checkpoint at ``where`` unusable for this fit.

    ``options`` holds only what must match (the number of components, restarts, the
    initialisation, the seed...); ``max_iter``, ``tol``, the chunking and the cluster may change.
    """
    diffs = []
    if saved.get("family") != family:
        diffs.append(f"model {saved.get('family')} (checkpoint) vs {family} (now)")
    old = saved.get("options", {})
    for key, value in options.items():
        if old.get(key) != value:
            diffs.append(f"{key} {old.get(key)!r} (checkpoint) vs {value!r} (now)")
    data = saved.get("data", {})
    for key, label in (("shape", "data shape"), ("dtype", "data dtype"),
                       ("sample_sha256", "data content (checksum of sampled rows)")):
        if data.get(key) != fingerprint.get(key):
            if key == "sample_sha256":
                old_src, new_src = data.get("source"), fingerprint.get("source")
                what = (f"the checkpoint was written for {old_src}, this is {new_src}"
                        if old_src != new_src else f"same source ({new_src}), other values")
                diffs.append(f"{label} differs: {what}")
            else:
                diffs.append(f"{label} {data.get(key)} (checkpoint) vs {fingerprint.get(key)} "
                             "(now)")
    if diffs:
        raise CheckpointMismatchError(
            f"The checkpoint in {where} does not belong to this fit: " + "; ".join(diffs)
            + ". Resume with the same data and options, or use another checkpoint directory."
        )


# -- the directory ---------------------------------------------------------------------------


@dataclass
class Loaded:
    """A checkpoint read back: where the fit stood, and the attributes written with it."""

    name: str
    snapshot: Snapshot
    attrs: dict
    user_init: dict


class CheckpointDir:
    """A directory of checkpoint groups written by the driver after EM iterations.

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL (``memory://``, ``s3://``...).
    every : int, default=1
        Iterations between checkpoints (the engine also saves when a restart ends).
    keep : int, default=3
        Complete checkpoints kept; older ones are deleted after each save.
    storage_options : dict, optional
        Passed to fsspec.
    meta : dict, optional
        JSON attributes written into every checkpoint (family spec, options, data fingerprint,
        seed...), set by the estimator before the fit.
    user_init : dict, optional
        Arrays stored with every checkpoint (user-given initial parameters).
    """

    def __init__(self, url, *, every: int = 1, keep: int = 3,
                 storage_options: dict | None = None):
        import fsspec

        self.url = os.fspath(url).rstrip("/")
        self.every, self.keep = int(every), int(keep)
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.local = "file" in np.atleast_1d(self.fs.protocol)
        self.meta: dict = {}
        self.user_init: dict = {}
        self.saved: list[str] = []

    def __repr__(self) -> str:
        return f"CheckpointDir({self.url!r}, every={self.every}, keep={self.keep})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _url(self, name: str) -> str:
        return f"{self.url}/{name}"

    # -- listing --

    def groups(self) -> list[str]:
        """Names of the checkpoint groups present (complete or not), oldest first."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted((n for n in names if _NAME.match(n)), key=_sort_key)

    def latest_name(self) -> str | None:
        """The group ``LATEST`` names, or None if there is no readable ``LATEST``."""
        try:
            pointer = json.loads(self.fs.cat_file(self._path(LATEST)))
            name = pointer["name"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return name if isinstance(name, str) and _NAME.match(name) else None

    def is_empty(self) -> bool:
        """Whether the directory holds no checkpoint and no ``LATEST``."""
        return not self.groups() and not self.fs.exists(self._path(LATEST))

    # -- writing --

    def check_writable(self) -> None:
        """Create the directory and write, read and delete a probe file in it, or raise a
        :class:`~dmix.errors.DmixError` saying why checkpoints cannot be written there."""
        probe = self._path(f".dmix-probe-{uuid.uuid4().hex}")
        try:
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise NotADirectoryError(f"{self.url!r} is a file")
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"dmix")
            if self.fs.cat_file(probe) != b"dmix":
                raise OSError("a file written there reads back different bytes")
            self.fs.rm(probe)
        except (OSError, ValueError) as exc:
            raise DmixError(
                f"Cannot write checkpoints to {self.url!r}: {exc}. Choose a writable "
                "directory (a local path or an fsspec URL) before the fit starts."
            ) from None

    def save(self, snapshot: Snapshot) -> str:
        """Write ``snapshot`` as a new group, point ``LATEST`` at it, drop the old ones."""
        name = group_name(snapshot.restart, snapshot.run.n_iter)
        arrays = {f"run/params/{k}": v for k, v in snapshot.run.params.items()}
        arrays.update({f"run/state/{k}": v for k, v in snapshot.state.items()})
        if snapshot.best is not None:
            arrays.update({f"best/params/{k}": v for k, v in snapshot.best.params.items()})
        for i, (run, state) in enumerate(zip(snapshot.runs or (), snapshot.states or (),
                                             strict=True)):
            arrays.update({f"runs/{i}/params/{k}": v for k, v in run.params.items()})
            arrays.update({f"runs/{i}/state/{k}": v for k, v in state.items()})
        arrays.update({f"user_init/{k}": v for k, v in self.user_init.items()})
        arrays = {k: np.asarray(v) for k, v in arrays.items()}

        group = zarr.open_group(store=self._url(name), mode="w-",
                                storage_options=self.storage_options)
        for path, value in arrays.items():
            parent, key = path.rsplit("/", 1)
            sub = group.require_group(parent)
            chunks = value.shape if value.ndim and all(value.shape) else "auto"
            sub.create_array(key, data=value, chunks=chunks, compressors=None)
        attrs = {
            **self.meta,
            "schema": CHECKPOINT_SCHEMA,
            "restart": snapshot.restart,
            "iteration": snapshot.run.n_iter,
            "run": _run_attrs(snapshot.run),
            "best": None if snapshot.best is None else _run_attrs(snapshot.best),
            "runs": None if snapshot.runs is None else [_run_attrs(r) for r in snapshot.runs],
            "state_keys": sorted(snapshot.state),
            "checksums": {k: digest(v) for k, v in arrays.items()},
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "complete": True,
        }
        group.attrs.put(_jsonable(attrs, "checkpoint attributes"))  # one write, last
        self._point_latest(name, snapshot)
        self.saved.append(name)
        self._prune(name)
        return name

    def _point_latest(self, name: str, snapshot: Snapshot) -> None:
        data = json.dumps({"name": name, "restart": snapshot.restart,
                           "iteration": snapshot.run.n_iter,
                           "schema": CHECKPOINT_SCHEMA}).encode()
        target = self._path(LATEST)
        if not self.local:
            self.fs.pipe_file(target, data)  # one PUT: atomic per object
            return
        tmp = self._path(f".{LATEST}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)

    def _prune(self, current: str) -> None:
        names = [n for n in self.groups() if _sort_key(n) <= _sort_key(current)]
        for old in names[: max(0, len(names) - self.keep)]:
            self.fs.rm(self._path(old), recursive=True)

    def discard_after(self, name: str | None) -> list[str]:
        """Delete groups newer than ``name`` (all groups if None): debris of a crash."""
        newer = [n for n in self.groups() if name is None or _sort_key(n) > _sort_key(name)]
        for n in newer:
            self.fs.rm(self._path(n), recursive=True)
        return newer

    # -- reading --

    def read(self, name: str) -> Loaded:
        """Read and verify the group ``name``; raises ``ValueError`` if incomplete or corrupt."""
        try:
            group = zarr.open_group(store=self._url(name), mode="r",
                                    storage_options=self.storage_options)
            attrs = dict(group.attrs)
        except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError) as exc:
            raise ValueError(f"it cannot be opened ({exc})") from None
        if attrs.get("complete") is not True:
            raise ValueError("it is incomplete (the fit stopped while writing it)")
        if attrs.get("schema") != CHECKPOINT_SCHEMA:
            raise ValueError(f"its schema is {attrs.get('schema')!r}, not {CHECKPOINT_SCHEMA!r}")
        arrays = {}
        for path, expected in attrs["checksums"].items():
            try:
                value = np.asarray(group[path][...])
            except Exception as exc:  # noqa: BLE001 - any failure to read is corruption
                raise ValueError(f"its array {path!r} cannot be read ({exc})") from None
            if digest(value) != expected:
                raise ValueError(f"its array {path!r} does not match its checksum")
            arrays[path] = value

        def sub(prefix):
            return {p[len(prefix):]: v for p, v in arrays.items() if p.startswith(prefix)}

        run = _run_from_attrs(attrs["run"], sub("run/params/"))
        best = None if attrs["best"] is None else _run_from_attrs(attrs["best"],
                                                                  sub("best/params/"))
        runs = states = None
        if attrs.get("runs") is not None:  # restarts side by side
            runs = [_run_from_attrs(a, sub(f"runs/{i}/params/"))
                    for i, a in enumerate(attrs["runs"])]
            states = [sub(f"runs/{i}/state/") for i in range(len(runs))]
        snapshot = Snapshot(restart=attrs["restart"], run=run, state=sub("run/state/"),
                            best=best, runs=runs, states=states)
        return Loaded(name=name, snapshot=snapshot, attrs=attrs, user_init=sub("user_init/"))

    def load(self) -> Loaded | None:
        """The checkpoint to resume from: the one ``LATEST`` names, or else the newest
        complete group (with a :class:`~dmix.errors.CheckpointWarning` saying why); None if
        the directory holds no complete checkpoint."""
        groups = self.groups()
        latest = self.latest_name()
        if latest is not None and latest in groups:
            candidates = [n for n in groups if _sort_key(n) <= _sort_key(latest)][::-1]
        else:
            candidates = groups[::-1]
            if groups:
                why = ("has no LATEST pointer" if latest is None
                       else f"has a LATEST naming {latest!r}, which does not exist")
                warnings.warn(f"The checkpoint directory {self.url!r} {why}; looking for the "
                              "newest complete checkpoint.", CheckpointWarning, stacklevel=2)
        for name in candidates:
            try:
                return self.read(name)
            except ValueError as exc:
                warnings.warn(f"Skipping checkpoint {self._url(name)}: {exc}. Falling back to "
                              "the previous one.", CheckpointWarning, stacklevel=2)
        return None


def _run_attrs(run: EMResult) -> dict:
    finite = np.isfinite(run.lower_bound)
    return {
        "init": run.init,
        "n_iter": run.n_iter,
        "converged": bool(run.converged),
        "lower_bound": float(run.lower_bound) if finite else None,
        "lower_bounds": [float(v) for v in run.lower_bounds],
        "seconds": [float(v) for v in run.seconds],
        "n_reseeded": int(run.n_reseeded),
        "stopped": bool(run.stopped),
        "initial": float(run.initial) if np.isfinite(run.initial) else None,
    }


def _run_from_attrs(attrs: dict, params: dict) -> EMResult:
    lower = attrs["lower_bound"]
    return EMResult(
        params=params,
        lower_bound=-np.inf if lower is None else float(lower),
        lower_bounds=list(attrs["lower_bounds"]),
        n_iter=int(attrs["n_iter"]),
        converged=bool(attrs["converged"]),
        init=int(attrs["init"]),
        seconds=list(attrs.get("seconds", [])),
        n_reseeded=int(attrs.get("n_reseeded", 0)),
        stopped=bool(attrs.get("stopped", False)),
        initial=-np.inf if attrs.get("initial") is None else float(attrs["initial"]),
    )
