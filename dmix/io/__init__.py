"""Where data and state live: sources (NumPy, Dask, Zarr, paths and URLs) and stores."""

from dmix.io.source import Source, as_source

__all__ = ["Source", "as_source"]
