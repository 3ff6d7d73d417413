"""Declarative end-to-end jobs: ``dmix run PIPELINE.toml``.

A pipeline file says where the data come from (generated, a Zarr store, or .npy/.csv/.parquet
files ingested into Zarr), which model(s) to fit or which grid to select from, on which
cluster, with which checkpoints, and what to write. :data:`SCHEMA` lists every section and key.
"""

from dmix.pipeline.runner import plan, run_pipeline
from dmix.pipeline.schema import SCHEMA, Pipeline, PipelineError, load_pipeline

__all__ = ["SCHEMA", "Pipeline", "PipelineError", "load_pipeline", "plan", "run_pipeline"]
