"""The memory service's calls to the embedder service: embeddings for documents sent without one.

Not the public ``extmind.embedder_client.EmbedderClient`` (a fallback chain for applications):
this is one gRPC stub to ``--embedder-url``, whose errors become ours with
``extmind.errors.from_rpc_error`` (the embedder is a dependency: what describes the request keeps
its code, anything else is UNAVAILABLE).
"""

from __future__ import annotations

import grpc
import numpy as np

from extmind.channels import aio_channel, auth_metadata
from extmind.errors import Unavailable, from_rpc_error
from extmind.tensor import FLOAT32, decode
from extmind.v1 import embedder_pb2, embedder_pb2_grpc
from services.memory.limits import EMBED_BATCH_TEXTS, EMBEDDER_TIMEOUT_SECONDS


class DocumentEmbedder:
    """Embeds texts on the embedder service at ``url`` ("" = none configured)."""

    def __init__(self, url: str, token: str = "", timeout: float = EMBEDDER_TIMEOUT_SECONDS):
        self.url = url
        self.timeout = timeout
        self.metadata = auth_metadata(token)
        self._channel = None
        self._stub = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def embed(
        self, texts: list[str], *, model: str, query: bool, dimensions: int = 0, instruction: str = ""
    ) -> tuple[np.ndarray, str]:
        """-> (float32 [len(texts), dimensions] vectors, the embedder's canonical model name).

        ``query`` picks the query side of asymmetric models. Texts go in calls of at most
        EMBED_BATCH_TEXTS, so every answer stays inside the embedder's response budget and
        per-request input limit whatever the model's width. Raises Unavailable without an
        embedder, or when it is down; the embedder's InvalidArgument / NotFound / ... pass through.
        """
        parts, name = [], ""
        for i in range(0, len(texts), EMBED_BATCH_TEXTS):
            vectors, name = await self._embed_once(
                texts[i : i + EMBED_BATCH_TEXTS],
                model=model,
                query=query,
                dimensions=dimensions,
                instruction=instruction,
            )
            model = model or name  # later batches ask for the model the first one got
            parts.append(vectors)
        return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), name

    async def _embed_once(
        self, texts: list[str], *, model: str, query: bool, dimensions: int, instruction: str
    ) -> tuple[np.ndarray, str]:
        if not self.url:
            raise Unavailable(
                "no embedder service is configured: start the memory service with "
                "--embedder-url HOST:PORT (env EMBEDDER_URL), or send each document's embedding "
                "(and query_embedding to search)"
            )
        if self._stub is None:
            self._channel = aio_channel(self.url)
            self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
        req = embedder_pb2.EmbedRequest(
            inputs=texts,
            model=model,
            dimensions=dimensions,
            instruction=instruction,
            input_type=embedder_pb2.INPUT_TYPE_QUERY if query else embedder_pb2.INPUT_TYPE_DOCUMENT,
        )
        try:
            resp = await self._stub.Embed(req, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            err = from_rpc_error(
                e,
                peer=f"embedder service at {self.url}",
                as_dependency=True,
                hint="start it or set --embedder-url / EMBEDDER_URL",
            )
            if not isinstance(err, Unavailable):  # its words describe the request: say whose they are
                err = type(err)(f"the embedder service at {self.url} answered: {err.message}")
            raise err from e
        vectors = decode(resp.embeddings, name="embedder response embeddings", dtypes=(FLOAT32,), ndim=2)
        if vectors.shape[0] != len(texts):
            raise Unavailable(
                f"the embedder service at {self.url} returned {vectors.shape[0]} vectors for {len(texts)} texts"
            )
        return vectors, resp.model
