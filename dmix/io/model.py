"""Saving and loading fitted estimators: one immutable, checksummed Zarr group per model.

A model (local path or fsspec URL) looks like::

    MODEL_DIR/
      params/NAME                  the family's parameter arrays, float64; for a Gaussian
                                   mixture weights (K,), means (K, D), covariances and
                                   precisions_cholesky (shape of the covariance type)
      settings/NAME                constructor parameters that are arrays (means_init...)
      attrs                        schema "dmix-model/1", estimator class name, family spec,
                                   settings (JSON), settings_arrays, the fitted scalars
                                   (converged_, n_iter_, lower_bound_, lower_bounds_,
                                   n_features_in_), versions, a SHA-256 of every array
                                   ("checksums"), and ``complete: true``, in one last write

The ``params`` arrays are those of a checkpoint's ``run/params``. Derived attributes (a Gaussian
mixture's ``precisions_``) are not stored: the estimator recomputes them when loaded.

A save never leaves a half-written model that looks valid. On a local disk the group is written
under a temporary sibling name and renamed into place (an existing model it replaces is first
renamed aside, then deleted). On an object store, where there is no rename, the group is
created with ``complete: false`` and its attributes are replaced by the final ones, ``complete``
included, in one write after every array; :func:`load_model` refuses a group without
``complete: true``.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import uuid
import warnings

import numpy as np
import zarr

from dmix.errors import DataError, DmixError, InvalidParameterError, NotFittedError
from dmix.io.checkpoint import digest
from dmix.io.store import MODEL_SCHEMA, _jsonable, check_target

__all__ = ["MODEL_SCHEMA", "load_model", "save_model"]



def _estimators() -> dict:
    """The estimator classes :func:`load_model` can rebuild, by class name."""
    from dmix._registry import estimator_classes  # late: estimators may import this module

    return estimator_classes()


def _versions() -> dict:
    from dmix import __version__

    return {"dmix": __version__, "numpy": np.__version__, "zarr": zarr.__version__}


def _float(value) -> float | str:
    """A float as JSON: itself if finite, else ``'inf'``, ``'-inf'`` or ``'nan'``."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


# -- saving ----------------------------------------------------------------------------------


def _split_settings(estimator) -> tuple[dict, dict]:
    """The constructor parameters (without ``client``) as (JSON values, arrays)."""
    settings, arrays = {}, {}
    for name, value in estimator.get_params().items():
        if name == "client":
            continue
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise InvalidParameterError(
                    f"Cannot save the {name!r} parameter: it is an array of Python objects. "
                    "Set it to a numeric array or None before saving.")
            arrays[name] = value
            continue
        if isinstance(value, np.dtype) or (isinstance(value, type)
                                           and issubclass(value, np.generic)):
            value = np.dtype(value).name  # dtype=np.float32 -> 'float32'
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, np.random.RandomState | np.random.Generator):
            warnings.warn(
                f"The {name!r} parameter is a {type(value).__name__}, which cannot be saved; "
                f"the model is saved with {name}=None (sample() of the loaded model will "
                "differ). Pass an int seed to save a reproducible model.",
                UserWarning, stacklevel=4)  # the caller of save_model
            value = None
        elif name == "stopping_criterion" and not isinstance(value, str | dict):
            from dmix.engine.stopping import criterion_spec, get_criterion

            spec = criterion_spec(get_criterion(value))
            if spec is None:
                raise InvalidParameterError(
                    f"Cannot save the {name!r} parameter: {value!r} is a function; set it to a "
                    "name, a dict or a built-in of dmix.engine.stopping before saving.")
            value = spec
        elif callable(value):
            raise InvalidParameterError(
                f"Cannot save the {name!r} parameter: it is a callable ({value!r}), which "
                "cannot be stored. Set it to a value (or None) before saving.")
        settings[name] = _jsonable(value, f"the {name!r} parameter")
    return settings, arrays


