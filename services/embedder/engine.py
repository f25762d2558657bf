"""The embedder engine: validates requests, applies the recipe, and batches the forwards.

Knows nothing of gRPC or HTTP; both faces call it and map its ``extmind.errors`` exceptions.
Tokenizing runs on worker threads (the Rust tokenizer releases the GIL); forwards run on the
one MLX thread through the batcher.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from extmind.errors import Internal, InvalidArgument, NotFound, ResourceExhausted
from services.common.mlx_thread import MLXThread
from services.embedder import recipe
from services.embedder.batcher import Batcher, Limits
from services.embedder.models.base import ServedModel

DOCUMENT, QUERY = "document", "query"


@dataclass
class Embeddings:
    """The engine's answer to one embed call."""

    vectors: np.ndarray          # float32 [n, dimensions]
    model: str
    dimensions: int
    token_counts: list[int]


@dataclass
class Ranked:
    index: int
    score: float
    document: str


def prepare(m: ServedModel, inputs: list[str], input_type: str, instruction: str, truncate: bool) -> list[list[int]]:
    """Texts -> the token ids the model runs on: query instruction, end token, truncation."""
    if input_type == QUERY and m.uses_instruction:
        texts = [recipe.query_text(instruction or m.default_instruction, q) for q in inputs]
    else:
        texts = list(inputs)
    return [recipe.fit(s, m.max_input_tokens, truncate=truncate, index=i) for i, s in enumerate(m.token_ids(texts))]


class EmbedderEngine:
    def __init__(self, models: list[ServedModel], mlx: MLXThread, limits: Limits | None = None):
        if not models:
            raise ValueError("the engine needs at least one model")
        self.models = models
        self.mlx = mlx
        self.limits = limits or Limits()
        self.batcher = Batcher(mlx, self.limits)
        embedders = [m for m in models if m.kind == "embedding"]
        rerankers = [m for m in models if m.kind == "reranker"]
        self.default_embedder = embedders[0] if embedders else None
        self.default_reranker = rerankers[0] if rerankers else None

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    # --- lookup -------------------------------------------------------------------------------
    def find(self, name: str, kind: str | None) -> ServedModel:
        """The served model ``name`` means (full name, its last part or an alias; any case).

        ``kind`` "embedding" or "reranker" is what the call needs (an empty name gives that kind's
        default); None accepts a named model of either kind (an empty name: the default embedder).
        Raises NotFound (not served) or InvalidArgument (served, but of the other kind)."""
        key = (name or "").strip().lower()
        if not key:
            kind = kind or "embedding"
            default = self.default_embedder if kind == "embedding" else self.default_reranker
            if default is None:
                raise NotFound(f"this embedder serves no {kind} model; start it with "
                               + ("--model" if kind == "embedding" else "--reranker"))
            return default
        for m in self.models:
            names = {m.name.lower(), m.name.split("/")[-1].lower(), *(a.lower() for a in m.aliases)}
            if key in names:
                if kind is not None and m.kind != kind:
                    raise InvalidArgument(f"model {name!r} is a {m.kind} model; this call needs an {kind} model")
                return m
        served = ", ".join(f"{m.name} ({m.kind}{'; ' + ', '.join(m.aliases) if m.aliases else ''})"
                           for m in self.models)
        raise NotFound(f"model {name!r} is not served here; served: {served}")

    def _check_inputs(self, inputs: list[str], what: str = "inputs") -> None:
        if not inputs:
            raise InvalidArgument(f"{what} is empty: send at least one text")
        if len(inputs) > self.limits.max_inputs_per_request:
            raise ResourceExhausted(f"{len(inputs)} {what} in one request; the limit is "
                                    f"{self.limits.max_inputs_per_request}: split the request")
        for i, t in enumerate(inputs):
            if not isinstance(t, str):
                raise InvalidArgument(f"{what}[{i}] is not a string")
            if not t.strip():
                raise InvalidArgument(f"{what}[{i}] is empty: every text needs at least one non-space character")

    # --- RPCs ---------------------------------------------------------------------------------
    async def embed(self, inputs: list[str], *, model: str = "", input_type: str = DOCUMENT,
                    instruction: str = "", dimensions: int = 0, normalize: bool = True,
                    truncate: bool = True, deadline: float | None = None) -> Embeddings:
        m = self.find(model, "embedding")
        self._check_inputs(inputs)
        dims = recipe.check_dimensions(int(dimensions), m.dimensions, m.min_dimensions, m.name)
        ids = await asyncio.to_thread(prepare, m, inputs, input_type, instruction, truncate)
        pooled = await self.batcher.run(m, ids, deadline)
        return Embeddings(recipe.finish(pooled, dims, normalize), m.name, dims, [len(s) for s in ids])

    async def rerank(self, query: str, documents: list[str], *, instruction: str = "", model: str = "",
                     top_n: int = 0, deadline: float | None = None) -> tuple[str, list[Ranked]]:
        m = self.find(model, "reranker")
        if not query.strip():
            raise InvalidArgument("query is empty: send the text the documents are ranked against")
        self._check_inputs(documents, "documents")
        ids = await asyncio.to_thread(m.pair_ids, instruction or m.default_instruction, query, documents)
        scores = (await self.batcher.run(m, ids, deadline))[:, 0]
        if not np.isfinite(scores).all():
            raise Internal("the reranker produced a non-finite score; nothing was returned (try dtype float32)")
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))
        if top_n:
            order = order[:top_n]
        return m.name, [Ranked(i, float(scores[i]), documents[i]) for i in order]

    async def tokenize(self, inputs: list[str], model: str = "") -> tuple[str, list[list[int]]]:
        m = self.find(model, None)   # any served model tokenizes
        self._check_inputs(inputs)
        return m.name, await asyncio.to_thread(m.token_ids, list(inputs))

    def info(self) -> dict:
        return {
            "models": [{"name": m.name, "aliases": list(m.aliases), "kind": m.kind, "dimensions": m.dimensions,
                        "max_input_tokens": m.max_input_tokens, "dtype": m.dtype,
                        "min_dimensions": m.min_dimensions} for m in self.models],
            "default_model": self.default_embedder.name if self.default_embedder else "",
            "batching": vars(self.limits).copy(),
        }
