"""gRPC face of the embedder: protobuf <-> engine calls, nothing else."""

from __future__ import annotations

import asyncio

from extmind import tensor
from extmind.errors import InvalidArgument
from extmind.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from services.embedder.engine import DOCUMENT, QUERY, EmbedderEngine

_INPUT_TYPES = {embedder_pb2.INPUT_TYPE_UNSPECIFIED: DOCUMENT, embedder_pb2.INPUT_TYPE_DOCUMENT: DOCUMENT,
                embedder_pb2.INPUT_TYPE_QUERY: QUERY}
_KINDS = {"embedding": embedder_pb2.MODEL_KIND_EMBEDDING, "reranker": embedder_pb2.MODEL_KIND_RERANKER}
_DTYPES = {"float32": common_pb2.DTYPE_FLOAT32, "bfloat16": common_pb2.DTYPE_BFLOAT16,
           "float16": common_pb2.DTYPE_FLOAT16}


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else asyncio.get_running_loop().time() + left


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, engine: EmbedderEngine | None = None):
        # Set once the models are loaded; until then the server's readiness guard answers every RPC.
        self.engine = engine

    async def _embed(self, request, context):
        if request.input_type not in _INPUT_TYPES:
            raise InvalidArgument(f"input_type {request.input_type} is unknown; use INPUT_TYPE_DOCUMENT or "
                                  "INPUT_TYPE_QUERY")
        return await self.engine.embed(
            list(request.inputs), model=request.model, input_type=_INPUT_TYPES[request.input_type],
            instruction=request.instruction, dimensions=request.dimensions,
            normalize=request.normalize if request.HasField("normalize") else True,
            truncate=request.truncate if request.HasField("truncate") else True,
            deadline=_deadline(context))

    async def Embed(self, request, context):
        r = await self._embed(request, context)
        return embedder_pb2.EmbedResponse(embeddings=tensor.encode(r.vectors), model=r.model,
                                          dimensions=r.dimensions, token_counts=r.token_counts)

    async def EmbedStream(self, request_iterator, context):
        # Every request starts at once (so they share batches); answers leave in request order.
        pending: asyncio.Queue = asyncio.Queue()

        async def read():
            try:
                async for req in request_iterator:
                    pending.put_nowait(asyncio.ensure_future(self._embed(req, context)))
            except Exception as exc:  # noqa: BLE001 - handed to the writer below
                pending.put_nowait(exc)
            pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        started: list[asyncio.Future] = []
        try:
            seq = 0
            while (item := await pending.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                started.append(item)
                r = await item
                yield embedder_pb2.EmbedStreamResponse(embeddings=tensor.encode(r.vectors), model=r.model,
                                                       dimensions=r.dimensions, token_counts=r.token_counts,
                                                       sequence=seq)
                seq += 1
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, asyncio.Future):
                    started.append(item)
            for t in started:
                t.cancel()

    async def Rerank(self, request, context):
        name, ranked = await self.engine.rerank(request.query, list(request.documents),
                                                instruction=request.instruction, model=request.model,
                                                top_n=request.top_n, deadline=_deadline(context))
        return embedder_pb2.RerankResponse(model=name, results=[
            embedder_pb2.RerankResult(index=r.index, score=r.score,
                                      document=r.document if request.return_documents else "")
            for r in ranked])

    async def Tokenize(self, request, context):
        name, ids = await self.engine.tokenize(list(request.inputs), request.model)
        return embedder_pb2.TokenizeResponse(model=name, results=[
            embedder_pb2.TokenizeResult(token_ids=s) for s in ids])

    async def GetInfo(self, request, context):
        info = self.engine.info()
        return embedder_pb2.EmbedderServiceGetInfoResponse(
            default_model=info["default_model"],
            batching=embedder_pb2.BatchingLimits(**{k: v for k, v in info["batching"].items()
                                                    if k in embedder_pb2.BatchingLimits.DESCRIPTOR.fields_by_name}),
            models=[embedder_pb2.ModelInfo(name=m["name"], aliases=m["aliases"], kind=_KINDS[m["kind"]],
                                           dimensions=m["dimensions"], max_input_tokens=m["max_input_tokens"],
                                           dtype=_DTYPES[m["dtype"]], min_dimensions=m["min_dimensions"])
                    for m in info["models"]])

