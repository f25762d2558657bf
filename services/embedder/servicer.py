"""gRPC face of the embedder: protobuf <-> engine calls, nothing else."""

from __future__ import annotations

import asyncio
import functools

from extmind import tensor
from extmind.errors import InvalidArgument
from extmind.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from services.embedder.batcher import QueueFull
from services.embedder.engine import DOCUMENT, QUERY, EmbedderEngine

_INPUT_TYPES = {
    embedder_pb2.INPUT_TYPE_UNSPECIFIED: DOCUMENT,
    embedder_pb2.INPUT_TYPE_DOCUMENT: DOCUMENT,
    embedder_pb2.INPUT_TYPE_QUERY: QUERY,
}
_KINDS = {"embedding": embedder_pb2.MODEL_KIND_EMBEDDING, "reranker": embedder_pb2.MODEL_KIND_RERANKER}
_DTYPES = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
}


def response_bytes(n: int, dims: int, model: str) -> int:
    """Upper bound of an EmbedResponse's (or EmbedStreamResponse's) size in bytes: n×dims float32
    plus at most 5 bytes per token count and a fixed allowance for the names, shape and tags."""
    return n * dims * 4 + n * 5 + len(model.encode()) + 96


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else asyncio.get_running_loop().time() + left


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, engine: EmbedderEngine | None = None, *, max_response_bytes: int = 4 << 20):
        # Set once the models are loaded; until then the server's readiness guard answers every RPC.
        self.engine = engine
        self.max_response_bytes = max_response_bytes  # --max-response-mb

    def _check_response_size(self, n: int, dims: int, model: str) -> None:
        """Refuses up front an answer larger than clients receive (a stock channel takes 4 MiB and
        fails with 'Received message larger than max' after all the work is done)."""
        size = response_bytes(n, dims, model)
        if size <= self.max_response_bytes:
            return
        fits = max(1, (self.max_response_bytes - response_bytes(0, dims, model)) // (dims * 4 + 5))
        raise self._over_budget(
            f"{n} inputs × {dims} dimensions make",
            size,
            f"send at most {fits} inputs per Embed call, or use EmbedStream with requests of at "
            f"most {fits} inputs each" + (", or fewer dimensions" if dims > 32 else ""),
        )

    def _over_budget(self, what: str, size: int, advice: str) -> InvalidArgument:
        return InvalidArgument(
            f"{what} a {size / (1 << 20):.3g} MiB answer, over this server's response limit of "
            f"{self.max_response_bytes / (1 << 20):.3g} MiB (--max-response-mb; stock gRPC clients receive at most "
            f"4 MiB): {advice}"
        )

    async def _embed(self, request, context):
        if request.input_type not in _INPUT_TYPES:
            raise InvalidArgument(
                f"input_type {request.input_type} is unknown; use INPUT_TYPE_DOCUMENT or INPUT_TYPE_QUERY"
            )
        return await self.engine.embed(
            list(request.inputs),
            token_inputs=[list(t.ids) for t in request.token_inputs],
            model=request.model,
            input_type=_INPUT_TYPES[request.input_type],
            instruction=request.instruction,
            dimensions=request.dimensions,
            normalize=request.normalize if request.HasField("normalize") else True,
            truncate=request.truncate if request.HasField("truncate") else True,
            deadline=_deadline(context),
            check_answer=self._check_response_size,
        )

    async def Embed(self, request, context):
        r = await self._embed(request, context)
        return embedder_pb2.EmbedResponse(
            embeddings=tensor.encode(r.vectors), model=r.model, dimensions=r.dimensions, token_counts=r.token_counts
        )

    async def _embed_when_room(self, request, n: int, context):
        """A stream's request waits for room in the shared queue rather than failing the stream
        (a unary caller gets RESOURCE_EXHAUSTED and retries; a stream would lose its place)."""
        while True:
            try:
                return await self._embed(request, context)
            except QueueFull:
                await self.engine.batcher.wait_for_room(n)

    async def EmbedStream(self, request_iterator, context):
        # Requests start as they arrive (so they share batches) while the stream's texts in flight
        # fit its window, a quarter of the engine's queue: a stream of many requests waits for its
        # answers rather than filling the queue that every client shares (RESOURCE_EXHAUSTED for
        # the others); a request that finds the queue full waits for room. Answers leave in order.
        pending: asyncio.Queue = asyncio.Queue()
        window = max(1, self.engine.limits.max_queue // 4)
        room = asyncio.Condition()
        in_flight = 0

        def has_room(n: int) -> bool:  # a request over the window alone goes when nothing is in flight
            return in_flight == 0 or in_flight + n <= window

        async def read():
            nonlocal in_flight
            try:
                async for req in request_iterator:
                    n = max(1, len(req.inputs) + len(req.token_inputs))
                    async with room:
                        await room.wait_for(functools.partial(has_room, n))
                        in_flight += n
                    pending.put_nowait((n, asyncio.ensure_future(self._embed_when_room(req, n, context))))
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
                n, item = item
                started.append(item)
                try:
                    r = await item
                finally:
                    async with room:
                        in_flight -= n
                        room.notify_all()
                yield embedder_pb2.EmbedStreamResponse(
                    embeddings=tensor.encode(r.vectors),
                    model=r.model,
                    dimensions=r.dimensions,
                    token_counts=r.token_counts,
                    sequence=seq,
                )
                seq += 1
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, tuple):
                    started.append(item[1])
            for t in started:
                t.cancel()

    async def Rerank(self, request, context):
        if request.return_documents:  # the answer echoes documents: bound it before the model runs
            sizes = sorted((len(d.encode()) for d in request.documents), reverse=True)[: request.top_n or None]
            size = sum(sizes) + 16 * len(sizes) + len(request.model.encode()) + 96
            if size > self.max_response_bytes:
                raise self._over_budget(
                    f"returning {len(sizes)} documents makes",
                    size,
                    "send return_documents=false (results index your documents), a smaller "
                    "top_n, or fewer documents per call",
                )
        name, ranked = await self.engine.rerank(
            request.query,
            list(request.documents),
            instruction=request.instruction,
            model=request.model,
            top_n=request.top_n,
            deadline=_deadline(context),
        )
        return embedder_pb2.RerankResponse(
            model=name,
            results=[
                embedder_pb2.RerankResult(
                    index=r.index, score=r.score, document=r.document if request.return_documents else ""
                )
                for r in ranked
            ],
        )

    async def Tokenize(self, request, context):
        name, ids = await self.engine.tokenize(list(request.inputs), request.model)
        response = embedder_pb2.TokenizeResponse(
            model=name, results=[embedder_pb2.TokenizeResult(token_ids=s) for s in ids]
        )
        if response.ByteSize() > self.max_response_bytes:  # known only once tokenized (cheap next to a forward)
            raise self._over_budget(
                f"{sum(map(len, ids))} token ids make", response.ByteSize(), "tokenize fewer or shorter texts per call"
            )
        return response

    async def GetInfo(self, request, context):
        info = self.engine.info()
        return embedder_pb2.EmbedderServiceGetInfoResponse(
            default_model=info["default_model"],
            batching=embedder_pb2.BatchingLimits(
                max_response_bytes=self.max_response_bytes,
                **{
                    k: v
                    for k, v in info["batching"].items()
                    if k in embedder_pb2.BatchingLimits.DESCRIPTOR.fields_by_name
                },
            ),
            models=[_model_info(m) for m in info["models"]],
            available_models=[_model_info(m) for m in info["available_models"]],
            model_memory_budget_bytes=info["model_memory_budget_bytes"],
        )


def _model_info(m: dict) -> embedder_pb2.ModelInfo:
    return embedder_pb2.ModelInfo(
        name=m["name"],
        aliases=m["aliases"],
        kind=_KINDS[m["kind"]],
        dimensions=m["dimensions"],
        max_input_tokens=m["max_input_tokens"],
        dtype=_DTYPES.get(m["dtype"], common_pb2.DTYPE_UNSPECIFIED),
        min_dimensions=m["min_dimensions"],
        memory_bytes=m["memory_bytes"],
    )
