"""Document collections: text + metadata + one embedding each, durable in Redis, searched with
exact cosine FAISS indexes in RAM.

A collection is bound to one embedding model and dimension; vectors of any other model are
refused (FAILED_PRECONDITION). Documents without an embedding are embedded by the embedder
service (``--embedder-url``); without one that is UNAVAILABLE.

Redis layout (hash tag ``{col:<name>}``, one Cluster slot per collection):

    em:{col:<name>}:meta   hash: name, model, dimensions, create_us
    em:{col:<name>}:text   hash: doc id -> text
    em:{col:<name>}:md     hash: doc id -> metadata (JSON object of strings)
    em:{col:<name>}:emb    hash: doc id -> float32 embedding, L2-normalised, little-endian
    em:collections         sorted set of collection names
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref

import numpy as np

from extmind.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.memory import metrics
from services.memory.document_index import Collection, hit_bytes
from services.memory.embedder_calls import DocumentEmbedder
from services.memory.kv_layout import ID_RE, now_us
from services.memory.kv_search import normalize_rows
from services.memory.kv_store import redis_errors
from services.memory.limits import (
    ANSWER_ENVELOPE_BYTES,
    DEFAULT_DOCUMENT_TOP_K,
    MAX_DIMENSIONS,
    MAX_DOCUMENT_ID_CHARS,
    MAX_TOP_K,
)

log = logging.getLogger("extmind.memory.documents")

COLLECTION_NAMES_KEY = "em:collections"


def _key(name: str, part: str) -> str:
    return f"em:{{col:{name}}}:{part}"


def _not_found(name: str, *, deleting: bool = False) -> NotFound:
    if deleting:  # no hint to create what the caller wants gone
        return NotFound(f"collection {name!r} does not exist: nothing to delete (ListCollections lists them)")
    return NotFound(f"collection {name!r} does not exist; create it with CreateCollection or UpsertDocuments")


def check_collection(name: str) -> str:
    if not ID_RE.fullmatch(name or ""):
        raise InvalidArgument(
            f"collection {name!r} is not a valid name: use 1-128 letters, digits, '-', '_', '.' or ':'"
        )
    return name


# ---------------------------------------------------------------- the engine


class Documents:
    """The document collections: durable in Redis (``redis_client``, async), indexed in RAM.

    Every change to one collection (creating or dropping it, writing or deleting documents) runs
    under that collection's lock, from its check of the collection through its Redis write to
    its RAM update: requests that await in between (the embedder, Redis) would otherwise
    interleave, and RAM could disagree with Redis (a collection made twice, documents written
    into one dropped meanwhile, deletes and writes of an id applied in another order). Embedding
    runs before the lock; the collection is checked again under it."""

    def __init__(
        self,
        redis_client,
        embedder: DocumentEmbedder,
        *,
        max_top_k: int = MAX_TOP_K,
        max_answer_bytes: int = 4 * 1024 * 1024,
    ):
        self.r = redis_client
        self.embedder = embedder
        self.max_top_k = max_top_k
        # The response budget (--max-response-mb), less the envelope: a search answer of more hits
        # than fit is INVALID_ARGUMENT, and a document that could never be returned is refused.
        self.answer_room = max_answer_bytes - ANSWER_ENVELOPE_BYTES
        self.collections: dict[str, Collection] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, name: str) -> asyncio.Lock:
        """The collection's lock (kept while anyone holds or waits for it)."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    # ------------------------------------------------ start-up

    @staticmethod
    def _collection(name: str, meta: dict, texts: dict, mds: dict, embs: dict) -> Collection:
        h = {k.decode(): v.decode() for k, v in meta.items()}
        c = Collection(name=name, model=h["model"], dimensions=int(h["dimensions"]), create_us=int(h["create_us"]))
        ids = [i.decode() for i in embs if len(embs[i]) == 4 * c.dimensions]
        if len(ids) < len(embs):  # never written since writes are checked under the lock
            log.warning(
                "documents skipped: embeddings of another size than their collection's",
                extra={"collection": name, "skipped": len(embs) - len(ids), "dimensions": c.dimensions},
            )
        if ids:
            vectors = np.stack([np.frombuffer(embs[i.encode()], "<f4") for i in ids])
            c.put(
                ids,
                [texts.get(i.encode(), b"").decode() for i in ids],
                [json.loads(mds.get(i.encode(), b"{}")) for i in ids],
                vectors,
            )
        return c

    @staticmethod
    def _queue_load(pipe, name: str) -> None:
        for part in ("meta", "text", "md", "emb"):
            pipe.hgetall(_key(name, part))

    def rebuild(self, sync) -> dict:
        """Loads every collection from Redis (blocking, sync client)."""
        names = [
            k.decode()[len("em:{col:") : -len("}:meta")] for k in sync.scan_iter(match="em:{col:*}:meta", count=10_000)
        ]
        docs = 0
        for name in names:
            pipe = sync.pipeline(transaction=False)
            self._queue_load(pipe, name)
            meta, texts, mds, embs = pipe.execute()
            if b"model" not in meta:
                continue
            self.collections[name] = self._collection(name, meta, texts, mds, embs)
            docs += len(embs)
        listed = {x.decode() for x in sync.zrange(COLLECTION_NAMES_KEY, 0, -1)}
        if listed != set(self.collections):
            pipe = sync.pipeline(transaction=True)
            pipe.delete(COLLECTION_NAMES_KEY)
            if self.collections:
                pipe.zadd(COLLECTION_NAMES_KEY, {n: 0 for n in self.collections})
            pipe.execute()
        stats = {"collections": len(self.collections), "documents": docs}
        log.info("document indexes rebuilt from redis", extra=stats)
        return stats

    async def find(self, name: str) -> Collection | None:
        """From RAM, else from Redis (a collection another replica made), else None."""
        check_collection(name)
        c = self.collections.get(name)
        if c is not None:
            return c
        async with self._lock(name):  # not loaded while a drop of it is under way
            return await self._find(name)

    async def _find(self, name: str) -> Collection | None:
        """``find`` for a holder of the collection's lock."""
        c = self.collections.get(name)
        if c is not None:
            return c
        with redis_errors():
            pipe = self.r.pipeline(transaction=False)
            self._queue_load(pipe, name)
            meta, texts, mds, embs = await pipe.execute()
        if b"model" not in meta:
            return None
        return self.collections.setdefault(name, self._collection(name, meta, texts, mds, embs))

    # ------------------------------------------------ collections

    async def get(self, name: str) -> Collection:
        c = await self.find(name)
        if c is None:
            raise _not_found(name)
        return c

    def list(self) -> list[Collection]:
        """Every collection this process knows, by name."""
        return [c for _, c in sorted(self.collections.items())]

    async def create(self, name: str, model: str, dimensions: int) -> Collection:
        """A new empty collection of ``model`` and ``dimensions`` (either unset: the embedder's
        default model, its size). Raises AlreadyExists, InvalidArgument, Unavailable."""
        existing = await self.find(name)
        if existing is not None:
            raise self._exists(existing)
        if not model or not dimensions:
            if not self.embedder.url:
                raise InvalidArgument(
                    "a new collection needs its embedding model and dimensions (or an embedder "
                    "service to ask: --embedder-url)"
                )
            probe, model = await self.embedder.embed(["probe"], model=model, query=False, dimensions=dimensions)
            dimensions = probe.shape[1]
        if dimensions > MAX_DIMENSIONS:
            raise InvalidArgument(f"dimensions {dimensions} is too large (at most {MAX_DIMENSIONS})")
        async with self._lock(name):
            existing = await self._find(name)  # made by another request while the embedder answered
            if existing is not None:
                raise self._exists(existing)
            return await self._create(name, model, dimensions)

    @staticmethod
    def _exists(c: Collection) -> AlreadyExists:
        return AlreadyExists(
            f"collection {c.name!r} exists already (model {c.model!r}); delete it first or use another name"
        )

    async def _create(self, name: str, model: str, dimensions: int) -> Collection:
        """Makes the collection, for a holder of its lock that found none."""
        c = Collection(name=name, model=model, dimensions=int(dimensions), create_us=now_us())
        with redis_errors():
            # One transaction: documents left by an older replica's race are dropped, and the
            # collection exists in Redis once its meta hash has a model.
            pipe = self.r.pipeline(transaction=True)
            pipe.unlink(*(_key(name, p) for p in ("text", "md", "emb")))
            pipe.hset(
                _key(name, "meta"),
                mapping={"name": name, "model": model, "dimensions": c.dimensions, "create_us": c.create_us},
            )
            pipe.zadd(COLLECTION_NAMES_KEY, {name: 0})
            await pipe.execute()
        self.collections[name] = c
        return c

    async def delete_collection(self, name: str) -> None:
        check_collection(name)
        async with self._lock(name):
            if await self._find(name) is None:
                raise _not_found(name, deleting=True)
            with redis_errors():
                pipe = self.r.pipeline(transaction=True)
                pipe.unlink(*(_key(name, p) for p in ("meta", "text", "md", "emb")))
                pipe.zrem(COLLECTION_NAMES_KEY, name)
                await pipe.execute()
            self.collections.pop(name, None)

    # ------------------------------------------------ documents

    async def upsert(self, name: str, docs: list, model: str, dimensions: int) -> Collection:
        """``docs``: [(id, text, metadata dict, embedding ndarray or None)]."""
        check_collection(name)
        if not docs:
            raise InvalidArgument("documents is empty: send at least one document")
        seen = set()
        for doc_id, _, _, _ in docs:
            if not doc_id or len(doc_id) > MAX_DOCUMENT_ID_CHARS:
                raise InvalidArgument(f"document id {doc_id!r} must be 1-{MAX_DOCUMENT_ID_CHARS} characters")
            if doc_id in seen:
                raise InvalidArgument(f"document id {doc_id!r} appears twice in one request")
            seen.add(doc_id)
        sizes = [hit_bytes(doc_id, text, md) for doc_id, text, md, _ in docs]
        for (doc_id, _, _, _), size in zip(docs, sizes):
            if size > self.answer_room:
                raise InvalidArgument(
                    f"document {doc_id!r} is {size / 2**20:.1f} MiB of id, text and metadata: a search could "
                    f"never return it within the {self.answer_room / 2**20:.3g} MiB response budget "
                    "(--max-response-mb); store less of it here (nothing was stored)"
                )
        c = await self.find(name)
        if c is not None and model and model != c.model:
            raise FailedPrecondition(
                f"collection {name!r} holds vectors of model {c.model!r}, not {model!r}; use a collection of that model"
            )
        for doc_id, _, _, e in docs:
            # Also checked by the gRPC face; here for every caller: a NaN / inf stored would make
            # every cosine against it NaN, ranking the collection's searches at random.
            if e is not None and not np.isfinite(e).all():
                raise InvalidArgument(
                    f"the embedding of document {doc_id!r} holds NaN or infinite values; send a finite "
                    "embedding (nothing was stored)"
                )
            if e is not None and not e.any():
                raise InvalidArgument(
                    f"the embedding of document {doc_id!r} is all zeros: it has no direction to rank by "
                    "(nothing was stored)"
                )
        given = [e for _, _, _, e in docs if e is not None]
        if given:
            dims = sorted({e.shape[0] for e in given})
            if len(dims) > 1:
                raise InvalidArgument(f"the given embeddings have different sizes {dims}")
            want = c.dimensions if c is not None else (dimensions or dims[0])
            if dims[0] != want:
                where = f"collection {name!r} holds {want}" if c is not None else f"dimensions is {want}"
                raise InvalidArgument(f"the given embeddings have {dims[0]} dimensions; {where}")
            if c is None and not model:
                raise InvalidArgument(
                    "name the model that produced the given embeddings in "
                    "UpsertDocumentsRequest.model (a new collection is bound to it)"
                )
        missing = [i for i, d in enumerate(docs) if d[3] is None]
        computed = {}
        if missing:
            texts = [docs[i][1] for i in missing]
            if any(not t for t in texts):
                raise InvalidArgument("a document without an embedding needs its text")
            if c is not None:
                ask_model, ask_dims = c.model, c.dimensions
            else:
                ask_model, ask_dims = model, (given[0].shape[0] if given else dimensions)
            vectors, got_model = await self.embedder.embed(texts, model=ask_model, query=False, dimensions=ask_dims)
            if ask_dims and vectors.shape[1] != ask_dims:
                raise FailedPrecondition(
                    f"the embedder made {vectors.shape[1]}-dimensional vectors with "
                    f"{got_model!r}; collection {name!r} needs {ask_dims}"
                )
            if c is None and not model:
                model = got_model  # a new collection is bound to the embedder's canonical model name
            computed = dict(zip(missing, vectors))
        vectors = normalize_rows(np.stack([d[3] if d[3] is not None else computed[i] for i, d in enumerate(docs)]))
        # The model these vectors are of: the collection's, else the request's or the embedder's.
        model = c.model if c is not None else model
        ids = [d[0] for d in docs]
        texts = [d[1] for d in docs]
        mds = [dict(d[2]) for d in docs]
        async with self._lock(name):
            now = await self._find(name)  # dropped, or made by another request, while embedding?
            if now is None:
                now = await self._create(name, model, vectors.shape[1])
            elif now.model != model or now.dimensions != vectors.shape[1]:
                raise FailedPrecondition(
                    f"collection {name!r} was made meanwhile by another request, for model {now.model!r} "
                    f"({now.dimensions} dimensions), not {model!r} ({vectors.shape[1]}); nothing was stored"
                )
            with redis_errors():
                pipe = self.r.pipeline(transaction=True)
                pipe.hset(_key(name, "text"), mapping=dict(zip(ids, texts)))
                pipe.hset(_key(name, "md"), mapping={i: json.dumps(m, sort_keys=True) for i, m in zip(ids, mds)})
                pipe.hset(_key(name, "emb"), mapping={i: v.astype("<f4").tobytes() for i, v in zip(ids, vectors)})
                await pipe.execute()
            now.put(ids, texts, mds, vectors, sizes)
        return now

    async def search(self, name: str, query: str, query_embedding, top_k: int, filt: dict, instruction: str):
        started = time.perf_counter()
        c = await self.get(name)
        if top_k > self.max_top_k:
            raise InvalidArgument(f"top_k {top_k} is too large; at most {self.max_top_k}")
        top_k = top_k or DEFAULT_DOCUMENT_TOP_K
        if query and query_embedding is not None:
            raise InvalidArgument("send either query or query_embedding, not both")
        if query_embedding is None:
            if not query:
                raise InvalidArgument("the query is empty: send query text or query_embedding")
            vectors, got_model = await self.embedder.embed(
                [query], model=c.model, query=True, dimensions=c.dimensions, instruction=instruction
            )
            if vectors.shape[1] != c.dimensions:
                raise FailedPrecondition(
                    f"the embedder made {vectors.shape[1]}-dimensional query vectors; "
                    f"collection {name!r} holds {c.dimensions}"
                )
            q = vectors[0]
        else:
            if query_embedding.shape[0] != c.dimensions:
                raise InvalidArgument(
                    f"query_embedding has {query_embedding.shape[0]} dimensions; collection "
                    f"{name!r} holds {c.dimensions} (model {c.model!r})"
                )
            if not query_embedding.any():
                raise InvalidArgument("query_embedding is all zeros: it has no direction to rank by")
            q = query_embedding
        q = normalize_rows(q.reshape(1, -1))
        hits = c.search(q, top_k, dict(filt))
        sizes = np.cumsum([h.size for h in hits])
        if len(sizes) and sizes[-1] > self.answer_room:
            fit = int(np.searchsorted(sizes, self.answer_room, side="right"))
            raise InvalidArgument(
                f"the {len(hits)} hits' texts and metadata make {sizes[-1] / 2**20:.1f} MiB, over the "
                f"{self.answer_room / 2**20:.3g} MiB response budget (--max-response-mb): ask for top_k {max(fit, 1)} "
                "or fewer"
            )
        metrics.SEARCHES.labels(metrics.DOCUMENT).inc()
        metrics.SEARCH_SECONDS.labels(metrics.DOCUMENT).observe(time.perf_counter() - started)
        return c, hits

    async def delete(self, name: str, ids: list[str]) -> int:
        await self.get(name)
        if not ids:
            raise InvalidArgument("ids is empty: name the documents to delete")
        async with self._lock(name):
            c = await self._find(name)
            if c is None:  # dropped meanwhile
                raise _not_found(name)
            with redis_errors():
                pipe = self.r.pipeline(transaction=True)
                for part in ("text", "md", "emb"):
                    pipe.hdel(_key(name, part), *ids)
                await pipe.execute()
            return c.remove(list(dict.fromkeys(ids)))
