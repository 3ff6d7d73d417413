"""pipelines/bench_gpu.py's plumbing without a GPU.

``--smoke`` runs every case that one CPU can stand in for (tiny shapes, two CPU workers,
float64): each gives a row with positive finite times, scikit-learn's time, a lower bound equal
to the float64 CPU evaluation, and the 2-GPU case is skipped with a note, as are the CuPy
ceilings. The report's GPU-only parts (ceilings, fractions of them, the streamed rate against
the host-to-device copy) are checked on a made-up report. The numbers themselves need a GPU run.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("dmix_bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--repeats", "1",
                           "--n-iter", "2", "--sklearn-iter", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert "--smoke" in report["command"] and report["date"] and report["machine"]["cores"] >= 1
    rows = report["rows"]
    cases = [(r["case"], r["n"], r["d"], r["k"], r["covariance"], r["placement"]) for r in rows]
    assert cases == [("full64", 20_000, 8, 4, "full", "device"),
                     ("diag1024", 20_000, 16, 32, "diag", "device"),
                     ("stream32", 50_000, 8, 4, "full", "stream")]
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "float64" and r["workers"] == 2
        assert len(r["fit_s_all"]) == 3 and r["blocks"] >= 2
        for key in ("fit_s", "gflops", "estep_s", "estep_gflops", "sklearn_s", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["sklearn_threads"] >= 1
        assert r["lower_bound_ok"] and r["lower_bound_rel_error"] < 1e-10
        assert math.isfinite(r["lower_bound"]) and r["lower_bound"] < 0
        assert "fraction_of_ceiling" not in r  # no ceilings measured on --smoke
    stream = rows[2]
    assert stream["stream_gbs"] > 0 and stream["gpu_busy"] > 0
    assert "ceilings" not in report
    assert any("no GPU ceilings" in n for n in report["notes"])
    assert any(n.startswith("2gpus skipped") for n in report["notes"])
    text = (tmp_path / "gpu.md").read_text()
    assert "| stream32 | 50,000 x 8 x 4 | full | stream | CPU | float64 |" in text
    assert text.count("| yes |") == 3 and "2gpus skipped" in text


def test_bench_gpu_report_with_ceilings(monkeypatch):
    bench = _load()
    rate = {"gflops": 50_000.0, "rel_error": 1e-6, "all_written": True}
    ceil = {"gpu": "Test GPU", "n_gpus": 2, "gpu_memory_gb": 80.0, "sms": 132,
            "cuda_runtime": 13000, "cuda_driver": 13000, "cupy": "14.2.0", "fp32": rate,
            "tf32": {**rate, "gflops": 400_000.0, "rel_error": 3e-4}, "fp64": rate,
            "tf32_in_effect": True, "copy": {"gbs": 3000.0, "correct": True},
            "h2d_pinned": {"gbs": 50.0, "correct": True}, "stage_f64_to_f32_gbs": 5.0}
    monkeypatch.delenv("CUPY_TF32", raising=False)
    assert bench.relevant_ceiling(ceil, "float32") == ("fp32", 50_000.0)
    assert bench.relevant_ceiling(ceil, "float64") == ("fp64", 50_000.0)
    assert bench.relevant_ceiling(None, "float32") == ("fp32", None)
    monkeypatch.setenv("CUPY_TF32", "1")
    assert bench.relevant_ceiling(ceil, "float32") == ("tf32", 400_000.0)

    base = {"n": 10_000_000, "d": 32, "k": 32, "covariance": "full", "device": "cuda",
            "dtype": "float32", "blocks": 77, "fit_s": 0.1, "gflops": 7000.0,
            "ceiling": "fp32", "fraction_of_ceiling": 0.14, "lower_bound": -50.0,
            "lower_bound_ref": -50.0001, "lower_bound_rel_error": 2e-6, "lower_bound_ok": True}
    stream = {**base, "case": "stream32", "placement": "stream", "gpus": 1, "estep_s": 0.02,
              "estep_fraction_of_ceiling": 0.7, "stream_gbs": 12.8, "h2d_fraction": 0.256,
              "gpu_busy": 0.2, "sklearn_s": 30.0, "sklearn_threads": 16, "speedup": 300.0}
    two = {**base, "case": "2gpus", "placement": "device", "gpus": 2, "lower_bound_ok": False,
           "speedup_vs_1gpu": 1.9}
    report = {"command": "python pipelines/bench_gpu.py", "date": "2026-11-22T00:00+00:00",
              "machine": {"cpu": "Test CPU", "cores": 16}, "ceilings": ceil, "notes": ["x"],
              "rows": [stream, two]}
    text = bench.markdown(report)
    assert "Ceilings on Test GPU (2 visible" in text
    assert "| float32 product 8192^3 | 50,000 GFLOP/s | 1.0e-06 |" in text
    assert "| TF32 (CUPY_TF32=1) product 8192^3 | 400,000 GFLOP/s | 3.0e-04 |" in text
    assert "| host-to-device copy, 1 GiB pinned | 50.0 GB/s | - |" in text
    assert ("| stream32 | 10,000,000 x 32 x 32 | full | stream | 1 | float32 | 77 | 0.1 "
            "| 7,000 | 14% fp32 | 0.02 | 70% | 12.8 (26%) | 20% | 30 (16) | 300.0 |") in text
    assert "| 2gpus | 10,000,000 x 32 x 32 | full | device | 2 |" in text
    assert "| 2gpus | -50 | -50.0001 | 2.0e-06 | **NO** |" in text
    assert "2 GPUs: 1.90 times the iterations per second of one." in text
    assert "did not take effect" not in text and "Note: x" in text