def _contents(estimator, data: dict | None = None) -> tuple[dict, dict]:
    """The arrays (by path in the group) and the attributes of a fitted estimator."""
    from dmix.families.base import family_spec

    if not hasattr(estimator, getattr(estimator, "_fitted_attribute", "weights_")):
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet: there is nothing to "
            "save. Call 'fit' before saving.")
    name = type(estimator).__name__
    if name not in _estimators():
        raise InvalidParameterError(
            f"Cannot save a {name}: only {sorted(_estimators())} can be saved.")
    settings, setting_arrays = _split_settings(estimator)
    arrays = {f"params/{k}": np.asarray(v, dtype=np.float64)
              for k, v in estimator._params.items()}
    arrays.update({f"settings/{k}": np.asarray(v) for k, v in setting_arrays.items()})
    lower = getattr(estimator, "lower_bounds_", [])
    fitted = {
        "converged_": bool(estimator.converged_),
        "n_iter_": int(estimator.n_iter_),
        "lower_bound_": _float(estimator.lower_bound_),
        "lower_bounds_": [_float(v) for v in lower],
        "n_features_in_": int(estimator.n_features_in_),
        "n_reseeded_": int(getattr(estimator, "n_reseeded_", 0)),
        "fit_seconds_": getattr(estimator, "fit_seconds_", None),
    }
    if data is not None:
        fitted["data"] = data
    from dmix import __version__

    attrs = {
        "schema": MODEL_SCHEMA,
        "estimator": name,
        "family": family_spec(estimator._family),
        "settings": settings,
        "settings_arrays": sorted(setting_arrays),
        **fitted,
        "dmix_version": __version__,
        "versions": _versions(),
        "checksums": {k: digest(v) for k, v in arrays.items()},
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "complete": True,
    }
    return arrays, _jsonable(attrs, "model attributes")


def _write(group: zarr.Group, arrays: dict) -> None:
    for path, value in arrays.items():
        parent, key = path.rsplit("/", 1)
        sub = group.require_group(parent)
        chunks = value.shape if value.ndim and all(value.shape) else "auto"
        sub.create_array(key, data=value, chunks=chunks, compressors=None)


