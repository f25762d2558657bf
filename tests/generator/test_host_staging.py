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


class Heap:
    """``heap`` that logs what happens to its buffers and refuses buffers past ``limit`` bytes
    (as the driver may): ("alloc" | "free", buffer id)."""

    def __init__(self, limit: int = 1 << 40):
        self.limit, self.log, self.freed = limit, [], set()

    tries = 0

    def __call__(self, nbytes: int) -> HostBuffer:
        self.tries += 1
        if nbytes > self.limit:
            raise RuntimeError("cuMemHostAlloc failed (CUresult 2)")
        b = heap(nbytes)
        self.log.append(("alloc", id(b)))
        b._free = lambda b=b: (self.log.append(("free", id(b))), self.freed.add(id(b)))
        return b


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


@pytest.fixture
def emulated(monkeypatch):
    if cuda_emulator.CXX is None or sys.platform != "linux":
        pytest.skip("the emulator needs a C++ compiler and glibc ucontext")
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    for k in (host_staging._to_host_kernel, host_staging._from_host_kernel):
        k.cache_clear()
    yield
    for k in (host_staging._to_host_kernel, host_staging._from_host_kernel):
        k.cache_clear()


def test_the_next_copy_runs_the_last_ones_before_it_writes_the_buffer(emulated, monkeypatch):
    """The ordering the GPU needs (the emulated kernels run at once, so it is checked by the order
    of the calls): before a to_device writes the host buffer, mx.eval has been given the last
    call's copies; before a grown buffer frees the old one, too."""
    events = []
    real_eval, real_copyto = mx.eval, np.copyto

    def spy_eval(*a):  # the ids of the arrays evaluated (on_device's evals of a constant are not lists)
        events.append(("eval", {id(x) for x in a[0]} if isinstance(a[0], list) else set()))
        real_eval(*a)

    monkeypatch.setattr(mx, "eval", spy_eval)
    monkeypatch.setattr(np, "copyto", lambda *a, **k: (events.append(("write",)), real_copyto(*a, **k)))
    alloc = Heap()
    alloc.log = events
    staging = HostStaging(allocate=alloc)
    rng = np.random.default_rng(2)
    sent = [rng.standard_normal(n).astype(np.float16) for n in (10, 10, 100_000)]  # the third one grows
    outs = []
    for a in sent:
        events.append(("call",))
        (o,) = staging.to_device([(a, mx.float16)])
        outs.append(o)
    for i in (1, 2):
        call = [j for j, e in enumerate(events) if e == ("call",)][i]
        first_write = next(j for j in range(call, len(events)) if events[j] == ("write",))
        evals = [e for e in events[call:first_write] if e[0] == "eval"]
        assert any(id(outs[i - 1]) in e[1] for e in evals), (i, events[call:first_write])
    freed = [j for j, e in enumerate(events) if e[0] == "free"]
    assert len(freed) == 1  # the first buffer, when the third call grew it
    third = [j for j, e in enumerate(events) if e == ("call",)][2]
    assert any(e[0] == "eval" and id(outs[1]) in e[1] for e in events[third : freed[0]])
    for o, a in zip(outs, sent):
        np.testing.assert_array_equal(np.array(o), a)


