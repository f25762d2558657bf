"""The embedder engine: validates requests, applies the recipe, and batches the forwards.

Knows nothing of gRPC or HTTP; both faces call it and map its ``extmind.errors`` exceptions.
Tokenizing runs on worker threads (the Rust tokenizer releases the GIL); forwards run on the
one MLX thread through the batcher.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from extmind.errors import Internal, InvalidArgument, NotFound
from services.common.mlx_thread import MLXThread
from services.embedder import recipe
from services.embedder.batcher import Batcher, Limits
from services.embedder.models.base import ServedModel
from services.embedder.pool import Entry, LoadPolicy, ModelPool

DOCUMENT, QUERY = "document", "query"


def _visible(text: str) -> bool:
    """Whether ``text`` has a character other than spaces, controls (NUL, ...) and format
    characters (zero-width space, BOM): a text of only those embeds as the empty text would."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in text)


@dataclass
class Embeddings:
    """The engine's answer to one embed call."""

    vectors: np.ndarray  # float32 [n, dimensions]
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
    return [
        recipe.truncate_keeping_end_token(s, m.max_input_tokens, truncate=truncate, index=i)
        for i, s in enumerate(m.token_ids(texts))
    ]


def prepare_token_inputs(
    m: ServedModel, token_inputs: list[list[int]], input_type: str, truncate: bool
) -> list[list[int]]:
    """Caller token ids -> the ids the model runs on: checked against the vocabulary, the recipe's
    special tokens added where missing (``with_special_tokens``), truncated like text.

    Raises InvalidArgument for an empty input, a non-integer or out-of-vocabulary id, or a query
    for a model that instructs queries (the instruction is text: tokenized apart from the query it
    would not give the same ids as the text path, so send the query as text)."""
    if m.vocab_size <= 0:
        raise InvalidArgument(f"{m.name} does not take token-id input: send text")
    if input_type == QUERY and m.uses_instruction:
        raise InvalidArgument(
            f"token-id input is embedded as a document; {m.name} prefixes queries with an "
            "instruction, so send queries as text (or embed your own instruction's tokens "
            "with input_type document)"
        )
    out = []
    for i, ids in enumerate(token_inputs):
        if not ids:
            raise InvalidArgument(f"token input {i} is empty: send at least one token id")
        for j, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool):
                raise InvalidArgument(f"token input {i}, position {j}: {t!r} is not an integer token id")
            if not 0 <= t < m.vocab_size:
                raise InvalidArgument(
                    f"token input {i}, position {j}: id {t} is outside {m.name}'s vocabulary "
                    f"[0, {m.vocab_size}); send ids of this model's tokenizer (Tokenize gives them)"
                )
        out.append(
            recipe.truncate_keeping_end_token(
                m.with_special_tokens(ids), m.max_input_tokens, truncate=truncate, index=i
            )
        )
    return out


def parse_aliases(pairs: list[str]) -> dict[str, str]:
    """``["text-embedding-3-small=all-minilm-l6-v2", ...]`` -> {alias: served model}; raises
    InvalidArgument for an entry that is not ``name=model``."""
    out = {}
    for pair in pairs:
        alias, sep, target = (x.strip() for x in pair.partition("="))
        if not sep or not alias or not target:
            raise InvalidArgument(
                f"model alias {pair!r} is not name=model, e.g. text-embedding-3-small=all-minilm-l6-v2"
            )
        out[alias] = target
    return out


