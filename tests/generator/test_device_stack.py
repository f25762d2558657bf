"""device_stack.stack (one kernel launch on CUDA, mx.stack elsewhere) equals mx.stack for the
shapes and dtypes the tallies stack: picks [B, H, 1, k] int32 along axis 1, dots / mass float32 and
float16 along either axis, batches of one and several rows, one to 300 inputs (past one launch's
MAX_INPUTS); bad calls raise."""

import mlx.core as mx
import numpy as np
import pytest

from services.generator import device_stack


@pytest.mark.parametrize("n", [1, 2, 3, 16, 48, 130, 300])
@pytest.mark.parametrize("shape", [(1, 4, 1, 3), (3, 8, 1, 10), (2, 5, 1)])
@pytest.mark.parametrize("dtype", [mx.int32, mx.float32, mx.float16, mx.bool_])
@pytest.mark.parametrize("axis", [1, -1])
def test_equals_mx_stack(n, shape, dtype, axis):
    rng = np.random.default_rng(n + len(shape))
    arrays = [mx.array(rng.integers(-1, 100, shape)).astype(dtype) for _ in range(n)]
    got = device_stack.stack(arrays, axis)
    want = mx.stack(arrays, axis=axis)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_strided_inputs_are_read_as_their_values():
    """Views (a transposed or sliced array) are copied by their values, not their memory order."""
    base = mx.arange(2 * 3 * 4, dtype=mx.int32).reshape(2, 3, 4)
    views = [base.transpose(0, 2, 1), base[:, :, ::-1].transpose(0, 2, 1)]
    np.testing.assert_array_equal(np.array(device_stack.stack(views, 1)), np.array(mx.stack(views, axis=1)))


def test_bad_calls_raise():
    a = mx.zeros((2, 3))
    with pytest.raises(ValueError, match="axis 1 or -1"):
        device_stack.stack([a, a], 0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        device_stack.stack([a, mx.zeros((2, 4))], 1)
    with pytest.raises(ValueError, match="one shape and dtype"):
        device_stack.stack([a, a.astype(mx.int32)], 1)
