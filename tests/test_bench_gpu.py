"""pipelines/bench_gpu.py's plumbing, run with ``--smoke`` (tiny shapes on the CPU): every case
gives a row with positive finite times, a log-likelihood equal to the float64 evaluation (the
smoke run computes in float64), and scikit-learn's time. The GPU numbers need a GPU run."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "bench_gpu.py"


def test_bench_gpu_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--repeats", "1",
                           "--n-iter", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = report["rows"]
    assert [(r["n"], r["d"], r["k"], r["covariance"], r["placement"]) for r in rows] == [
        (20_000, 8, 4, "full", "device"), (20_000, 16, 32, "diag", "device"),
        (50_000, 8, 4, "full", "stream")]
    for r in rows:
        assert r["dtype"] == "float64" and r["workers"] == 2
        for key in ("fit_s", "estep_s", "gflops", "sklearn_s", "sklearn_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["loglik_rel_error"] < 1e-12
    assert rows[2]["gpu_busy"] > 0
    assert "ceilings" not in report and "--smoke" in report["note"]
    text = (tmp_path / "gpu.md").read_text()
    assert text.count("\n| 20,000 x") == 2 and "| 50,000 x 8 x 4 | full | stream |" in text