def test_a_refused_or_too_large_buffer_takes_mlx_own_path_and_keeps_the_old_one(emulated, monkeypatch):
    """The driver refusing a larger buffer, or a copy past MAX_BYTES: that call takes MLX's own
    path; the old buffer is neither freed nor dropped, and the next small copy uses it."""
    alloc = Heap(limit=1 << 17)
    staging = HostStaging(allocate=alloc)
    rng = np.random.default_rng(3)
    small = rng.standard_normal(100).astype(np.float16)
    np.testing.assert_array_equal(np.array(staging.to_device([(small, mx.float16)])[0]), small)
    up = staging._up
    big = rng.standard_normal(200_000).astype(np.float16)  # 400 KB: refused
    np.testing.assert_array_equal(np.array(staging.to_device([(big, mx.float16)])[0]), big)
    q = mx.array(rng.standard_normal((400, 100)).astype(np.float32))  # 160 KB: refused
    np.testing.assert_array_equal(staging.to_host(q), np.array(q))
    assert staging._up is up and not alloc.freed
    tries = alloc.tries
    np.testing.assert_array_equal(np.array(staging.to_device([(big, mx.float16)])[0]), big)
    assert alloc.tries == tries  # a refused size is not asked for again
    again = rng.standard_normal(100).astype(np.float16)
    np.testing.assert_array_equal(np.array(staging.to_device([(again, mx.float16)])[0]), again)
    assert staging._up is up and [op for op, _ in alloc.log] == ["alloc"]


def test_a_copy_past_max_bytes_takes_mlx_own_path(emulated, monkeypatch):
    monkeypatch.setattr(host_staging, "MAX_BYTES", 1 << 10)
    alloc = Heap()
    staging = HostStaging(allocate=alloc)
    a = np.random.default_rng(4).standard_normal(1000).astype(np.float16)  # 2 KB
    bf = a.view(np.uint16).reshape(10, 100)
    got = staging.to_device([(a, mx.float16), (bf, mx.bfloat16), (np.zeros((0, 3), np.int32), mx.int32)])
    assert [(g.shape, g.dtype) for g in got] == [((1000,), mx.float16), ((10, 100), mx.bfloat16), ((0, 3), mx.int32)]
    np.testing.assert_array_equal(bits(got[0]), a.view(np.uint16))
    np.testing.assert_array_equal(bits(got[1]), bf)
    q = mx.ones((1000,))
    np.testing.assert_array_equal(staging.to_host(q), np.ones(1000, np.float32))
    assert alloc.log == [] and staging._up is None and staging._down is None


def test_the_pool_runs_a_stagings_copies_then_frees_its_large_buffers(emulated, monkeypatch):
    """acquire: the queued copies run before a buffer is freed; buffers up to KEEP_BYTES stay."""
    monkeypatch.setattr(host_staging, "_pool", [])
    events = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (events.append(("eval", a[0])), real_eval(*a)))
    alloc = Heap()
    alloc.log = events
    staging = HostStaging(allocate=alloc)
    q = mx.ones((8, 64))
    np.testing.assert_array_equal(staging.to_host(q), np.ones((8, 64), np.float32))  # a small down buffer
    big = np.ones(host_staging.KEEP_BYTES, np.float16)  # 2 x KEEP_BYTES bytes
    (out,) = staging.to_device([(big, mx.float16)])
    host_staging.release(staging)
    events.clear()
    assert host_staging.acquire() is staging
    freed = [j for j, e in enumerate(events) if e[0] == "free"]
    evaluated = [x for e in events[: freed[0]] if e[0] == "eval" and isinstance(e[1], list) for x in e[1]]
    assert len(freed) == 1 and any(x is out for x in evaluated)
    assert staging._pending == [] and staging._up is None and staging._down is not None
    np.testing.assert_array_equal(np.array(out), big)


def test_a_closed_retriever_runs_its_copies_and_frees_its_large_buffers(emulated, monkeypatch):
    from services.generator.remote_retrieval import RemoteRetriever

    monkeypatch.setattr(host_staging, "_pool", [])
    monkeypatch.setattr(host_staging, "available", lambda: True)
    alloc = Heap()
    monkeypatch.setattr(host_staging, "pinned", alloc)
    r = RemoteRetriever(None, [])
    staging = r._staging()
    (out,) = staging.to_device([(np.ones(host_staging.KEEP_BYTES, np.float16), mx.float16)])
    r.close()
    assert host_staging._pool == [staging] and staging._pending == [] and staging._up is None
    assert len(alloc.freed) == 1
