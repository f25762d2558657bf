"""Host <-> device copies for REMOTE retrieval through pinned host memory (MLX's CUDA backend).

A REMOTE layer moves its queries to the host (for the memory service) and the hits back to the
device, at every layer of every forward. MLX's CUDA backend moves data through managed memory:
``np.array`` of a device array first moves the array's buffer into managed memory (an allocation,
a copy and a free, each synchronising), ``mx.array`` of a numpy array makes a managed array that
the device then faults in page by page, and both buffers go back to MLX's buffer cache for later
outputs. On the H200 that cost ~0.75 ms a layer against ~0.15 ms through pinned memory
(docs/architecture.md, "Host transfers"; bench/RESULTS.md).

``HostStaging`` owns page-locked host buffers (the CUDA driver's ``cuMemHostAlloc``, mapped into
the device's address space): a kernel writes the queries into one and the host reads them; the
host writes the hits into another and a kernel copies them into a device array. Off CUDA (CPU,
Metal: one memory) it is ``np.array`` / ``mx.array``. One staging per retriever; all calls on the
MLX thread. Stagings are pooled (``acquire`` / ``release``): a retriever is often dropped by the
garbage collector, on any thread, and a buffer must not be freed while a queued kernel reads it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from services.generator import kernel_parts

log = logging.getLogger("extmind.generator")

_THREADS = 256
_ALIGN = 256  # bytes: each array's place in a buffer
_MIN_BYTES = 1 << 16
# A copy past this takes MLX's own path (a long batched prefill's hits, where the layer's own
# work dwarfs the transfer's overhead); a pooled staging keeps buffers up to KEEP_BYTES.
MAX_BYTES = 1 << 26
KEEP_BYTES = 1 << 22

# CUDA driver API (cuda.h): cuMemHostAlloc flags
_PORTABLE, _DEVICEMAP = 0x01, 0x02


class HostBuffer:
    """``nbytes`` of host memory the device reads and writes: ``host`` (uint8 numpy view) and
    ``address`` (the device's pointer to it, an int)."""

    def __init__(self, host: np.ndarray, address: int, free: Callable[[], None]):
        self.host, self.address, self._free = host, address, free
        self.pointer = kernel_parts.on_device(mx.array([address, address], mx.int64))  # a kernel input

    def free(self) -> None:
        self._free()


@functools.cache
def _driver():
    """libcuda through ctypes (five calls: not worth a binding package), or None."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    P = ctypes.POINTER
    lib.cuMemHostAlloc.argtypes = [P(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostGetDevicePointer_v2.argtypes = [P(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    lib.cuMemFreeHost.argtypes = [ctypes.c_void_p]
    lib.cuCtxGetCurrent.argtypes = [P(ctypes.c_void_p)]
    lib.cuDevicePrimaryCtxRetain.argtypes = [P(ctypes.c_void_p), ctypes.c_int]
    lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    return lib


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed (CUresult {result})")


def pinned(nbytes: int) -> HostBuffer:
    """A page-locked host buffer mapped into the device's address space (MLX's device 0, whose
    primary context MLX uses). Raises RuntimeError when the driver refuses."""
    lib = _driver()
    ctx = ctypes.c_void_p()
    _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:  # a thread MLX has not run on yet
        _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
        _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    p = ctypes.c_void_p()
    _check(lib.cuMemHostAlloc(ctypes.byref(p), nbytes, _PORTABLE | _DEVICEMAP), "cuMemHostAlloc")
    device = ctypes.c_uint64()
    try:
        _check(lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device), p, 0), "cuMemHostGetDevicePointer")
    except RuntimeError:
        lib.cuMemFreeHost(p)
        raise
    host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(p.value))
    return HostBuffer(host, device.value, lambda: lib.cuMemFreeHost(p))


def available() -> bool:
    """Whether MLX computes on its CUDA backend and the driver library loads."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available() and _driver() is not None


