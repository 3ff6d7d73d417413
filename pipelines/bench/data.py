"""The benchmark's datasets, generated once and cached on disk.

A dataset directory ``<root>/n{N}-d{D}-k{K}-s{seed}/`` holds:

- ``X.npy``: the rows, float64, drawn from :func:`dmix.datasets.make_mixture` (K Gaussian
  components with full covariances, separation 6);
- ``X.zarr``: the same rows in an uncompressed Zarr v3 array (``dmix make-data``'s default
  codec: float features barely compress, and decompression would slow every pass), in chunks
  of one eighth of the rows at most, for dmix's streamed runs;
- ``init.npz``: the start every library is given: uniform ``weights``, the true means moved by
  0.5 in every coordinate (``means``), and unit covariances as ``covariances_full`` (K, D, D)
  and ``covariances_diag`` (K, D);
- ``done``: written last, so an interrupted generation is redone, not trusted.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

#: Rows generated and written per step (bounded memory for the 1e8-row scaling dataset).
_STEP_ROWS = 2_000_000


def dataset_dir(root: Path, n: int, d: int, k: int, seed: int = 0) -> Path:
    return Path(root) / f"n{n}-d{d}-k{k}-s{seed}"


def prepare(root: Path, n: int, d: int, k: int, seed: int = 0, *, npy: bool = True,
            zarr_store: bool = True) -> Path:
    """Generate the dataset (N, D, K, seed) under ``root`` unless it is there; return its dir.

    ``npy=False`` skips ``X.npy`` (datasets only ever streamed, larger than memory).
    """
    from dmix.datasets import make_mixture
    from dmix.io.store import write_blocks

    out = dataset_dir(root, n, d, k, seed)
    wanted = {"npy": npy, "zarr": zarr_store}
    done = out / "done"
    if done.exists() and all(json.loads(done.read_text()).get(key) for key, v in wanted.items()
                             if v):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = make_mixture(n, d, k, seed)
    if npy:
        x = np.lib.format.open_memmap(out / "X.npy", mode="w+", dtype=np.float64, shape=(n, d))
        for lo in range(0, n, _STEP_ROWS):
            x[lo : lo + _STEP_ROWS] = data.rows(lo, min(n, lo + _STEP_ROWS))
        x.flush()
        del x
    if zarr_store:
        chunk = min(math.ceil(n / 8), max(1, 2**25 // (8 * d)))  # <= 32 MiB, >= 8 chunks
        step = max(chunk, _STEP_ROWS // chunk * chunk)
        write_blocks(out / "X.zarr", n, d, data.rows, chunk, block_rows=step, compressors=None,
                     max_workers=2)
    true = data.params
    np.savez(out / "init.npz", weights=np.full(k, 1.0 / k), means=true["means"] + 0.5,
             covariances_full=np.broadcast_to(np.eye(d), (k, d, d)).copy(),
             covariances_diag=np.ones((k, d)))
    done.write_text(json.dumps(wanted))
    return out
