"""Stacks many same-shaped arrays with one kernel launch on MLX's CUDA backend.

A decode forward's tallies are one small array per retrieving layer (citation picks, attention
mass). ``mx.stack`` / ``mx.concatenate`` copy each input with its own kernel, and on MLX CUDA every
launch costs the host ~10 us: stacking a step's records in a flush of 32 steps launched over a
thousand copies, most of the citations' cost per step on an H200 (docs/architecture.md, "Tallies
of a decode batch"). Here one generated kernel copies them all; off CUDA it is ``mx.stack``.

MLX CUDA compiles a kernel the first time it runs (~1.5 s for the 256-input one on an H200), and
how many records a flush joins follows the request's length (its sampled attention-mass steps, its
cited forwards). So the kernels come in three sizes only (SLOTS: 16, 64, 256 inputs, unused slots
repeating an input), one kernel a size and dtype for both axes (the axis is read at run time), and
``compile_all`` compiles every size of what the tallies stack (and of anything else that ran), for
the warm-up: a request of a new length does not wait for a compile (docs/architecture.md, "Tallies
of a decode batch").
"""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts

_THREADS = 256


# Inputs per launch; more are stacked in chunks. A pointer each: 256 take 2 KiB of the kernel's
# 4 KiB parameter space. A flush of 32 steps x 16 layers joins 512 records: 2 launches, not 8.
MAX_INPUTS = 256
# The kernels' numbers of input slots: a stack of n inputs takes the smallest that holds them.
SLOTS = (16, 64, MAX_INPUTS)
# What the tallies stack (citation rows int32; attention mass and citation weights float32, by
# forward or by layer): compile_all compiles these whether or not the warm-up's requests ran them (a
# REMOTE request with citations, one retrieving layer, a long context).
TALLY_DTYPES = frozenset({mx.int32, mx.float32})
# The (slots, dtype) kernels launched so far (each compiled at its first launch).
_compiled: set = set()


def _source(slots: int) -> str:
    # out [B, N, X] (dims[3] = 0: axis 1) or [B, X, N] (dims[3] = 1: the last axis); input i < N is
    # a_i [B, ...] read as [B, X] (row-contiguous). One kernel per size in SLOTS for both axes (N
    # and the axis come at run time, unused slots repeat an input), so neither a new count nor the
    # other axis means a new compile (each cost the warm-up ~0.6-1.1 s on an H200).
    cases = "\n".join(f"    case {i}: v = a{i}[src]; break;" for i in range(slots))
    return f"""
  const int B = dims[0];
  const int X = dims[1];
  const int N = dims[2];
  const bool last = dims[3] != 0;
  const size_t gid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= (size_t)B * N * X) return;
  const int i = last ? gid % N : (gid / X) % N;
  const int x = last ? (gid / N) % X : gid % X;
  const int b = gid / ((size_t)N * X);
  const size_t src = (size_t)b * X + x;
  T v;
  switch (i) {{
{cases}
  }}
  out[last ? ((size_t)b * X + x) * N + i : gid] = v;
"""


@functools.cache
def _kernel(slots: int):
    return mx.fast.cuda_kernel(
        name=f"extmind_stack{slots}",
        input_names=[f"a{i}" for i in range(slots)] + ["dims"],
        output_names=["out"],
        source=_source(slots),
    )


def on_device() -> bool:
    """Whether ``stack`` launches its own kernel (MLX computes on its CUDA backend)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def slots_for(n: int) -> int:
    """The kernel size (input slots) a stack of ``n`` inputs (1 <= n <= MAX_INPUTS) launches."""
    return next(s for s in SLOTS if s >= n)


def compile_all() -> int:
    """Compiles, on MLX CUDA, every SLOTS size of the kernels of TALLY_DTYPES and of each dtype
    ``stack`` ran so far (the warm-up calls it after its requests). -> how many it compiled (0 off
    CUDA)."""
    if not on_device():
        return 0
    done = 0
    ran = {dtype for _, dtype in _compiled}
    for dtype in sorted(TALLY_DTYPES | ran, key=str):
        for slots in SLOTS:
            if (slots, dtype) not in _compiled:
                arrays = [mx.zeros((1, 1), dtype=dtype) for _ in range(slots)]
                mx.eval(stack(arrays, axis=1, checked=True))
                done += 1
    return done


def uniform(arrays: list[mx.array]) -> bool:
    """Whether ``stack`` takes these arrays: all of one shape and dtype (callers with records
    that may differ join those with MLX's concatenate or stack, which promote dtypes)."""
    return len({(a.shape, a.dtype) for a in arrays}) == 1


def stack(arrays: list[mx.array], axis: int, *, checked: bool = False) -> mx.array:
    """``mx.stack(arrays, axis)`` for ``axis`` 1 ([B, n, ...]) or -1 ([..., n]) of n >= 1 arrays of
    one shape [B, ...] (B >= 1) and dtype, in one kernel launch on CUDA (one per MAX_INPUTS).
    ``checked``: the caller has seen ``uniform(arrays)`` hold (the check costs the host ~0.2 us
    per array, as much as a launch for a flush's 512 records). Raises ValueError for another axis
    or mismatched inputs."""
    if axis not in (1, -1):
        raise ValueError(f"stack takes axis 1 or -1, not {axis}")
    if not checked and not uniform(arrays):
        raise ValueError("stack takes arrays of one shape and dtype")
    first = arrays[0]
    if first.ndim < 1 or not on_device() or len(arrays) == 1 or first.size == 0:
        return mx.stack(arrays, axis=axis)
    if len(arrays) > MAX_INPUTS:
        parts = [stack(arrays[i : i + MAX_INPUTS], axis, checked=True) for i in range(0, len(arrays), MAX_INPUTS)]
        return mx.concatenate(parts, axis=axis)
    n, B = len(arrays), first.shape[0]
    X = first.size // B
    slots = slots_for(n)
    last = axis == -1
    _compiled.add((slots, first.dtype))
    total = B * n * X
    # The kernel reads each input as [B, X] row-contiguous memory (MLX hands it so): no reshape
    # op per input, which cost the host more than the launch for a step's records.
    (out,) = _kernel(slots)(
        inputs=[*arrays, *[first] * (slots - n), kernel_parts.constant((B, X, n, int(last)), mx.int32)],
        template=[("T", first.dtype)],
        grid=(-(-total // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, X, n) if last else (B, n, X)],
        output_dtypes=[first.dtype],
    )
    return out.reshape(*first.shape, n) if last else out.reshape(B, n, *first.shape[1:])
