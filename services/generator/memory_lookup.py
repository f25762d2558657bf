"""A request's memory lookup (docs/architecture.md, "Request flows", steps 2-3), and the lookup ahead.

``MemoryLookup.resolve_and_fetch``: the memories a request names, resolved (``GetMemory``: READY,
this model's) and, for LOCAL, the banks the device lacks fetched, in a worker thread, shared by
the requests that arrive together (coalesce.py).

The lookup ahead: that lookup is one loopback round trip, 1-3 ms, longer while the MLX thread keeps
the GIL busy, and it came before the request's prefill. When an earlier request resolved the same
memory ids (with the memories' tokens, if this one returns citations) and every bank of that
resolution is still cached (LOCAL retrieval only: ``MemoryLookup.guess``), the engine admits the
request at once on that resolution and runs its own lookup meanwhile: the lookup and the prefill
overlap.

Nothing of such a request reaches its caller before its own lookup has returned:

- the same memories (the same ``create_time``, rows, positions and tokens: ``ResolvedMemory``
  equality): its held events flow, exactly those the request would have made after the lookup;
- other memories (one deleted and created again meanwhile): the request is cancelled, its events
  dropped, and it runs again on the new resolution, as if it had arrived after the lookup;
- an error (a memory deleted, the memory service down): the caller gets that error and nothing
  else.

So a request never reads memory state older than its arrival, as without the lookup ahead; the
cost of a wrong guess is the MLX work of the dropped run. ``LastResolutions`` keeps the guesses.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading

from prometheus_client import Counter

from extmind import errors
from services.common.mlx_thread import MLXThread
from services.generator.bank_cache import BankCache, LocalRetriever, bank_from_stored, fetch_bank
from services.generator.coalesce import Coalescer
from services.generator.extended_attention import MemoryContext
from services.generator.memory_client import MemoryChanged
from services.generator.memory_resolution import MemoryResolver, ResolvedMemory
from services.generator.remote_retrieval import RemoteRetriever
from services.generator.request_types import LOCAL

log = logging.getLogger("extmind.generator")

LOOKUPS_AHEAD = Counter(
    "extmind_generator_memory_lookups_ahead_total",
    "requests with memories admitted on the last resolution before their own lookup returned, by "
    "what that lookup found: the same memories (confirmed), others (stale: the request ran again) "
    "or an error (failed)",
    ["outcome"],
)
for _outcome in ("confirmed", "stale", "failed"):  # every series from the start: a query finds 0, not nothing
    LOOKUPS_AHEAD.labels(_outcome)


class LastResolutions:
    """The last resolution of each (memory ids, with tokens) a request asked for: the guess for
    the next request that names them. Bounded in resolutions (``size``) and in the per-row
    entries they hold (``max_rows``: a position per memory row, and a token id with citations;
    a Python int each, ~36 bytes), least recently used dropped first: a resolution is as large as
    its memories, and the guesses outlive the requests. One larger than ``max_rows`` is no guess
    (its requests look up first). Any thread."""

    def __init__(self, size: int = 1024, max_rows: int = 1 << 22):
        self.size = size
        self.max_rows = max_rows
        self._last: collections.OrderedDict = collections.OrderedDict()  # key -> (memories, rows held)
        self._rows = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(memory_ids, include_tokens: bool) -> tuple:
        return tuple(memory_ids), bool(include_tokens)

    def get(self, key: tuple) -> list[ResolvedMemory] | None:
        with self._lock:
            found = self._last.get(key)
            if found is None:
                return None
            self._last.move_to_end(key)
            return found[0]

    def put(self, key: tuple, memories: list[ResolvedMemory]) -> None:
        rows = sum(len(i.positions) + len(i.token_ids) for i in memories)
        with self._lock:
            self._pop(key)
            if rows > self.max_rows:
                return
            self._last[key] = (list(memories), rows)
            self._rows += rows
            while len(self._last) > self.size or self._rows > self.max_rows:
                self._pop(next(iter(self._last)))

    def drop(self, key: tuple) -> None:
        """Forgets ``key``'s resolution (its lookup failed: the next request waits for its own)."""
        with self._lock:
            self._pop(key)

    def _pop(self, key: tuple) -> None:
        found = self._last.pop(key, None)
        if found is not None:
            self._rows -= found[1]


async def confirm(lookup: asyncio.Future, guess: list[ResolvedMemory]) -> None:
    """Waits for a request's own ``lookup`` ((memories, fetched banks)) after it was admitted on
    ``guess``. Raises what the lookup raised, or Stale when it names other memories."""
    try:
        fresh = await lookup
    except asyncio.CancelledError:
        raise
    except Exception:
        LOOKUPS_AHEAD.labels("failed").inc()
        raise
    if fresh[0] != guess:
        LOOKUPS_AHEAD.labels("stale").inc()
        raise Stale(fresh)
    LOOKUPS_AHEAD.labels("confirmed").inc()


