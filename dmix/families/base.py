"""The family protocol: what a mixture family gives the engine, and the conventions it keeps.

Glossary (used in the maths and the shapes of every family): a block has ``n`` rows of ``D``
features; a model has ``K`` components; the whole dataset has ``N`` rows.

``Params``, ``Stats`` and ``State`` are flat ``dict``s of NumPy arrays (or Python scalars), so
they pickle, checkpoint and reduce without special cases:

* ``Params`` -- the model parameters, float64, on the driver.
* ``Stats`` -- what a block returns from :meth:`Family.estep`: float64 host arrays, additive over
  blocks. Every family's ``Stats`` carry ``n`` (rows), ``loglik`` (sum of ``log p(x)`` over the
  rows at the current parameters) and ``n_nonfinite`` (rows whose log-density was not finite;
  their other statistics are zero, so one bad row never poisons a sum with NaN).
* ``State`` -- driver-side state of the M-step (optimizer moments for gradient families); the
  closed-form families leave it empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import numpy as np

__all__ = ["Family", "Params", "Stats", "State", "tree_accumulate", "tree_add", "tree_allclose"]

Params = dict[str, Any]
Stats = dict[str, Any]
State = dict[str, Any]

#: Keys every ``Stats`` carries, whatever the family.
REQUIRED_STATS = ("n", "loglik", "n_nonfinite")


class Family(Protocol):
    """A mixture family that the engine fits without knowing what it is.

    A family is a frozen dataclass of hyperparameters. It never imports Dask, Zarr or CuPy: the
    worker-side methods receive the array namespace ``xp`` of the block.
    """

    name: ClassVar[str]

    def estep(self, params: Params, x, xp, workspace=None) -> Stats:
        """Statistics of one block ``x`` (n, D) at ``params``. Pure; runs on a worker.

        ``workspace`` (a :class:`dmix.xp.Workspace`) holds scratch buffers that the engine
        reuses across the sub-batches of a block; a family may ignore it. Statistics returned
        with a workspace may be views of its buffers, valid until the next call with it: the
        engine adds each sub-batch's statistics into its running sums at once
        (:func:`tree_accumulate`).

        Row index (optional): a family whose attribute ``needs_row_index`` is true (a class
        attribute or a property) is called as ``estep(params, x, xp, workspace=ws,
        start=row)``, ``row`` the global index of ``x``'s first row in the data, so that
        random draws keyed by the row (:func:`dmix.rng.keyed_uniform`) do not depend on the
        chunking. Families without it (or with it false) are called without ``start``.
        """

    def combine(self, a: Stats, b: Stats) -> Stats:
        """Merge two statistics; associative and commutative."""

    def mstep(self, params: Params, stats: Stats, state: State) -> tuple[Params, State]:
        """New parameters from the reduced statistics. Runs on the driver."""

    def log_density(self, params: Params, x, xp, workspace=None):
        """``log p(x)`` per row, shape (n,)."""

    def predict_proba(self, params: Params, x, xp, workspace=None):
        """Posterior component probabilities per row, shape (n, K)."""

    def n_parameters(self, params: Params) -> int:
        """Number of free parameters, for BIC and AIC."""

    def sample(self, params: Params, n_samples: int, rng: np.random.Generator):
        """Draw ``(X, labels)`` from the model."""

    def temp_bytes_per_row(self, n_features: int, n_components: int) -> int:
        """Bytes of E-step temporaries per row, so the engine can size sub-batches."""


def tree_add(a: Stats, b: Stats) -> Stats:
    """Key-wise sum of two statistics dictionaries with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"Cannot add statistics with keys {sorted(a)} and {sorted(b)}.")
    return {k: a[k] + b[k] for k in a}


def tree_accumulate(total: Stats | None, part: Stats) -> Stats:
    """``total + part`` key-wise, written into ``total``'s arrays (a copy of ``part`` if
    ``total`` is None). The engine sums the sub-batches of a block this way: no new arrays
    per sub-batch (see :class:`dmix.xp.Workspace` for why that matters on Dask workers)."""
    if total is None:
        return {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                for k, v in part.items()}
    if total.keys() != part.keys():
        raise ValueError(f"Cannot add statistics with keys {sorted(total)} and {sorted(part)}.")
    for k, v in part.items():
        if isinstance(total[k], np.ndarray) and total[k].ndim:
            total[k] += v
        else:
            total[k] = total[k] + v
    return total


def tree_allclose(a: Stats, b: Stats, rtol: float, atol: float = 0.0) -> bool:
    """Whether two statistics dictionaries agree key by key within tolerances."""
    return a.keys() == b.keys() and all(
        np.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a
    )


#: Field metadata: a field with ``{SPEC_OMIT_DEFAULT: True}`` is left out of
#: :func:`family_spec` while it has its default (per-iteration or per-fit state such as a
#: stochastic E-step's iteration and seed, and options whose default keeps older specs valid).
SPEC_OMIT_DEFAULT = "dmix_spec_omit_default"


def family_spec(family) -> dict:
    """A JSON-serialisable description of a family: its name and hyperparameters (arrays, such
    as a prior's, as nested lists); fields marked :data:`SPEC_OMIT_DEFAULT` are left out while
    at their default."""
    values = dataclasses.asdict(family)
    for f in dataclasses.fields(family):
        if f.metadata.get(SPEC_OMIT_DEFAULT) and values.get(f.name) == f.default:
            del values[f.name]
    return {"name": family.name, **_plain(values)}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, tuple | list):  # as JSON has them: a spec read back compares equal
        return [_plain(v) for v in value]
    return value