class HostStaging:
    """Host <-> device copies through two host buffers (``allocate``: ``pinned`` by default; off
    CUDA, plain ``np.array`` / ``mx.array``). Buffers grow to the largest copy seen up to
    ``MAX_BYTES``; a larger copy, or one whose buffer the driver refuses, takes MLX's own path."""

    def __init__(self, allocate: Callable[[int], HostBuffer] | None = None):
        self.allocate = allocate if allocate is not None else (pinned if available() else None)
        self._down: HostBuffer | None = None  # device -> host
        self._up: HostBuffer | None = None  # host -> device
        self._pending: list[mx.array] = []  # the last to_device's copies, maybe not yet run
        self._refused = 1 << 62  # the smallest buffer the driver refused: not asked for again

    def to_host(self, x: mx.array) -> np.ndarray:
        """``x`` evaluated and copied to the host: a numpy array of its shape and dtype (any but
        bfloat16, which numpy lacks)."""
        down = self._buffer("_down", x.nbytes) if self.allocate is not None and x.size else None
        if down is None:
            return np.array(x)
        (done,) = _to_host_kernel()(
            inputs=[x, down.pointer, _constant((x.size,), mx.int64)],
            template=[("T", x.dtype)],
            grid=(_grid(x.size), 1, 1),
            threadgroup=(_THREADS, 1, 1),
            output_shapes=[(4,)],  # 16 bytes: device memory (8 or less would be managed)
            output_dtypes=[mx.int32],
        )
        mx.eval(done)  # the kernel has run: its writes are in host memory
        dtype = np.dtype(str(x.dtype).removeprefix("mlx.core."))
        return down.host[: x.nbytes].view(dtype).reshape(x.shape).copy()

    def to_device(self, arrays: Sequence[tuple[np.ndarray, mx.Dtype]]) -> list[mx.array]:
        """Each numpy array ``a`` as a device array of MLX dtype ``dtype`` of ``a``'s element size
        (bfloat16 from uint16 bits), bit for bit; lazy. The buffer is written again by the next
        call, which first runs this call's copies. Raises ValueError for mismatched sizes."""
        for a, dtype in arrays:
            if a.dtype.itemsize != dtype.size:
                raise ValueError(f"a {a.dtype} array cannot become {dtype} bit for bit")
        places, end = [], 0
        for a, _ in arrays:
            places.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        self.finish()  # a queued copy may still read the buffer this call writes
        up = self._buffer("_up", end) if self.allocate is not None else None
        if up is None:
            return [mx.array(np.ascontiguousarray(a)).view(dtype).reshape(a.shape) for a, dtype in arrays]
        out = []
        for (a, dtype), at in zip(arrays, places):
            np.copyto(up.host[at : at + a.nbytes].view(a.dtype).reshape(a.shape), a, casting="no")
            if a.size == 0:
                out.append(mx.zeros(a.shape, dtype))
                continue
            (copy,) = _from_host_kernel()(
                inputs=[up.pointer, _constant((at // dtype.size, a.size), mx.int64)],
                template=[("T", dtype)],
                grid=(_grid(a.size), 1, 1),
                threadgroup=(_THREADS, 1, 1),
                output_shapes=[a.shape],
                output_dtypes=[dtype],
            )
            out.append(copy)
        self._pending = list(out)
        return out

    def finish(self) -> None:
        """Runs the queued copies (on the MLX thread), so the buffers may be reused or freed."""
        if self._pending:
            mx.eval(self._pending)
            self._pending = []

    def trim(self, nbytes: int) -> None:
        """Frees the buffers larger than ``nbytes`` (allocated again when needed); on the MLX thread."""
        self.finish()
        for name in ("_down", "_up"):
            buf = getattr(self, name)
            if buf is not None and buf.host.size > nbytes:
                buf.free()
                setattr(self, name, None)

    def free(self) -> None:
        """Frees the buffers (after ``finish``)."""
        self.trim(-1)

    def _buffer(self, name: str, nbytes: int) -> HostBuffer | None:
        """Buffer ``name`` grown to hold ``nbytes`` (the new one allocated before the old one is
        freed), or None: past MAX_BYTES, or as large as one the driver refused (once: a refused
        allocation is not asked for again by this staging). Nothing queued reads the old
        one: to_host's kernels have run, and to_device runs its last copies before asking."""
        buf = getattr(self, name)
        if buf is not None and buf.host.size >= nbytes:
            return buf
        size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
        if nbytes > MAX_BYTES or size >= self._refused:
            return None
        try:
            grown = self.allocate(size)
        except RuntimeError as e:
            self._refused = size
            log.warning(
                "no pinned host memory: copies this large take MLX's own path",
                extra={"error": str(e), "bytes": size},
            )
            return None
        if buf is not None:
            buf.free()
        setattr(self, name, grown)
        return grown


# Stagings of dropped retrievers, for the next. A dropped retriever's last copies may not have run
# (its release may come on any thread, from the garbage collector): whoever takes the staging runs
# them first, on the MLX thread.
_pool: list[HostStaging] = []
_pool_lock = threading.Lock()


def acquire() -> HostStaging:
    """A staging from the pool (its queued copies run, its buffers past KEEP_BYTES freed), or a
    new one. On the MLX thread."""
    with _pool_lock:
        staging = _pool.pop() if _pool else None
    if staging is None:
        return HostStaging()
    staging.trim(KEEP_BYTES)
    return staging


def release(staging: HostStaging) -> None:
    """Gives ``staging`` back to the pool; any thread."""
    with _pool_lock:
        _pool.append(staging)


# The sizes and places the kernels take, made once per value (kernel_parts.constant), the last
# few hundred kept: a prefill's lengths vary.
_constant = functools.lru_cache(maxsize=256)(kernel_parts.constant.__wrapped__)


def _grid(n: int) -> int:
    return -(-n // _THREADS) * _THREADS


@functools.cache
def _to_host_kernel():
    # x [n] row-contiguous -> the host buffer at pointer[0]; ``done`` orders the host's read
    return mx.fast.cuda_kernel(
        name="extmind_to_host",
        input_names=["x", "pointer", "n"],
        output_names=["done"],
        source="""
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 4) done[i] = 1;
  if (i >= (size_t)n[0]) return;
  reinterpret_cast<T*>(pointer[0])[i] = x[i];
""",
    )


@functools.cache
def _from_host_kernel():
    # place[1] elements of the host buffer at pointer[0], from element place[0] -> out
    return mx.fast.cuda_kernel(
        name="extmind_from_host",
        input_names=["pointer", "place"],
        output_names=["out"],
        source="""
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)place[1]) return;
  out[i] = reinterpret_cast<const T*>(pointer[0])[place[0] + i];
""",
    )