class EmbedderEngine:
    def __init__(
        self,
        models: list[ServedModel],
        mlx: MLXThread,
        limits: Limits | None = None,
        aliases: dict[str, str] | None = None,
        policy: LoadPolicy | None = None,
    ):
        """``models`` are loaded (the first embedder and reranker are the defaults); ``policy``
        says what requests may load on demand and the memory budget (default: nothing more, no
        budget). ``aliases`` maps extra names (e.g. an OpenAI model name a client hard-codes) to
        served models; raises InvalidArgument when a target is not served or an alias names a
        served model, ResourceExhausted when ``models`` exceed the budget."""
        if not models:
            raise ValueError("the engine needs at least one model")
        self.mlx = mlx
        self.limits = limits or Limits()
        self.batcher = Batcher(mlx, self.limits)
        self.pool = ModelPool(models, mlx, policy)
        starts = self.pool.start_entries
        self._default = {k: next((e for e in starts if e.kind == k), None) for k in ("embedding", "reranker")}
        for alias, target in (aliases or {}).items():
            try:
                self.pool.lookup(alias, None)
            except NotFound:
                pass
            else:
                raise InvalidArgument(f"model alias {alias!r} already names a served model; pick another name")
            try:
                e = self.pool.lookup(target, None)
            except NotFound as exc:
                raise InvalidArgument(f"model alias {alias}={target}: {exc.message}") from None
            e.aliases.append(alias)
            if e.model is not None:
                e.model.aliases = list(e.aliases)

    @property
    def models(self) -> list[ServedModel]:
        """The models in memory now."""
        return self.pool.loaded

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    # --- lookup -------------------------------------------------------------------------------
    def _entry(self, name: str, kind: str | None) -> Entry:
        """The served model ``name`` means (full name, its last part or an alias; any case),
        loaded or loadable on demand.

        ``kind`` "embedding" or "reranker" is what the call needs (an empty name gives that kind's
        default); None accepts a named model of either kind (an empty name: the default embedder).
        Raises NotFound (not served) or InvalidArgument (served, but of the other kind)."""
        if not (name or "").strip():
            kind = kind or "embedding"
            if self._default[kind] is None:
                raise NotFound(
                    f"this embedder serves no {kind} model; start it with "
                    + ("--model (EMBEDDER_MODEL)" if kind == "embedding" else "--reranker (EMBEDDER_RERANKER)")
                )
            return self._default[kind]
        return self.pool.lookup(name, kind)

    def find(self, name: str, kind: str | None) -> ServedModel:
        """The loaded model ``name`` means; raises like ``_entry``, and NotFound when it is not
        in memory now (a request loads it: ``embed``, ``rerank``, ``tokenize``)."""
        e = self._entry(name, kind)
        if e.model is None:
            raise NotFound(f"model {e.name} is not loaded now; it loads at its first request")
        return e.model

    def model_list(self) -> list[dict]:
        """Every model served, loaded or loaded on demand: see ``ModelPool.listing``."""
        return self.pool.listing()

    def _check_count(self, n: int, what: str) -> None:
        if not n:
            raise InvalidArgument(f"{what} is empty: send at least one text")
        # Too large is not overload: retrying cannot help, so INVALID_ARGUMENT (HTTP 400), never 429.
        if n > self.limits.max_inputs_per_request:
            raise InvalidArgument(
                f"{n} {what} in one request; the limit is {self.limits.max_inputs_per_request} "
                "per request (--max-inputs-per-request): split the request"
            )

    def _check_inputs(self, inputs: list[str], what: str = "inputs") -> None:
        self._check_count(len(inputs), what)
        for i, t in enumerate(inputs):
            if not isinstance(t, str):
                raise InvalidArgument(f"{what}[{i}] is not a string")
            if not _visible(t):
                raise InvalidArgument(
                    f"{what}[{i}] is empty: every text needs at least one character that is not a space, "
                    "a control or a format character (zero-width space, BOM)"
                )

    # --- RPCs ---------------------------------------------------------------------------------
    async def embed(
        self,
        inputs: list[str] | None = None,
        *,
        token_inputs: list[list[int]] | None = None,
        model: str = "",
        input_type: str = DOCUMENT,
        instruction: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        truncate: bool = True,
        deadline: float | None = None,
        check_answer: Callable[[int, int, str], None] | None = None,
    ) -> Embeddings:
        """Texts (``inputs``) or token ids (``token_inputs``, not both) -> float32 [n, dims] vectors.

        ``check_answer(n, dims, model name)`` runs once the answer's shape is known, before any
        model work (a face refusing answers larger than it can send raises there).
        Raises InvalidArgument (bad input, over a limit), NotFound (model not served),
        ResourceExhausted (queue full or model memory budget held by busy models: retry),
        DeadlineExceeded, Internal (non-finite output)."""
        entry = self._entry(model, "embedding")
        if inputs and token_inputs:
            raise InvalidArgument("send inputs (texts) or token_inputs (token ids), not both")
        if token_inputs:
            self._check_count(len(token_inputs), "token inputs")
        else:
            inputs = list(inputs or [])
            self._check_inputs(inputs)
        async with self.pool.use(entry, deadline) as m:
            dims = recipe.check_dimensions(int(dimensions), m.dimensions, m.min_dimensions, m.name)
            if check_answer is not None:
                check_answer(len(token_inputs or inputs), dims, m.name)
            if token_inputs:
                ids = prepare_token_inputs(m, token_inputs, input_type, truncate)
            else:
                ids = await asyncio.to_thread(prepare, m, inputs, input_type, instruction, truncate)
            pooled = await self.batcher.run(m, ids, deadline)
        return Embeddings(recipe.finish(pooled, dims, normalize), m.name, dims, [len(s) for s in ids])

    async def rerank(
        self,
        query: str,
        documents: list[str],
        *,
        instruction: str = "",
        model: str = "",
        top_n: int = 0,
        deadline: float | None = None,
    ) -> tuple[str, list[Ranked]]:
        entry = self._entry(model, "reranker")
        if not _visible(query):
            raise InvalidArgument("query is empty: send the text the documents are ranked against")
        self._check_inputs(documents, "documents")
        async with self.pool.use(entry, deadline) as m:
            ids = await asyncio.to_thread(m.pair_ids, instruction or m.default_instruction, query, documents)
            scores = (await self.batcher.run(m, ids, deadline))[:, 0]
        if not np.isfinite(scores).all():
            raise Internal("the reranker produced a non-finite score; nothing was returned (try dtype float32)")
        order = sorted(range(len(documents)), key=lambda i: (-float(scores[i]), i))
        if top_n:
            order = order[:top_n]
        return m.name, [Ranked(i, float(scores[i]), documents[i]) for i in order]

    async def tokenize(self, inputs: list[str], model: str = "") -> tuple[str, list[list[int]]]:
        entry = self._entry(model, None)  # any served model tokenizes
        self._check_inputs(inputs)
        async with self.pool.use(entry) as m:
            return m.name, await asyncio.to_thread(m.token_ids, list(inputs))

    def info(self) -> dict:
        """models (loaded) and available_models (loaded on demand) as ``model_list`` entries,
        default_model, batching limits, model_memory_budget_bytes (0 = no limit)."""
        listed = self.model_list()
        default = self._default["embedding"]
        return {
            "models": [m for m in listed if m["loaded"]],
            "available_models": [m for m in listed if not m["loaded"]],
            "default_model": default.name if default else "",
            "batching": vars(self.limits).copy(),
            "model_memory_budget_bytes": self.pool.policy.budget_bytes,
        }
