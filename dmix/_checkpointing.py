"""Checkpoints of the estimators: the checkpoint directory of a fit, what it records, and
:func:`resume`, which rebuilds an estimator from it and continues."""

from __future__ import annotations

import numbers
import os

import numpy as np

from dmix._estimator_base import check_number
from dmix.engine.loop import Monitor
from dmix.engine.stopping import criterion_spec
from dmix.errors import DmixError, InvalidParameterError
from dmix.families.base import family_spec
from dmix.io.checkpoint import (
    CheckpointDir,
    check_compatible,
    data_fingerprint,
    data_location,
    digest,
)

__all__ = ["CheckpointMixin", "resume"]


class CheckpointMixin:
    """The checkpoint handling of an estimator's ``fit``."""

    def _checkpoint_dir(self, checkpoint) -> CheckpointDir | None:
        if checkpoint is None:
            return None
        name = type(self).__name__
        check_number(name, "checkpoint_every", self.checkpoint_every, "int", 1)
        check_number(name, "checkpoint_keep", self.checkpoint_keep, "int", 1)
        if not isinstance(checkpoint, str | os.PathLike):
            raise InvalidParameterError(
                f"The 'checkpoint' parameter of {name} must be a path or URL (str). Got "
                f"{checkpoint!r} instead.")
        ckpt = CheckpointDir(checkpoint, every=self.checkpoint_every,
                             keep=self.checkpoint_keep)
        ckpt.check_writable()
        return ckpt

    def _open_checkpoint(self, ckpt, resume, X, source, data, family, user, seed, n_init,
                         client):
        """Describe this fit to ``ckpt`` and load what it holds; returns (loaded, seed)."""
        if not resume and not ckpt.is_empty():
            raise DmixError(
                f"The checkpoint directory {ckpt.url!r} holds checkpoints of an earlier fit. "
                "Pass resume=True (dmix fit --resume, or dmix resume DIR) to continue it, or "
                "choose an empty directory.")
        loaded = ckpt.load() if resume else None
        if loaded is not None and self.random_state is None:
            seed = int(loaded.attrs["seed"])  # an unseeded fit continues with its own seed
        fingerprint = data_fingerprint(data, source.description, data_location(X), client)
        must_match = {
            "estimator": type(self).__name__,
            "n_components": self.n_components,
            "n_init": n_init,
            "init_params": self.init_params,
            "seed": str(seed),
            "user_init": {k: digest(v) for k, v in sorted(user.items())},
        }
        spec = family_spec(family)
        if loaded is not None:
            check_compatible(loaded.attrs, family=spec, options=must_match,
                             fingerprint=fingerprint, where=ckpt.url)
        ckpt.discard_after(None if loaded is None else loaded.name)
        settings = {k: v for k, v in self.get_params().items()
                    if k not in ("client", "weights_init", "means_init", "precisions_init",
                                 "covariances_init")}
        if not isinstance(settings["random_state"], numbers.Integral):
            settings["random_state"] = None
        if settings["checkpoint"] is not None:
            settings["checkpoint"] = os.fspath(settings["checkpoint"])
        criterion = self._criterion()
        settings["stopping_criterion"] = criterion_spec(criterion)
        if settings["stopping_criterion"] is None:
            raise InvalidParameterError(
                f"{type(self).__name__}: a checkpointed fit needs a stopping_criterion that "
                "can be saved with it (a name, a dict, or a built-in of "
                "dmix.engine.stopping); a function cannot be saved.")
        ckpt.meta = {"estimator": type(self).__name__, "family": spec, "options": must_match,
                     "settings": settings, "data": fingerprint, "seed": str(seed),
                     "dmix_version": _version(), "versions": _versions()}
        ckpt.user_init = {f"{k}_init": v for k, v in user.items()}
        return loaded, seed


def _version() -> str:
    from dmix import __version__

    return __version__


def _versions() -> dict:
    import dask
    import zarr

    return {"dask": dask.__version__, "zarr": zarr.__version__, "numpy": np.__version__}




def resume(checkpoint, data=None, *, max_iter=None, client=None, device=None, dtype=None,
           monitor: Monitor | None = None):
    """Continue the fit whose checkpoints are in ``checkpoint``; return the fitted estimator.

    The estimator is rebuilt from the options saved with the checkpoints and fitted with
    ``resume=True``: the result is the one the uninterrupted fit would have given.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        The checkpoint directory (local path or fsspec URL) of the interrupted fit.
    data : array-like, dask array, zarr array or path/URL, optional
        The data of the fit. Default: the path or URL recorded in the checkpoint (in-memory
        data must be passed again).
    max_iter : int, optional
        A new iteration limit per initialisation (default: the one of the interrupted fit).
        It applies to the restart in progress and the later ones; restarts that had already
        ended are not continued.
    client : distributed.Client, optional
        The cluster to continue on (default: the current default client, else local).
    device, dtype : str, optional
        Where and in which precision the E-steps continue (default: as in the interrupted
        fit). A fit started on GPUs can go on on CPUs, and the other way round.
    monitor : dmix.engine.Monitor, optional
        Receives progress, as in ``fit``.

    Returns
    -------
    estimator : GaussianMixture, SkewNormalMixture, ...
        The estimator of the interrupted fit, fitted; its ``checkpoint`` is ``checkpoint``.

    Raises
    ------
    DmixError
        If ``checkpoint`` holds no complete checkpoint, or ``data`` is needed and not given.
    CheckpointMismatchError
        If ``data`` is not the data the checkpoints were written for.
    """
    from dmix._registry import estimator_classes

    estimators = estimator_classes()
    ckpt = CheckpointDir(checkpoint)
    loaded = ckpt.load()
    if loaded is None:
        raise DmixError(f"No complete checkpoint found in {ckpt.url!r}: nothing to resume.")
    attrs = loaded.attrs
    cls = estimators.get(attrs.get("estimator"))
    if cls is None:
        raise DmixError(f"The checkpoints in {ckpt.url!r} are of an estimator this version of "
                        f"dmix does not know: {attrs.get('estimator')!r}.")
    if data is None:
        data = attrs["data"].get("location")
        if data is None:
            raise DmixError(
                f"The checkpoints in {ckpt.url!r} were written for {attrs['data']['source']}, "
                "which has no path to reopen: pass the same data again (data=X, or --data).")
    settings = dict(attrs["settings"], random_state=int(attrs["seed"]),
                    checkpoint=os.fspath(checkpoint), client=client, **loaded.user_init)
    if max_iter is not None:
        settings["max_iter"] = max_iter
    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None:
            settings[key] = value
    return cls(**settings).fit(data, resume=True, monitor=monitor)
