"""Counter-based random numbers keyed by ``(seed, stream, global row index)``.

A block draws the numbers of its own rows from their global indices, so every random choice
made during a pass is the same whatever the chunking, the number of workers or the order in
which blocks run. The generator is SplitMix64's finaliser applied to the key (Steele, Lea and
Flood, OOPSLA 2014): not cryptographic, but equidistributed enough for sampling.
"""

from __future__ import annotations

import numpy as np

__all__ = ["keyed_uniform", "seed_sequence_int"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keyed_uniform(seed: int, stream: int, rows: np.ndarray, n_columns: int | None = None):
    """Uniform numbers in (0, 1) for global row indices ``rows`` (and columns, if given).

    Parameters
    ----------
    seed, stream : int
        The key: a user seed, and a stream number that separates independent uses of one seed
        (restart, round, purpose).
    rows : ndarray of int
        Global row indices.
    n_columns : int, optional
        If given, return (len(rows), n_columns) numbers, one per row and column.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed % 2**64) ^ _mix(np.uint64(stream % 2**64) + _GOLDEN))
        idx = np.asarray(rows, dtype=np.uint64)
        if n_columns is not None:
            idx = idx[:, None] * np.uint64(n_columns) + np.arange(n_columns, dtype=np.uint64)
        z = _mix(key ^ _mix(idx + _GOLDEN))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def seed_sequence_int(random_state) -> int:
    """An int seed from scikit-learn's ``random_state`` conventions.

    None draws fresh entropy; an int is used as is; a ``RandomState`` or ``Generator`` gives
    one draw from itself (advancing it, as scikit-learn's estimators do).
    """
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
    if isinstance(random_state, int | np.integer) and not isinstance(random_state, bool):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63))
    raise ValueError(
        f"random_state must be None, an int, a numpy RandomState or Generator. "
        f"Got {random_state!r} instead."
    )
