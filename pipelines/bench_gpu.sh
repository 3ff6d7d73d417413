#!/usr/bin/env bash
# pipelines/bench_gpu.py on a GPU machine whose Python has CuPy, NumPy, SciPy, scikit-learn,
# pandas, numba and psutil but no dask, distributed, dask-cuda or zarr (the lent GPU machines
# of the device tool: Python 3.12, CUDA 13, no network). The missing packages travel as wheels.
#
#   bash pipelines/bench_gpu.sh download         # here, with PyPI: wheels into .whl/ (5 MB)
#   bash pipelines/bench_gpu.sh run --out "$OUT"  # there, with .whl carried; the arguments go
#                                                # to bench_gpu.py (--cases, --skip-sklearn)
#
# With the device tool: run(command="bash pipelines/bench_gpu.sh run --out $OUT",
# carry=[".whl"]); the reports come back as $OUT/gpu.md and $OUT/gpu.json.
#
# Versions: dask-cuda 26.10 pins dask and distributed 2026.7.1 (through rapids-dask-dependency),
# and zarr 3.4 needs Python >= 3.12, which the GPU machine has. --no-deps everywhere: every
# other requirement (numpy, pandas, nvidia-ml-py, cuda-core, click, cloudpickle, fsspec, toolz,
# pyyaml, msgpack, psutil, sortedcontainers, jinja2, packaging, typing-extensions) is in
# that machine's image. zarr's msgspec is not, so it travels too.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PACKAGES=(dask==2026.7.1 distributed==2026.7.1 dask-cuda==26.10.0
          rapids-dask-dependency==26.10.0 zarr==3.4.2 numcodecs==0.17.1 msgspec==0.22.0
          donfig==0.8.1.post1 google-crc32c==1.9.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2
          zict==3.0.0 tornado==6.6.1)

case "${1:-}" in
download)
    # A relative folder is kept out of git (and so of commits), not out of the device's copy.
    exclude=$(git rev-parse --git-path info/exclude)
    if [[ $WHEELS != /* ]] && ! grep -qx "/$WHEELS/" "$exclude" 2>/dev/null; then
        echo "/$WHEELS/" >> "$exclude"
    fi
    platforms=()
    for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    # The repository root on the path: dmix runs from this checkout, without an install.
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv || true
    python3 pipelines/bench_gpu.py "$@"
    ;;
*)
    sed -n 2,18p "$0"
    exit 2
    ;;
esac
