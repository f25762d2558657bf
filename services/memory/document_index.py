"""One document collection's in-RAM index: exact cosine search (FAISS inner product over
L2-normalised vectors) and an inverted index of metadata (key, value) pairs for filters. Durable
state lives in Redis (services/memory/documents.py); this is rebuilt from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import faiss
import numpy as np


def hit_bytes(doc_id: str, text: str, metadata: dict) -> int:
    """About the bytes a document takes in a SearchDocuments answer (UTF-8, a few per field)."""
    md = sum(len(k.encode()) + len(v.encode()) + 8 for k, v in metadata.items())
    return len(doc_id.encode()) + len(text.encode()) + md + 32


class Hit(NamedTuple):
    """One document a search found; ``size``: its ``hit_bytes`` (worked out once, when stored)."""

    id: str
    score: float
    text: str
    metadata: dict
    size: int


@dataclass
class Collection:
    name: str
    model: str
    dimensions: int
    create_us: int
    slot_of: dict = field(default_factory=dict)  # doc id -> slot
    docs: dict = field(default_factory=dict)  # slot -> (doc id, text, metadata, hit_bytes)
    postings: dict = field(default_factory=dict)  # (key, value) -> set of slots
    next_slot: int = 0
    index: faiss.IndexIDMap2 = None

    def __post_init__(self):
        if self.index is None:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))

    def _unpost(self, slot: int) -> None:
        _, _, md, _ = self.docs.pop(slot)
        for kv in md.items():
            s = self.postings.get(kv)
            if s is not None:
                s.discard(slot)
                if not s:
                    del self.postings[kv]

    def put(
        self,
        ids: list[str],
        texts: list[str],
        metadata: list[dict],
        vectors: np.ndarray,
        sizes: list[int] | None = None,
    ) -> None:
        """Inserts or replaces documents (vectors already normalised); ``sizes``: their ``hit_bytes``
        when the caller has them (worked out here otherwise)."""
        if sizes is None:
            sizes = [hit_bytes(i, t, md) for i, t, md in zip(ids, texts, metadata)]
        old = [self.slot_of[i] for i in ids if i in self.slot_of]
        if old:
            self.index.remove_ids(np.asarray(old, np.int64))
            for s in old:
                self._unpost(s)
        slots = np.arange(self.next_slot, self.next_slot + len(ids), dtype=np.int64)
        self.next_slot += len(ids)
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), slots)
        for i, t, md, size, s in zip(ids, texts, metadata, sizes, slots.tolist()):
            self.slot_of[i] = s
            self.docs[s] = (i, t, md, size)
            for kv in md.items():
                self.postings.setdefault(kv, set()).add(s)

    def remove(self, ids: list[str]) -> int:
        slots = [self.slot_of.pop(i) for i in ids if i in self.slot_of]
        if slots:
            self.index.remove_ids(np.asarray(slots, np.int64))
            for s in slots:
                self._unpost(s)
        return len(slots)

    def search(self, query: np.ndarray, top_k: int, filt: dict) -> list[Hit]:
        """The ``top_k`` documents nearest ``query`` [1, dimensions] float32 (normalised) among
        those whose metadata holds every (key, value) of ``filt``, best first."""
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
            doc_id, text, md, size = self.docs[slot]
            hits.append(Hit(doc_id, max(-1.0, min(1.0, s)), text, md, size))
        return hits
