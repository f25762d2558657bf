"""SearchMemory's messages on the wire (baseline: protobuf's Python classes)."""

from __future__ import annotations

from extmind.tensor import FLOAT32, decode, encode
from extmind.v1 import common_pb2, memory_pb2


def client_stream_requests(ids, layer, queries, top_k, threshold, created) -> list[bytes]:
    from services.generator.memory_client import search_requests

    return [
        memory_pb2.SearchMemoryStreamRequest(search=r).SerializeToString()
        for r in search_requests(ids, layer, queries, top_k, threshold, created)
    ]


def read_stream_request(data: bytes):
    return memory_pb2.SearchMemoryStreamRequest.FromString(data)


def queries(search):
    from services.memory.kv_memories import KV_DTYPES

    return decode(search.queries, name="queries", dtypes=KV_DTYPES, ndim=3)


def create_us(search):
    return [t.seconds * 1_000_000 + t.nanos // 1000 for t in search.create_times]


def stream_response(hits, return_vectors) -> bytes:
    out = memory_pb2.SearchMemoryResponse(
        scores=encode(hits.scores, dtype=FLOAT32), indices=encode(hits.indices, dtype=common_pb2.DTYPE_INT64)
    )
    if return_vectors:
        out.keys.CopyFrom(encode(hits.keys, dtype=hits.dtype))
        out.values.CopyFrom(encode(hits.values, dtype=hits.dtype))
    return memory_pb2.SearchMemoryStreamResponse(result=out).SerializeToString()


def client_result(data: bytes):
    from services.generator.memory_client import search_result

    return search_result(memory_pb2.SearchMemoryStreamResponse.FromString(data).result)
