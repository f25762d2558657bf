"""kernel_parts.constant: the kernels' small constant inputs, made once per value, padded to 16
bytes and copied by a device op (docs/architecture.md, "Kernel constants")."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from services.generator import kernel_parts


@pytest.fixture
def fresh():
    """Constants made in the test, not taken from (nor left in) the process's cache: reading one
    back on CUDA would move it to managed memory."""
    kernel_parts.constant.cache_clear()
    yield
    kernel_parts.constant.cache_clear()


@pytest.mark.parametrize(
    "values,dtype",
    [
        ((-math.inf,), mx.float32),  # the threshold for none
        ((0.125,), mx.float32),
        ((1.25, 2.5), mx.float32),  # prefill_top_k's bound
        ((7,), mx.int32),
        ((2, 3, 5), mx.int32),  # device_stack's dims
        ((2**31 - 1,), mx.int32),
        ((False,), mx.bool_),  # the mask placeholder
        ((True,), mx.bool_),
        ((1.5,), mx.float16),
        ((-3.0,), mx.bfloat16),
    ],
)
def test_a_constant_holds_its_values_padded_to_16_bytes(values, dtype, fresh):
    a = kernel_parts.constant(values, dtype)
    assert a.dtype == dtype and a.ndim == 1 and a.nbytes >= 16
    assert a.size == max(len(values), 16 // dtype.size)  # no more padding than 16 bytes need
    got = np.array(a.astype(mx.float32) if dtype == mx.bfloat16 else a).tolist()
    assert got == list(values) + [values[-1]] * (a.size - len(values))
    assert kernel_parts.constant(values, dtype) is a  # made once per value
    assert kernel_parts.scalar(values[0], dtype) is kernel_parts.constant(values[:1], dtype)


def _address(x: mx.array) -> int:
    view = np.asarray(x)  # a view of the array's buffer, dropped before returning
    return view.ctypes.data


def test_a_constant_is_not_the_host_made_buffer(fresh, monkeypatch):
    """The device op's output must be a new buffer: were the host-made input donated to it (MLX
    reuses the buffer of an input that only the op still references), the constant would stay in
    the managed memory the copy is there to leave. The host arrays' addresses are noted without
    holding them, as the code under test does not either."""
    made, seen = mx.array, []

    def spy(*args, **kwargs):
        x = made(*args, **kwargs)
        seen.append(_address(x))
        return x

    for values, dtype in (((0.375,), mx.float32), ((11,), mx.int32), ((True,), mx.bool_)):
        seen.clear()
        monkeypatch.setattr(mx, "array", spy)
        a = kernel_parts.constant(values, dtype)
        monkeypatch.setattr(mx, "array", made)
        assert seen and _address(a) not in seen, (values, dtype)


def test_constants_kept_are_bounded(fresh):
    """A request's threshold and citation floor become constants: ever new values must not grow
    the cache for good."""
    for i in range(kernel_parts.CONSTANTS + 10):
        kernel_parts.scalar(float(i), mx.float32)
    assert kernel_parts.constant.cache_info().currsize == kernel_parts.CONSTANTS
    assert float(np.array(kernel_parts.scalar(3.0, mx.float32))[0]) == 3.0  # evicted, made again
