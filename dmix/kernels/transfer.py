"""Host-to-device streaming of a block's sub-batches, the copy of the next overlapping the
compute of the current one.

A block in host memory is cut into sub-batches; each is copied (and cast to the compute dtype)
into one of two pinned host buffers by a helper thread, then sent to one of two device buffers
on its own CUDA stream. While the caller computes on sub-batch ``i`` (on the current stream),
sub-batch ``i + 1`` is staged and copied::

    helper thread   stage i+1 -> pinned[(i+1) % 2] -> H2D on copy stream -> event copied
    caller          wait copied[i % 2] on its stream, compute on device[i % 2], record used

A buffer is refilled only after the compute that read it has finished (the copy stream waits on
the ``used`` event, on the device, without blocking the host).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cupy
import numpy as np

__all__ = ["device_batches"]


def _pinned(shape, dtype) -> np.ndarray:
    """A host array in page-locked memory (from CuPy's pinned pool: reused across blocks)."""
    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(max(1, count) * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype, count).reshape(shape)


def device_batches(x, rows: int, dtype):
    """Yield ``x[lo : lo + rows]`` as CuPy arrays of ``dtype``, in order.

    ``x`` is a host (NumPy) array or already a CuPy array (then slices are only cast). A
    yielded array is valid until the next one is requested: its buffer is then refilled.
    """
    dtype = np.dtype(dtype)
    n, d = x.shape
    if isinstance(x, cupy.ndarray) or n == 0:
        for lo in range(0, max(1, n), rows):
            yield cupy.asarray(x[lo : lo + rows], dtype=dtype)
        return
    rows = min(rows, n)
    count = -(-n // rows)
    device = cupy.cuda.Device()
    pinned = [_pinned((rows, d), dtype) for _ in range(2)]
    buffers = [cupy.empty((rows, d), dtype) for _ in range(2)]
    copy_stream = cupy.cuda.Stream(non_blocking=True)
    compute_stream = cupy.cuda.get_current_stream()
    copied: list = [None, None]
    used: list = [None, None]

    def stage(i: int) -> int:
        slot, lo = i % 2, i * rows
        m = min(rows, n - lo)
        with device:
            if copied[slot] is not None:
                copied[slot].synchronize()  # the pinned buffer's last copy has left
            np.copyto(pinned[slot][:m], x[lo : lo + m], casting="same_kind")
            if used[slot] is not None:
                copy_stream.wait_event(used[slot])
            buffers[slot][:m].set(pinned[slot][:m], stream=copy_stream)
            copied[slot] = copy_stream.record()
        return m

    with ThreadPoolExecutor(1, thread_name_prefix="dmix-h2d") as pool:
        pending = pool.submit(stage, 0)
        for i in range(count):
            m, slot = pending.result(), i % 2
            compute_stream.wait_event(copied[slot])
            if i + 1 < count:
                pending = pool.submit(stage, i + 1)
            yield buffers[slot][:m]
            used[slot] = compute_stream.record()
        copy_stream.synchronize()
