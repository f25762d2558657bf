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

import json
import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from extmind.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.memory import metrics
from services.memory.embedder_calls import DocumentEmbedder
from services.memory.kv_layout import ID_RE, now_us
from services.memory.kv_search import normalize_rows
from services.memory.kv_store import redis_errors
from services.memory.limits import (
    DEFAULT_DOCUMENT_TOP_K,
    MAX_DIMENSIONS,
    MAX_DOCUMENT_ID_CHARS,
    MAX_TOP_K,
)

log = logging.getLogger("extmind.memory.documents")

COLLECTION_NAMES_KEY = "em:collections"


def _key(name: str, part: str) -> str:
    return f"em:{{col:{name}}}:{part}"


def check_collection(name: str) -> str:
    if not ID_RE.match(name or ""):
        raise InvalidArgument(
            f"collection {name!r} is not a valid name: use 1-128 letters, digits, '-', '_', '.' or ':'"
        )
    return name


# ---------------------------------------------------------------- in-RAM index of one collection


@dataclass
class Collection:
    name: str
    model: str
    dimensions: int
    create_us: int
    slot_of: dict = field(default_factory=dict)  # doc id -> slot
    docs: dict = field(default_factory=dict)  # slot -> (doc id, text, metadata)
    postings: dict = field(default_factory=dict)  # (key, value) -> set of slots
    next_slot: int = 0
    index: faiss.IndexIDMap2 = None

    def __post_init__(self):
        if self.index is None:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))

    def _unpost(self, slot: int) -> None:
        _, _, md = self.docs.pop(slot)
        for kv in md.items():
            s = self.postings.get(kv)
            if s is not None:
                s.discard(slot)
                if not s:
                    del self.postings[kv]

    def put(self, ids: list[str], texts: list[str], metadata: list[dict], vectors: np.ndarray) -> None:
        """Inserts or replaces documents (vectors already normalised)."""
        old = [self.slot_of[i] for i in ids if i in self.slot_of]
        if old:
            self.index.remove_ids(np.asarray(old, np.int64))
            for s in old:
                self._unpost(s)
        slots = np.arange(self.next_slot, self.next_slot + len(ids), dtype=np.int64)
        self.next_slot += len(ids)
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), slots)
        for i, t, md, s in zip(ids, texts, metadata, slots.tolist()):
            self.slot_of[i] = s
            self.docs[s] = (i, t, md)
            for kv in md.items():
                self.postings.setdefault(kv, set()).add(s)

    def remove(self, ids: list[str]) -> int:
        slots = [self.slot_of.pop(i) for i in ids if i in self.slot_of]
        if slots:
            self.index.remove_ids(np.asarray(slots, np.int64))
            for s in slots:
                self._unpost(s)
        return len(slots)

    def search(self, query: np.ndarray, top_k: int, filt: dict) -> list[tuple[str, float, str, dict]]:
        params = None
        candidates = len(self.docs)
        if filt:
            sets = [self.postings.get(kv, set()) for kv in filt.items()]
            allowed = set.intersection(*sets) if sets else set()
            if not allowed:
                return []
            candidates = len(allowed)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.fromiter(allowed, np.int64)))
        k = min(top_k, candidates)
        if k == 0:
            return []
        scores, slots = self.index.search(query.reshape(1, -1), k, params=params)
        hits = []
        for s, slot in zip(scores[0].tolist(), slots[0].tolist()):
            if slot < 0:
                continue
            doc_id, text, md = self.docs[slot]
            hits.append((doc_id, max(-1.0, min(1.0, s)), text, md))
        return hits


# ---------------------------------------------------------------- the engine


class Documents:
    """The document collections: durable in Redis (``redis_client``, async), indexed in RAM."""

    def __init__(self, redis_client, embedder: DocumentEmbedder, *, max_top_k: int = MAX_TOP_K):
        self.r = redis_client
        self.embedder = embedder
        self.max_top_k = max_top_k
        self.collections: dict[str, Collection] = {}

    # ------------------------------------------------ start-up

    @staticmethod
    def _collection(name: str, meta: dict, texts: dict, mds: dict, embs: dict) -> Collection:
        h = {k.decode(): v.decode() for k, v in meta.items()}
        c = Collection(name=name, model=h["model"], dimensions=int(h["dimensions"]), create_us=int(h["create_us"]))
        ids = [i.decode() for i in embs]
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
            raise NotFound(f"collection {name!r} does not exist; create it with CreateCollection or UpsertDocuments")
        return c

    def list(self) -> list[Collection]:
        """Every collection this process knows, by name."""
        return [c for _, c in sorted(self.collections.items())]

    async def create(self, name: str, model: str, dimensions: int, *, exist_ok: bool = False) -> Collection:
        existing = await self.find(name)
        if existing is not None:
            if exist_ok:
                return existing
            raise AlreadyExists(
                f"collection {name!r} exists already (model {existing.model!r}); delete it first or use another name"
            )
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
        c = Collection(name=name, model=model, dimensions=int(dimensions), create_us=now_us())
        with redis_errors():
            # One HSET: a collection exists in Redis once its meta hash has a model.
            await self.r.hset(
                _key(name, "meta"),
                mapping={"name": name, "model": model, "dimensions": c.dimensions, "create_us": c.create_us},
            )
            await self.r.zadd(COLLECTION_NAMES_KEY, {name: 0})
        self.collections[name] = c
        return c

    async def delete_collection(self, name: str) -> None:
        await self.get(name)
        with redis_errors():
            await self.r.unlink(*(_key(name, p) for p in ("meta", "text", "md", "emb")))
            await self.r.zrem(COLLECTION_NAMES_KEY, name)
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
        if c is None:
            dim = given[0].shape[0] if given else next(iter(computed.values())).shape[0]
            c = await self.create(name, model, dim, exist_ok=True)
        vectors = normalize_rows(np.stack([d[3] if d[3] is not None else computed[i] for i, d in enumerate(docs)]))
        ids = [d[0] for d in docs]
        texts = [d[1] for d in docs]
        mds = [dict(d[2]) for d in docs]
        with redis_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(_key(name, "text"), mapping=dict(zip(ids, texts)))
            pipe.hset(_key(name, "md"), mapping={i: json.dumps(m, sort_keys=True) for i, m in zip(ids, mds)})
            pipe.hset(_key(name, "emb"), mapping={i: v.astype("<f4").tobytes() for i, v in zip(ids, vectors)})
            await pipe.execute()
        c.put(ids, texts, mds, vectors)
        return c

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
            q = query_embedding
        q = normalize_rows(q.reshape(1, -1))
        hits = c.search(q, top_k, dict(filt))
        metrics.SEARCHES.labels(metrics.DOCUMENT).inc()
        metrics.SEARCH_SECONDS.labels(metrics.DOCUMENT).observe(time.perf_counter() - started)
        return c, hits

    async def delete(self, name: str, ids: list[str]) -> int:
        c = await self.get(name)
        if not ids:
            raise InvalidArgument("ids is empty: name the documents to delete")
        with redis_errors():
            pipe = self.r.pipeline(transaction=True)
            for part in ("text", "md", "emb"):
                pipe.hdel(_key(name, part), *ids)
            await pipe.execute()
        return c.remove(list(dict.fromkeys(ids)))
