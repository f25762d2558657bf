"""host_staging: the queries' copy to the host and the hits' copy to the device through host
buffers the kernels read and write (pinned memory on CUDA), bit for bit, for every dtype REMOTE
moves, several arrays per call, buffers reused and grown, a copy not yet run when the next call
writes the buffer, and the pool of stagings. "emulated" runs the kernels on the CPU
(cuda_emulator.py) over plain host memory; "cuda" runs them on MLX's CUDA backend over pinned
memory (skipped elsewhere); "portable" is the np.array / mx.array path every other backend takes."""

from __future__ import annotations

import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from services.generator import host_staging
from services.generator.host_staging import HostBuffer, HostStaging

from . import cuda_emulator


def heap(nbytes: int) -> HostBuffer:
    """Plain host memory standing in for pinned memory (the emulated kernels run on the host)."""
    host = np.zeros(nbytes, np.uint8)
    return HostBuffer(host, host.ctypes.data, lambda: None)


@pytest.fixture(params=["emulated", "cuda", "portable"])
def staging(request, monkeypatch):
    if request.param == "emulated":
        if cuda_emulator.CXX is None or sys.platform != "linux":
            pytest.skip("the emulator needs a C++ compiler and glibc ucontext")
        monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
        for k in (host_staging._to_host_kernel, host_staging._from_host_kernel):
            k.cache_clear()
        yield HostStaging(allocate=heap)
        for k in (host_staging._to_host_kernel, host_staging._from_host_kernel):
            k.cache_clear()
    elif request.param == "cuda":
        if not host_staging.available():
            pytest.skip("MLX's CUDA backend only")
        s = HostStaging()
        assert s.allocate is host_staging.pinned
        yield s
        s.finish()
        s.free()
    else:
        yield HostStaging(allocate=None)


def bits(a: mx.array) -> np.ndarray:
    """An MLX array's bits as numpy (16-bit floats as uint16: NaN payloads compare; numpy lacks bfloat16)."""
    return np.array(a.view(mx.uint16)) if a.dtype in (mx.bfloat16, mx.float16) else np.array(a)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.int32])
@pytest.mark.parametrize("shape", [(1, 8, 4, 1, 64), (2, 2, 1, 3, 16), (7,)])
def test_to_host_returns_the_arrays_values(staging, dtype, shape):
    x = mx.array(np.random.default_rng(len(shape)).standard_normal(shape) * 100).astype(dtype)
    got = staging.to_host(x)
    assert got.shape == shape and got.dtype == np.dtype(str(dtype).removeprefix("mlx.core."))
    np.testing.assert_array_equal(got, np.array(x))
    view = x.T  # not row-contiguous: read by value
    np.testing.assert_array_equal(staging.to_host(view), np.array(x).T)


def test_to_device_copies_several_arrays_bit_for_bit(staging):
    rng = np.random.default_rng(0)
    halves = rng.integers(0, 1 << 16, (2, 4, 40, 64), dtype=np.uint16)  # every bit pattern, NaNs included
    arrays = [
        (halves.view(np.float16), mx.float16),
        (halves[:, :, :3], mx.bfloat16),  # bfloat16 from its bits; not 256-byte sized
        (rng.integers(-1, 4096, (1, 32, 1, 10), dtype=np.int32), mx.int32),
        (rng.standard_normal((3, 5)).astype(np.float32), mx.float32),
        (np.zeros((0, 4), np.int32), mx.int32),
    ]
    out = staging.to_device(arrays)
    assert [(o.shape, o.dtype) for o in out] == [(a.shape, d) for a, d in arrays]
    for o, (a, _) in zip(out, arrays):
        np.testing.assert_array_equal(bits(o), a.view(np.uint16) if a.dtype == np.float16 else a)


def test_a_copy_not_yet_run_keeps_its_values_when_the_buffer_is_written_again(staging):
    """Copies are lazy: the next call writes the same host buffer, so it runs the last call's
    copies first; a larger call moves to a larger buffer. Nothing here is evaluated before the end."""
    rng = np.random.default_rng(1)
    sent = [rng.standard_normal(n).astype(np.float16) for n in (100, 100, 50_000, 7, 300_000)]
    out = [staging.to_device([(a, mx.float16)])[0] for a in sent]
    for o, a in zip(out, sent):
        np.testing.assert_array_equal(np.array(o), a)
    q = mx.array(rng.standard_normal((4, 1000)).astype(np.float32))
    np.testing.assert_array_equal(staging.to_host(q), np.array(q))  # after the up buffer grew
    np.testing.assert_array_equal(staging.to_host(q[:1]), np.array(q[:1]))  # a smaller one after


def test_mismatched_sizes_raise(staging):
    with pytest.raises(ValueError, match="bit for bit"):
        staging.to_device([(np.zeros(4, np.float32), mx.float16)])


def test_the_pool_hands_a_staging_back_from_any_thread(monkeypatch):
    monkeypatch.setattr(host_staging, "_pool", [])
    first = host_staging.acquire()
    t = threading.Thread(target=host_staging.release, args=(first,))  # a retriever dropped by the GC elsewhere
    t.start()
    t.join()
    again = host_staging.acquire()
    assert again is first and host_staging._pool == []
    assert host_staging.acquire() is not first  # in use: a new one


def test_a_retriever_gives_its_staging_back_once(monkeypatch):
    """close() hands the staging back; a search after it takes one again (never the one the pool
    holds while another retriever may take it), and dropping the retriever hands that back."""
    import gc

    from services.generator.remote_retrieval import RemoteRetriever

    monkeypatch.setattr(host_staging, "_pool", [])
    r = RemoteRetriever(None, [])
    first = r._staging()
    r.close()
    r.close()
    assert host_staging._pool == [first]
    again = r._staging()
    assert again is first and host_staging._pool == []
    del r
    gc.collect()
    assert host_staging._pool == [first]
