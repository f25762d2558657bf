"""The Tensor <-> numpy codec (extmind/tensor.py): every DType round-trips, bfloat16 rounds to
nearest even (checked against torch), and dtype / shape / byte length are validated strictly."""

from __future__ import annotations

import numpy as np
import pytest

from extmind import tensor as T
from extmind.errors import InvalidArgument
from extmind.v1 import common_pb2

ALL = {
    T.FLOAT32: np.float32,
    T.FLOAT16: np.float16,
    T.INT32: np.int32,
    T.INT64: np.int64,
}


@pytest.mark.parametrize("dtype", list(ALL), ids=lambda d: T.dtype_name(d))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 4)])
def test_round_trip_exact(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 1000).astype(ALL[dtype])
    t = T.encode(a)
    assert t.dtype == dtype and list(t.shape) == list(shape)
    assert len(t.data) == a.size * np.dtype(ALL[dtype]).itemsize
    back = T.decode(t)
    assert back.dtype == ALL[dtype] and back.shape == shape and np.array_equal(back, a)
    # Through the wire format.
    again = common_pb2.Tensor.FromString(t.SerializeToString())
    assert np.array_equal(T.decode(again), a)


def test_little_endian_row_major_bytes():
    a = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    t = T.encode(a)
    assert t.data == b"".join(int(x).to_bytes(4, "little") for x in [1, 2, 3, 4, 5, 6])
    big = np.array([1.5, -2.0], dtype=">f4")  # a big-endian input is converted
    assert T.encode(big, dtype=T.FLOAT32).data == np.array([1.5, -2.0], "<f4").tobytes()
    nc = np.arange(12, dtype=np.float32).reshape(3, 4).T  # non-contiguous input
    assert np.array_equal(T.decode(T.encode(nc)), nc)


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
            np.array(
                [
                    0.0,
                    -0.0,
                    1.0,
                    -1.0,
                    np.inf,
                    -np.inf,
                    3.4028235e38,
                    -3.4028235e38,
                    1e-40,
                    -1e-40,
                    1.00390625,
                    1.01171875,
                    1.0078125 + 2**-9,
                ],
                np.float32,
            ),  # ties: to even, both ways
            # halfway cases at the bit level
            (
                np.array([0x3F808000, 0x3F818000, 0x3F80_8001, 0x3F80_7FFF, 0x7F7F_FFFF, 0x0000_8000], np.uint32).view(
                    np.float32
                )
            ),
        ]
    )
    t = T.encode(x, dtype=T.BFLOAT16)
    assert t.dtype == T.BFLOAT16 and len(t.data) == 2 * x.size
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = np.frombuffer(t.data, "<u2")
    assert np.array_equal(got, want)
    # decode widens exactly: bf16 -> float32 -> bf16 is the identity.
    back = T.decode(t)
    assert back.dtype == np.float32
    assert np.array_equal(back, torch.from_numpy(want.view(np.int16).copy()).view(torch.bfloat16).float().numpy())
    assert np.array_equal(T.encode(back, dtype=T.BFLOAT16).data, t.data)


def test_bfloat16_nan_stays_nan_and_raw_bits_pass_through():
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    back = T.decode(T.encode(x, dtype=T.BFLOAT16))
    assert np.isnan(back[:2]).all() and back[2] == 1.0
    bits = np.array([0x3F80, 0x0001, 0xFF80, 0x7FC1], np.uint16)  # 1.0, subnormal, -inf, NaN payload
    t = T.encode(bits, dtype=T.BFLOAT16)
    assert np.array_equal(np.frombuffer(t.data, "<u2"), bits)
    raw = T.decode_raw(t)
    assert raw.dtype == np.uint16 and np.array_equal(raw, bits)
    f = T.decode(t)
    assert f[0] == 1.0 and f[1] == np.float32(2.0**-133) and f[2] == -np.inf and np.isnan(f[3])


def test_encode_refuses_what_it_cannot_represent():
    with pytest.raises(TypeError):
        T.encode(np.ones(3, np.float64))  # ambiguous: say dtype=
    with pytest.raises(TypeError):
        T.encode(np.ones(3, np.float32), dtype=0)
    assert T.encode(np.ones(3, np.float64), dtype=T.FLOAT32).dtype == T.FLOAT32


def _t(dtype, shape, nbytes):
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=b"\0" * nbytes)


@pytest.mark.parametrize(
    "t,kw,fragment",
    [
        (_t(T.FLOAT32, [2, 3], 23), {}, "bytes"),  # truncated
        (_t(T.FLOAT32, [2, 3], 25), {}, "bytes"),  # too long
        (_t(T.BFLOAT16, [4], 7), {}, "bytes"),
        (_t(T.INT64, [2], 12), {}, "bytes"),
        (_t(T.FLOAT32, [2, -3], 0), {}, "negative"),
        (_t(0, [2], 8), {}, "dtype"),  # unspecified
        (_t(42, [2], 8), {}, "dtype"),  # unknown enum value
        (_t(T.FLOAT16, [2], 4), {"dtypes": (T.FLOAT32,)}, "expected"),
        (_t(T.FLOAT32, [2, 3], 24), {"ndim": 3}, "3 dimensions"),
        (_t(T.FLOAT32, [2, 3], 24), {"shape": (2, 4)}, "dimension 1 must be 4"),
        (_t(T.FLOAT32, [2, 3, 4], 96), {"shape": (None, None)}, "2 dimensions"),
        (common_pb2.Tensor(), {}, "missing"),
        # the int64 product of these dimensions wraps to 0: the data length must not match it
        (_t(T.FLOAT32, [2**61, 4, 8], 0), {}, "bytes"),
        (_t(T.FLOAT16, [2**62, 2**62], 0), {}, "bytes"),
    ],
)
def test_strict_validation(t, kw, fragment):
    with pytest.raises(InvalidArgument) as e:
        T.decode(t, name="keys", **kw)
    assert "keys" in e.value.message and fragment in e.value.message
    assert e.value.code == "INVALID_ARGUMENT"


def test_validation_accepts_free_dimensions_and_empty():
    a = T.decode(_t(T.FLOAT16, [8, 0, 128], 0), shape=(8, None, 128))
    assert a.shape == (8, 0, 128)
    b = T.decode(_t(T.FLOAT32, [], 4))  # a scalar
    assert b.shape == () and b == 0
    # decode_raw returns a view of the message bytes (no copy), read-only.
    t = T.encode(np.arange(4, dtype=np.float32))
    v = T.decode_raw(t)
    assert not v.flags.writeable
