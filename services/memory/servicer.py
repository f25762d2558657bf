"""gRPC face of the memory service: protobuf <-> engine calls, nothing else.

The engines (``KVMemories``, ``Documents``) validate and raise ``extmind.errors``; the shared
interceptor turns them into status codes. The shared server answers UNAVAILABLE until the app's
start-up attached the engines, so every RPC here may use them.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from extmind import row_wire
from extmind.errors import Cancelled, ExtmindError, InvalidArgument
from extmind.tensor import FLOAT32, decode, decode_raw, encode
from extmind.v1 import common_pb2, memory_pb2, memory_pb2_grpc
from services.common.interceptor import note_access
from services.memory.documents import Collection, Documents, check_collection
from services.memory.kv_layout import BUILDING, READY, Layout, MemoryMeta
from services.memory.kv_memories import KV_DTYPES, KVMemories, SearchHits

# How long a SearchMemoryStream whose requests ended waits for gRPC's cancellation, if the client
# went away rather than half-closing (see SearchMemoryStream).
_CANCEL_LANDS_S = 0.05

_STATE = {BUILDING: memory_pb2.MEMORY_STATE_BUILDING, READY: memory_pb2.MEMORY_STATE_READY}


def _timestamp(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _micros(t: Timestamp, name: str = "create_time") -> int:
    """A create_time as the microseconds the store keeps (``_timestamp``'s inverse). Raises
    InvalidArgument for a timestamp no memory can have (before 1970, nanos outside 0..999 999 999)."""
    if t.seconds < 0 or not 0 <= t.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"{name} {t.seconds} s + {t.nanos} ns is not a memory's create_time (seconds >= 0, nanos in "
            "0..999999999): pass the one CreateMemory or GetMemory returned"
        )
    return t.seconds * 1_000_000 + t.nanos // 1000


def _memory_message(m: MemoryMeta, token_ids=None, positions=None) -> memory_pb2.Memory:
    out = memory_pb2.Memory(
        memory_id=m.memory_id,
        model_fingerprint=m.fingerprint,
        num_tokens=m.num_tokens,
        state=_STATE[m.state],
        bytes=m.bytes,
        labels=m.labels,
        create_time=_timestamp(m.create_us),
        layout=memory_pb2.MemoryLayout(
            num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=m.dtype
        ),
    )
    if token_ids is not None:
        out.token_ids.extend(token_ids.tolist())
        out.positions.extend(positions.tolist())
    return out


def _collection_message(c: Collection) -> memory_pb2.Collection:
    return memory_pb2.Collection(
        name=c.name,
        model=c.model,
        dimensions=c.dimensions,
        num_documents=len(c.docs),
        create_time=_timestamp(c.create_us),
    )


def _embedding(t: common_pb2.Tensor, name: str) -> np.ndarray:
    """A float32 vector sent by the client: decoded, non-empty and finite (a NaN or infinity
    would make every cosine against it NaN). Raises InvalidArgument naming the first bad element."""
    emb = decode(t, name=name, dtypes=(FLOAT32,), ndim=1)
    if emb.shape[0] == 0:
        raise InvalidArgument(f"{name} is empty; send the embedding's values (or leave {name} unset)")
    bad = np.flatnonzero(~np.isfinite(emb))
    if bad.size:
        raise InvalidArgument(
            f"{name} holds {bad.size} NaN or infinite values, the first at element {int(bad[0])} "
            f"({float(emb[bad[0]])}); send a finite embedding"
        )
    return emb


def search_response(hits: SearchHits) -> memory_pb2.SearchMemoryResponse:
    """The SearchMemoryResponse of ``hits`` (keys and values when the search returned them)."""
    out = memory_pb2.SearchMemoryResponse(
        scores=encode(hits.scores, dtype=FLOAT32), indices=encode(hits.indices, dtype=common_pb2.DTYPE_INT64)
    )
    if hits.keys is not None:
        out.keys.CopyFrom(encode(hits.keys, dtype=hits.dtype))
        out.values.CopyFrom(encode(hits.values, dtype=hits.dtype))
    return out


def register(servicer: MemoryServicer, server: grpc.aio.Server) -> None:
    """Adds the MemoryService to ``server``, with the two bulk row streams read and written by
    ``extmind.row_wire`` (rows are not copied in and out of protobuf messages): AppendMemory's
    requests are read by ``read_append_request``, FetchMemory's answers, serialized by the
    servicer, are sent as they are. Registered handlers replace the generated ones."""
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
    append = grpc.stream_unary_rpc_method_handler(
        servicer.AppendMemory,
        request_deserializer=row_wire.read_append_request,
        response_serializer=memory_pb2.AppendMemoryResponse.SerializeToString,
    )
    fetch = grpc.unary_stream_rpc_method_handler(
        servicer.FetchMemory,
        request_deserializer=memory_pb2.FetchMemoryRequest.FromString,
        response_serializer=row_wire.as_is,
    )
    server.add_registered_method_handlers("extmind.v1.MemoryService", {"AppendMemory": append, "FetchMemory": fetch})


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Registered before the server starts; ``attach`` gives it the engines once they are built."""

    def __init__(self):
        self.kv: KVMemories | None = None
        self.docs: Documents | None = None

    def attach(self, kv: KVMemories, docs: Documents) -> None:
        self.kv, self.docs = kv, docs

    # ---------------------------------------------------------------- KV memories

    async def CreateMemory(self, request, context):
        lay = request.layout
        layout = (
            Layout(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype) if request.HasField("layout") else None
        )
        meta = await self.kv.create(
            request.memory_id,
            layout,
            request.model_fingerprint,
            token_ids=list(request.token_ids),
            positions=list(request.positions),
            labels=dict(request.labels),
        )
        return memory_pb2.CreateMemoryResponse(memory=_memory_message(meta))

    async def AppendMemory(self, request_iterator, context):
        async with self.kv.append_stream() as stream:
            async for msg in request_iterator:
                if msg.abort:  # the exception rolls back what the stream stored (kv_append)
                    raise Cancelled("the client aborted the AppendMemory stream: none of its rows are stored")
                meta = await stream.target(msg.memory_id)
                if not msg.HasField("keys") and not msg.HasField("values"):
                    continue  # a message that only names the memory (e.g. to read rows_per_layer)
                shape = (meta.num_kv_heads, None, meta.head_dim)
                # Views of the received bytes (row_wire; of a protobuf message's, each access to
                # msg.keys.data would copy).
                keys = decode_raw(msg.keys, name="keys", dtypes=(meta.dtype,), shape=shape)
                values = decode_raw(msg.values, name="values", dtypes=(meta.dtype,), shape=shape)
                await stream.add(msg.layer, keys, values)
            if context.cancelled():  # seen here only sometimes (grpc.aio may end the iterator first): `abort`
                raise Cancelled("the client cancelled the AppendMemory stream: none of its rows are stored")
            done = await stream.finish()
        return memory_pb2.AppendMemoryResponse(
            memory_id=done.memory_id,
            rows_per_layer=done.rows_per_layer,
            bytes_stored=done.bytes_stored,
            state=_STATE[done.state],
        )

    async def GetMemory(self, request, context):
        meta, tokens, positions = await self.kv.get(request.memory_id, include_tokens=request.include_tokens)
        return memory_pb2.GetMemoryResponse(memory=_memory_message(meta, tokens, positions))

    async def ListMemories(self, request, context):
        metas, token = await self.kv.list(request.model_fingerprint, request.page_size, request.page_token)
        return memory_pb2.ListMemoriesResponse(memories=[_memory_message(m) for m in metas], next_page_token=token)

    async def DeleteMemory(self, request, context):
        create_us = _micros(request.create_time) if request.HasField("create_time") else None
        await self.kv.delete(request.memory_id, create_us)
        return memory_pb2.DeleteMemoryResponse()

    async def FetchMemory(self, request, context):
        # Serialized here (row_wire: one copy of the rows); ``register`` sends them as they are.
        meta, slices = await self.kv.fetch(request.memory_id, list(request.layers))
        # The rows' memory, in every message: the caller tells a memory created again from the
        # one it resolved, even with as many rows (the meta and rows of one loaded memory).
        created = _timestamp(meta.create_us)
        try:
            for piece in slices:
                yield row_wire.fetch_response(
                    meta.memory_id, piece.layer, piece.row_offset, piece.keys, piece.values, meta.dtype, created
                )
        finally:
            slices.close()  # a client gone mid-stream: the memory's load stops waiting for it now

    async def _search(self, request: memory_pb2.SearchMemoryRequest) -> memory_pb2.SearchMemoryResponse:
        queries = decode(request.queries, name="queries", dtypes=KV_DTYPES, ndim=3)
        hits = await self.kv.search(
            list(request.memory_ids),
            request.layer,
            queries,
            request.top_k,
            sim_threshold=request.sim_threshold if request.HasField("sim_threshold") else None,
            return_vectors=request.return_vectors,
            create_us=[_micros(t, "create_times entry") for t in request.create_times],
        )
        return search_response(hits)

    async def SearchMemory(self, request, context):
        return await self._search(request)

    async def SearchMemoryStream(self, request_iterator, context):
        # One access line for the whole stream (``searches``: how many were answered); the first
        # bad request ends it with its status, naming which request it was.
        n = 0
        async for msg in request_iterator:
            if not msg.HasField("search"):
                raise InvalidArgument(f"request {n} of the stream has no search; send a SearchMemoryRequest in it")
            try:
                result = await self._search(msg.search)
            except ExtmindError as e:
                raise type(e)(f"request {n} of the stream: {e.message}") from None
            n += 1
            note_access(searches=n)
            yield memory_pb2.SearchMemoryStreamResponse(result=result)
        # The requests also end when the client goes away; gRPC then cancels this handler from a
        # task of its own, which may run a few milliseconds later (measured: up to ~3 ms on a
        # busy 2-core machine). Waiting a little lets that cancellation land here, so that the
        # access line says CANCELLED and not OK; a client that half-closed waits that long for OK.
        await asyncio.sleep(_CANCEL_LANDS_S)
        if context.cancelled():
            raise asyncio.CancelledError

    # ---------------------------------------------------------------- documents

    async def CreateCollection(self, request, context):
        c = await self.docs.create(request.collection, request.model, request.dimensions)
        return memory_pb2.CreateCollectionResponse(collection=_collection_message(c))

    async def GetCollection(self, request, context):
        return memory_pb2.GetCollectionResponse(collection=_collection_message(await self.docs.get(request.collection)))

    async def ListCollections(self, request, context):
        return memory_pb2.ListCollectionsResponse(collections=[_collection_message(c) for c in self.docs.list()])

    async def DeleteCollection(self, request, context):
        await self.docs.delete_collection(request.collection)
        return memory_pb2.DeleteCollectionResponse()

    async def UpsertDocuments(self, request, context):
        check_collection(request.collection)
        docs = []
        for i, d in enumerate(request.documents):
            emb = _embedding(d.embedding, f"documents[{i}].embedding") if d.HasField("embedding") else None
            docs.append((d.id, d.text, dict(d.metadata), emb))
        c = await self.docs.upsert(request.collection, docs, request.model, request.dimensions)
        return memory_pb2.UpsertDocumentsResponse(ids=[d[0] for d in docs], model=c.model, dimensions=c.dimensions)

    async def SearchDocuments(self, request, context):
        emb = _embedding(request.query_embedding, "query_embedding") if request.HasField("query_embedding") else None
        c, hits = await self.docs.search(
            request.collection, request.query, emb, request.top_k, dict(request.filter), request.instruction
        )
        return memory_pb2.SearchDocumentsResponse(
            model=c.model,
            hits=[memory_pb2.DocumentHit(id=h.id, score=h.score, text=h.text, metadata=h.metadata) for h in hits],
        )

    async def DeleteDocuments(self, request, context):
        n = await self.docs.delete(request.collection, list(request.ids))
        return memory_pb2.DeleteDocumentsResponse(deleted=n)
