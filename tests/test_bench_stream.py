"""Smoke test of pipelines/bench_stream.py: a tiny run as a real process, then the JSON it wrote.

Only the structure and the signs of the numbers are checked, never timings.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "bench_stream.py"
CODECS = ("none", "zstd0", "blosc_lz4_shuffle")


def _positive(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and (
        math.isfinite(value) and value > 0)


@pytest.mark.slow
def test_bench_stream_tiny(tmp_path):
    out, work = tmp_path / "bench.json", tmp_path / "work"
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--n-samples", "6000", "--n-features", "3",
         "--n-components", "2", "--n-chunks", "3", "--n-iter", "2", "--repeats", "1",
         "--dtype", "float32", "--out-json", str(out), "--workdir", str(work)],
        check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "streaming/persisted throughput" in done.stdout
    assert {p.name for p in work.iterdir()} == {f"{c}.zarr" for c in CODECS}  # kept

    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "config", "codecs", "em", "overhead", "ratios",
                           "targets", "total_s"}
    env_info = result["environment"]
    for key in ("dask", "distributed", "zarr", "numpy"):
        assert isinstance(env_info[key], str) and env_info[key]
    assert env_info["cpu_count"] >= 1

    config = result["config"]
    assert (config["n_samples"], config["n_features"], config["n_components"]) == (6000, 3, 2)
    assert (config["n_chunks"], config["chunk_rows"], config["dtype"]) == (3, 2000, "float32")
    assert config["nbytes"] == 6000 * 3 * 4

    assert set(result["codecs"]) == set(CODECS)
    for codec in result["codecs"].values():
        for key in ("ratio", "stored_bytes", "write_s", "write_gb_per_s", "read_s",
                    "read_gb_per_s", "read_gb_per_s_median", "dask_read_s",
                    "dask_read_gb_per_s", "dask_read_gb_per_s_median"):
            assert _positive(codec[key]), (key, codec[key])
    assert result["codecs"]["none"]["ratio"] == pytest.approx(1.0, abs=0.01)

    em = result["em"]
    for key in ("stream_none", "stream_zstd0", "persisted"):
        for field in ("iter_s", "iter_s_min", "rows_per_s", "gb_per_s"):
            assert _positive(em[key][field]), (key, field, em[key][field])
        assert math.isfinite(em[key]["lower_bound"])
    assert sum(em["persisted"]["blocks_per_worker"]) == 3
    assert _positive(em["persisted_from_path"]["first_iter_s"])
    assert _positive(em["persisted_from_path"]["later_iter_s"])

    for key in ("empty_pass_s", "real_iter_s", "fraction", "per_task_ms"):
        assert _positive(result["overhead"][key]), key
    for key, value in result["ratios"].items():
        assert _positive(value), key
    assert {"stream_over_persisted_min", "overhead_fraction_max", "stream_none_met",
            "stream_zstd0_met", "overhead_met"} <= set(result["targets"])
