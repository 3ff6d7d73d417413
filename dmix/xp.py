"""Array-namespace helpers: the only module that branches on NumPy versus CuPy.

Family code receives the namespace ``xp`` of the block it works on and calls the helpers here
for what the array API lacks (``logsumexp``) or spells differently between backends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from dmix.errors import DeviceError

__all__ = [
    "DEVICES",
    "Compute",
    "Workspace",
    "asarray_f64",
    "batches",
    "check_device",
    "device_problem",
    "get_namespace",
    "is_cupy",
    "logsumexp",
    "quiet_nonfinite",
    "special",
    "to_device",
    "to_host",
]


def is_cupy(x) -> bool:
    """Whether ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_namespace(x):
    """Return the array module (``numpy`` or ``cupy``) that owns ``x``."""
    if is_cupy(x):
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """Copy ``x`` to a NumPy array on the host (no copy when it already is one)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def asarray_f64(x, xp):
    """``x`` as a float64 array of namespace ``xp`` (no copy when it already is one)."""
    return xp.asarray(x, dtype=xp.float64)


def quiet_nonfinite(xp):
    """A context in which NumPy does not warn about inf or nan arising in arithmetic.

    The E-step counts rows whose log-density is not finite and raises an error naming them;
    NumPy's RuntimeWarnings about the same rows would only be noise before it. (CuPy does not
    warn.)
    """
    if xp is np:
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")
    return contextlib.nullcontext()


def logsumexp(a, axis: int, xp):
    """``log(sum(exp(a), axis))`` with the maximum subtracted first.

    Rows whose entries are all ``-inf`` give ``-inf``; a ``nan`` or ``+inf`` propagates, so the
    caller can count non-finite rows from the result.
    """
    amax = xp.max(a, axis=axis, keepdims=True)
    # A row of -inf has max -inf; subtracting it would give nan, so shift by 0 there.
    amax = xp.where(xp.isfinite(amax), amax, 0.0)
    out = xp.log(xp.sum(xp.exp(a - amax), axis=axis, keepdims=True)) + amax
    return xp.squeeze(out, axis=axis)


def special(name: str, xp):
    """The special function ``name`` (``log_ndtr``, ``erfcx``...) for arrays of namespace ``xp``.

    These are not in the array API standard: NumPy arrays get :mod:`scipy.special`'s, CuPy
    arrays :mod:`cupyx.scipy.special`'s. Raises :class:`NotImplementedError`, naming the
    function and the namespace, where the backend lacks it (no silent copy to the host).
    """
    if xp is np:
        import scipy.special as module
    elif getattr(xp, "__name__", "") == "cupy":
        import cupyx.scipy.special as module
    else:
        module = None
    function = getattr(module, name, None)
    if function is None:
        raise NotImplementedError(
            f"The special function {name!r} is not available for {getattr(xp, '__name__', xp)} "
            "arrays; compute on the CPU (NumPy).")
    return function


class Workspace:
    """Scratch arrays reused across the sub-batches of one block, in the compute ``dtype``.

    Allocating a fresh multi-megabyte temporary per sub-batch is slow on Dask workers: the
    Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which turns off glibc's adaptive mmap threshold, so
    every such array is mmapped, page-faulted and unmapped again (measured here: 4x slower
    E-steps). Methods that take a workspace write their large temporaries into its buffers.
    Their arithmetic runs in the workspace's ``dtype`` (float64 unless the caller asks for
    float32); the statistics they return are float64 whatever it is.
    """

    def __init__(self, dtype="float64"):
        self.dtype = np.dtype(dtype)
        self._flat: dict = {}
        self._memo: dict = {}

    def asarray(self, a, xp):
        """``a`` (parameters, usually NumPy float64) as an ``xp`` array of the compute dtype."""
        return xp.asarray(a, dtype=self.dtype)

    def take(self, name: str, shape: tuple, xp, dtype=None):
        """An uninitialised array of ``shape`` backed by the buffer called ``name``."""
        dtype = self.dtype if dtype is None else dtype
        size = 1
        for s in shape:
            size *= int(s)
        buf = self._flat.get(name)
        if buf is None or buf.size < size or get_namespace(buf) is not xp or buf.dtype != dtype:
            buf = xp.empty(max(size, 1), dtype=dtype)
            self._flat[name] = buf
        return buf[:size].reshape(shape)

    def memo(self, name: str, key, compute):
        """``compute()``, cached until it is asked for with another ``key`` object.

        Per-parameter constants (precision matrices, coefficient tables) are computed once per
        block, not once per sub-batch: the engine passes the same parameters object to every
        sub-batch, and identity (``is``) decides whether the cached value still holds.
        """
        held = self._memo.get(name)
        if held is None or held[0] is not key:
            held = (key, compute())
            self._memo[name] = held
        return held[1]


#: Devices an E-step can run on.
DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Compute:
    """Where and in which precision the E-step runs (statistics are float64 either way).

    ``device="cuda"``: every task copies its block to the worker's GPU (device 0 of the
    worker's visible devices), computes there, and returns NumPy statistics, so the graph, the
    scheduler and the client stay NumPy-only.
    """

    device: str = "cpu"
    dtype: str = "float64"

    @classmethod
    def from_options(cls, device="cpu", dtype=None) -> Compute:
        """Validate user options; ``dtype=None`` is float32 on ``cuda``, float64 on ``cpu``."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}. Got {device!r} instead.")
        if dtype is None:
            dtype = "float32" if device == "cuda" else "float64"
        name = getattr(np.dtype(dtype), "name", None) if _is_dtype(dtype) else None
        if name not in _DTYPES:
            raise ValueError(f"dtype must be 'float32', 'float64' or None. Got {dtype!r} "
                             "instead.")
        return cls(device, name)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


def _is_dtype(dtype) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot compute in this process, or None if it can.

    Run on every worker before a fit (the client itself needs no GPU); it returns rather than
    raises, so that workers do not log a traceback for what the driver reports in one line.
    """
    if device == "cpu":
        return None
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install 'dmix[gpu]'"
    if not cupy.is_available():
        return ("CuPy finds no usable CUDA GPU (cupy.is_available() is False): check the "
                "driver and CUDA_VISIBLE_DEVICES")
    return None


def check_device(device: str) -> None:
    """Raise :class:`~dmix.errors.DeviceError` if ``device`` cannot compute in this process."""
    problem = device_problem(device)
    if problem:
        raise DeviceError(f"device={device!r} cannot run here: {problem}; or use "
                          "device='cpu'.")


def to_device(x, compute: Compute):
    """Block ``x`` on ``compute.device``: CuPy of the compute dtype on ``cuda``, else as is."""
    if compute.device == "cpu":
        return x
    import cupy

    return cupy.asarray(x, dtype=compute.dtype)


def batches(x, rows: int, compute: Compute):
    """Sub-batches of ``rows`` rows of block ``x``, on ``compute.device``.

    On the CPU they are views of ``x`` (the family casts them into its workspace's dtype). On
    CUDA, :func:`dmix.kernels.transfer.device_batches` copies them, the next one's copy
    overlapping the current one's compute; each is valid until the next is taken.
    """
    if compute.device == "cpu":
        for lo in range(0, max(1, x.shape[0]), rows):
            yield x[lo : lo + rows]
        return
    from dmix.kernels.transfer import device_batches

    yield from device_batches(x, rows, compute.dtype)