class Stale(Exception):
    """Raised inside the engine when a request admitted on a guess finds that its own lookup
    names other memories: ``fresh`` is that lookup's (memories, fetched banks)."""

    def __init__(self, fresh: tuple):
        super().__init__("the memories changed since the last resolution")
        self.fresh = fresh


class MemoryLookup:
    """The memory lookups of one engine: its resolver (the memory service), its bank cache and
    its MLX thread (the banks' arrays are made there), the lookups in flight shared by requests
    that arrive together, and the last resolutions (the guesses)."""

    def __init__(self, resolver: MemoryResolver, bank_cache: BankCache, mlx: MLXThread):
        self.resolver = resolver
        self.bank_cache = bank_cache
        self.mlx = mlx
        self.last = LastResolutions()
        self._shared = Coalescer()

    def guess(self, m) -> list[ResolvedMemory] | None:
        """The last resolution of ``m``'s (request_types.MemoryOptions) memories when the request
        may be admitted on it before its own lookup returns: LOCAL only, while every bank of it is
        cached (a bank fetched on the MLX thread would hold up every other request)."""
        if m.mode != LOCAL:
            # REMOTE searches the memory service at every layer: a stale guess would fail a step
            # there (logged as a warning), for a few ms saved on requests of ~100 ms per token.
            return None
        guess = self.last.get(LastResolutions.key(m.memory_ids, m.return_citations))
        if guess is None or not all(self.bank_cache.holds(i.memory_id, i.version) for i in guess):
            return None
        return guess

    async def resolve_and_fetch(self, m) -> tuple[list[ResolvedMemory], dict]:
        """The request's memories resolved and, for LOCAL retrieval, the banks the cache lacks
        fetched (memory id -> Bank). A memory deleted and created again between the two
        (MemoryChanged) is resolved again, once: the request then reads what the id names now,
        as it would have a moment later; changed again, it is FAILED_PRECONDITION. Raises the
        errors of ``MemoryResolver.resolve`` and ``fetch``; a failed lookup forgets its guess."""
        key = LastResolutions.key(m.memory_ids, m.return_citations)
        try:
            try:
                found = await self._once(m)
            except MemoryChanged as e:
                log.info("a memory changed while it was fetched; resolving again", extra={"error": e.message})
                found = await self._once(m)
        except errors.ExtmindError:
            self.last.drop(key)
            raise
        self.last.put(key, found[0])
        return found

    async def _once(self, m) -> tuple[list[ResolvedMemory], dict]:
        # Shared with the requests that arrive in the same loop iteration with the same memories
        # (coalesce.py): they join the batch together. Each gets its own dict of fetched banks.
        key = (tuple(m.memory_ids), m.return_citations, m.mode)
        joined = self._shared.pending(key)
        memories, fetched = await self._shared.run(key, functools.partial(self._resolve, m))
        if joined and m.mode == LOCAL:
            # The lookup counted each bank once (a hit, or a miss and its one fetch) for the
            # request that asked first; those that joined it got every bank without a fetch of
            # their own: hits (a lookup per memory per request, docs/architecture.md "Metrics").
            self.bank_cache.count_hits(len(memories))
        return memories, dict(fetched)

    def _resolve(self, m) -> tuple[list[ResolvedMemory], dict]:
        """(the request's memories, for LOCAL the banks the cache lacked, fetched: memory id ->
        Bank), in a worker thread: a request with cached banks reaches its admission without a
        hop to the MLX thread in between, which would wait for the end of a decode step
        (docs/architecture.md, "Request flows")."""
        memories = self.resolver.resolve(m.memory_ids, include_tokens=m.return_citations)
        if m.mode != LOCAL:
            return memories, {}
        missing = [i for i in memories if not self.bank_cache.contains(i.memory_id, i.version)]
        return memories, {i.memory_id: fetch_bank(self.resolver, i, self.mlx) for i in missing}

    def context(self, m, memories: list[ResolvedMemory], fetched: dict) -> MemoryContext:
        """On the MLX thread, for a new group: the retriever over ``memories`` (LOCAL: their cached
        banks, those ``fetched`` for the request, or fetched now when evicted since the lookup;
        REMOTE: searches on the memory service) with ``m``'s (request_types.MemoryOptions) settings."""
        if m.mode == LOCAL:
            banks = []
            for i in memories:
                bank = self.bank_cache.get(i.memory_id, i.version, lookup=False)  # counted by the lookup
                if bank is None:  # fetched for this request, or evicted since the lookup
                    bank = fetched.get(i.memory_id) or bank_from_stored(i.memory_id, i.version, self.resolver.fetch(i))
                    self.bank_cache.put(bank)
                banks.append(bank)
            retriever = LocalRetriever(banks)
        else:
            retriever = RemoteRetriever(self.resolver.client, memories)
        return MemoryContext(
            retriever,
            top_k=m.top_k,
            threshold=m.threshold,
            layers=frozenset(m.layers) if m.layers else None,
            cite_min_weight=m.cite_floor,  # in the group key: every citing request of the group asked for it
        )
