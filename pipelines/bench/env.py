"""The benchmark's own virtual environment: dmix plus the peer libraries it is compared with.

The peers (scikit-learn, pomegranate, pycave, Spark ML) are not dependencies of dmix, and two of
them need a pinned, partly unsupported stack, so they live in a separate venv, by default
``pipelines/bench/.venv`` (ignored by git). ``ensure_env()`` creates it and returns its python;
``python pipelines/bench/env.py`` does the same and prints that path.

Idempotence: a marker file in the venv holds a hash of everything below that decides its
contents (the pip steps, the lightkit patch, the Python version). When the hash matches, nothing
is done; when it differs or the marker is missing (a new or half-built venv), the venv is
recreated from scratch and the marker written only once every step has succeeded.

Install steps, in order (all versions pinned in ``PINS`` / ``PIP_STEPS``):

1. torch, the CPU wheel (pip finds it in the local wheel directory).
2. dmix itself, editable, so the orchestrator can run dmix in the same venv.
3. scikit-learn, scipy, psutil, matplotlib, pyarrow (Spark's data are handed over as Parquet),
   pyspark (4.0.x: runs on Java 17 and Python 3.11), pomegranate.
4. pycave's runtime dependencies, explicitly: pytorch-lightning 1.9.5, torchmetrics 0.11.4,
   setuptools < 81 (the lightning_fabric that comes with pytorch-lightning 1.9 imports
   ``pkg_resources``, which setuptools 82 no longer ships).
5. lightkit 0.5.0 and pycave 3.2.1 with ``--ignore-requires-python --no-deps``: both declare
   Python < 3.11, torch < 2 (lightkit: < 1.13) and numpy < 2, yet run on this stack.

Then ``LIGHTKIT_PATCH`` is applied to the installed lightkit (see its comment); it fails loudly
when the expected text is not found. pytorch-lightning 1.9 also uses ``numpy.Inf`` (removed in
NumPy 2), but only in its EarlyStopping and ModelCheckpoint callbacks, which ``peers.py`` never
creates (convergence tolerance 0, no checkpoints), so no alias is needed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / "pipelines" / "bench" / ".venv"
MARKER = ".dmix-bench-env"

PINS = {
    "torch": "2.13.0",
    "scikit-learn": "1.9.1",
    "scipy": "1.17.1",
    "psutil": "7.2.2",
    "matplotlib": "3.11.2",
    "pyarrow": "26.0.1",
    "pyspark": "4.0.5",
    "pomegranate": "1.1.2",
    "pytorch-lightning": "1.9.5",
    "torchmetrics": "0.11.4",
    "lightkit": "0.5.0",
    "pycave": "3.2.1",
}


def _pin(*names: str) -> list[str]:
    return [f"{name}=={PINS[name]}" for name in names]


PIP_STEPS: list[list[str]] = [
    _pin("torch"),
    ["-e", str(REPO)],
    _pin("scikit-learn", "scipy", "psutil", "matplotlib", "pyarrow", "pyspark", "pomegranate"),
    [*_pin("pytorch-lightning", "torchmetrics"), "setuptools<81"],
    ["--ignore-requires-python", "--no-deps", *_pin("lightkit", "pycave")],
]

# lightkit 0.5.0's RangeBatchSampler (used by pycave's DataLoader) subclasses torch's Sampler
# and calls ``super().__init__(None)``; torch 2.13's Sampler no longer has an ``__init__``
# taking the (unused) ``data_source`` argument, so every pycave fit dies with "TypeError:
# object.__init__() takes exactly one argument (the instance to initialize)".
LIGHTKIT_PATCH = {
    "file": "lightkit/data/sampler.py",
    "old": "super().__init__(None)",
    "new": "super().__init__()",
}


def _spec_hash() -> str:
    spec = {"steps": PIP_STEPS, "patch": LIGHTKIT_PATCH, "python": sys.version}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def _patch_lightkit(python: Path) -> None:
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    target = Path(site) / LIGHTKIT_PATCH["file"]
    text = target.read_text()
    old, new = LIGHTKIT_PATCH["old"], LIGHTKIT_PATCH["new"]
    found = text.count(old)
    if found != 1:
        raise RuntimeError(f"lightkit patch: expected {old!r} once in {target}, found it "
                           f"{found} times; has the lightkit version changed?")
    target.write_text(text.replace(old, new))


def ensure_env(path: Path | None = None) -> Path:
    """Create or update the benchmark venv at ``path`` (default ``DEFAULT_PATH``); return its
    python. Does nothing when the venv was built from the current spec."""
    path = Path(path) if path is not None else DEFAULT_PATH
    python = _python(path)
    marker = path / MARKER
    digest = _spec_hash()
    if python.exists() and marker.exists() and marker.read_text().strip() == digest:
        return python
    print(f"building the benchmark venv in {path}", file=sys.stderr, flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(path)
    for args in PIP_STEPS:
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    _patch_lightkit(python)
    marker.write_text(digest + "\n")
    return python


if __name__ == "__main__":
    print(ensure_env())