def _fsync_tree(root: str) -> None:
    """Flush every file under ``root``, then the directories, to the disk."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_model_group(path: str, storage_options: dict | None) -> bool:
    try:
        group = zarr.open_group(store=path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        return False
    return group.attrs.get("schema") == MODEL_SCHEMA


def save_model(estimator, path, *, overwrite: bool = False,
               storage_options: dict | None = None, data: dict | None = None) -> None:
    """Save a fitted estimator as a Zarr group that :func:`load_model` reads back.

    Parameters
    ----------
    estimator : a dmix mixture estimator (GaussianMixture, SkewNormalMixture, ...)
        A fitted estimator.
    path : str or os.PathLike
        Local path or fsspec URL (``memory://``, ``s3://``...) of the model group.
    overwrite : bool, default=False
        Replace a dmix model already at ``path``. Anything else there is never replaced.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    data : dict, optional
        A JSON-compatible description of the data of the fit, kept in the attribute
        ``data`` (``dmix fit`` records the source, shape and dtype; ``dmix info`` shows them).

    Raises
    ------
    NotFittedError
        If ``estimator`` is not fitted.
    InvalidParameterError
        If a constructor parameter cannot be saved (a callable, an object array), naming it.
    DataError
        If something is at ``path`` and ``overwrite`` is false (or it is not a dmix model).

    Notes
    -----
    ``client`` is not saved. A ``random_state`` that is a ``RandomState`` or ``Generator`` is
    saved as None, with a warning.
    """
    import fsspec

    url = os.fspath(path)
    arrays, attrs = _contents(estimator, data)
    check_target(url, overwrite, storage_options, "a dmix model",
                 replaceable=lambda kind: _is_model_group(url, storage_options))
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" not in np.atleast_1d(fs.protocol):
        # No rename on object stores: "complete" goes in with the last write.
        group = zarr.open_group(store=url, mode="w", storage_options=storage_options,
                                attributes={"schema": MODEL_SCHEMA, "complete": False})
        _write(group, arrays)
        group.attrs.put(attrs)
        return

    root = os.path.abspath(root.rstrip("/"))
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        group = zarr.open_group(store=tmp, mode="w-")
        _write(group, arrays)
        group.attrs.put(attrs)
        _fsync_tree(tmp)
        old = None
        if os.path.isdir(root) and os.listdir(root):  # a model check_target allowed to replace
            old = os.path.join(parent, f".{base}.{uuid.uuid4().hex}.old")
            os.rename(root, old)
        os.replace(tmp, root)  # also replaces an empty directory
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- loading ---------------------------------------------------------------------------------


def _read_arrays(group: zarr.Group, checksums: dict, where: str) -> dict:
    arrays = {}
    for name, expected in checksums.items():
        try:
            value = np.asarray(group[name][...])
        except Exception as exc:  # noqa: BLE001 - any failure to read is corruption
            raise DataError(
                f"The model at {where!r} is corrupt: its array {name!r} cannot be read "
                f"({exc}).") from None
        if digest(value) != expected:
            raise DataError(
                f"The model at {where!r} is corrupt: its array {name!r} does not match its "
                "SHA-256 checksum. Save the model again.")
        arrays[name] = value
    return arrays


def _scalar(value) -> float:
    return float(value)  # also parses 'inf', '-inf', 'nan'


def load_model(path, *, storage_options: dict | None = None):
    """Load an estimator saved by :func:`save_model`.

    Parameters
    ----------
    path : str or os.PathLike
        Local path or fsspec URL of the model group.
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Returns
    -------
    estimator : a dmix mixture estimator (GaussianMixture, SkewNormalMixture, ...)
        Rebuilt from the saved constructor parameters (``client`` is None), with the fitted
        attributes set as ``fit`` sets them.

    Raises
    ------
    DmixError
        If there is no model at ``path``, its schema is not ``"dmix-model/1"``, it is
        incomplete (an interrupted save), an array does not match its checksum (naming the
        array), or it holds an estimator or parameters this version of dmix does not know.
    """
    where = os.fspath(path)
    try:
        group = zarr.open_group(store=where, mode="r", storage_options=storage_options)
        attrs = dict(group.attrs)
    except FileNotFoundError:
        raise DataError(f"No dmix model found at {where!r}: the path does not exist.") from None
    except zarr.errors.ContainsArrayError:
        raise DataError(f"No dmix model found at {where!r}: it is a Zarr array.") from None
    except (zarr.errors.BaseZarrError, ValueError) as exc:
        raise DataError(f"No dmix model found at {where!r}: it cannot be opened ({exc})."
                        ) from None
    schema = attrs.get("schema")
    if schema != MODEL_SCHEMA:
        raise DataError(
            f"No dmix model found at {where!r}: it is a Zarr group whose 'schema' attribute "
            f"is {schema!r}, not {MODEL_SCHEMA!r}.")
    if attrs.get("complete") is not True or "checksums" not in attrs:
        raise DataError(
            f"The model at {where!r} is incomplete: it was being written when the save "
            "stopped (or it was written without checksums by an older dmix). Save it again.")
    name = attrs.get("estimator")
    cls = _estimators().get(name)
    if cls is None:
        raise DmixError(
            f"The model at {where!r} is a {name!r}, which this version of dmix cannot load "
            f"(it knows {sorted(_estimators())}).")

    arrays = _read_arrays(group, attrs["checksums"], where)
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    settings = dict(attrs.get("settings") or {})
    for key in attrs.get("settings_arrays") or []:
        settings[key] = arrays[f"settings/{key}"]
    unknown = sorted(set(settings) - set(cls._param_names()))
    if unknown:
        raise DmixError(
            f"The model at {where!r} has settings {unknown} that {name} of this version of "
            f"dmix (from {attrs.get('dmix_version')!r}) does not take.")
    estimator = cls(**settings)
    prior = (attrs.get("family") or {}).get("prior")
    if prior is not None:  # resolved by the fit (defaults from the data): kept as fitted
        from dmix.families.priors import GaussianPrior

        estimator.prior_ = GaussianPrior.from_spec(prior)

    estimator.n_features_in_ = int(attrs["n_features_in_"])  # some families need it
    from dmix.families.base import family_spec

    family = estimator._family
    if family_spec(family) != attrs.get("family"):
        raise DataError(
            f"The model at {where!r} is inconsistent: its family {attrs.get('family')} is not "
            f"the one its settings give, {family_spec(family)}.")
    expected = set(estimator._param_keys(family))
    if set(params) != expected:
        raise DataError(
            f"The model at {where!r} has parameter arrays {sorted(params)}; a {name} with its "
            f"settings has {sorted(expected)}.")
    estimator._check_loaded_params(family, params, where)
    estimator._set_params(family, params)
    estimator.converged_ = bool(attrs["converged_"])
    estimator.n_iter_ = int(attrs["n_iter_"])
    estimator.lower_bound_ = _scalar(attrs["lower_bound_"])
    estimator.lower_bounds_ = [_scalar(v) for v in attrs["lower_bounds_"]]
    estimator.n_reseeded_ = int(attrs.get("n_reseeded_", 0))
    if attrs.get("fit_seconds_") is not None:
        estimator.fit_seconds_ = float(attrs["fit_seconds_"])
    d = estimator._params_n_features(params)
    if estimator.n_features_in_ != d:
        raise DataError(
            f"The model at {where!r} is inconsistent: n_features_in_ = "
            f"{estimator.n_features_in_} but the parameters have {d} features.")
    return estimator

