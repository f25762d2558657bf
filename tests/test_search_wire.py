"""SearchMemory's answers serialized by hand are byte for byte the ones protobuf serializes."""

from __future__ import annotations

import numpy as np
import pytest

from extmind import search_wire, tensor
from extmind.v1 import memory_pb2


def _protobuf(scores, indices, keys, values, dtype) -> memory_pb2.SearchMemoryResponse:
    out = memory_pb2.SearchMemoryResponse(
        scores=tensor.encode(scores, dtype=tensor.FLOAT32), indices=tensor.encode(indices, dtype=tensor.INT64)
    )
    if keys is not None:
        out.keys.CopyFrom(tensor.encode(keys, dtype=dtype))
        out.values.CopyFrom(tensor.encode(values, dtype=dtype))
    return out


@pytest.mark.parametrize("dtype", [tensor.FLOAT32, tensor.FLOAT16, tensor.BFLOAT16])
@pytest.mark.parametrize("shape", [(32, 1, 10), (32, 8, 10), (4, 3, 0), (1, 1, 1)])
def test_hand_serialized_answers_are_protobufs_bytes(dtype, shape):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(shape).astype(np.float32)
    scores[..., -1:] = -np.inf  # masked hits
    indices = rng.integers(-1, 1 << 40, shape)
    wide = rng.standard_normal((*shape, 16)).astype(np.float32)
    keys = tensor.float32_to_bf16_bits(wide) if dtype == tensor.BFLOAT16 else wide.astype(tensor.STORAGE[dtype])
    values = keys[::-1]  # a strided view
    for k, v in ((keys, values), (None, None)):
        want = _protobuf(scores, indices, k, v, dtype)
        assert search_wire.search_response(scores, indices, k, v, dtype) == want.SerializeToString()
        streamed = memory_pb2.SearchMemoryStreamResponse(result=want).SerializeToString()
        assert search_wire.stream_response(scores, indices, k, v, dtype) == streamed


def test_vectors_of_another_storage_are_refused():
    s, i = np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int64)
    with pytest.raises(TypeError, match="float16"):
        search_wire.search_response(s, i, np.zeros((1, 1, 1, 4), np.float32), np.zeros((1, 1, 1, 4)), tensor.FLOAT16)
