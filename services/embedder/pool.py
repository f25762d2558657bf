"""The models an embedder may serve: the loaded ones, the ones it loads on demand, and the memory
budget they share (docs/embedding.md, "Loading models on demand").

A request names a model; ``lookup`` finds its entry (loaded or not) and ``use`` holds it for the
request: loading it first when it is not in memory (on the one MLX thread; the event loop only
awaits), after unloading the least recently used idle models when the load would go past the
budget. A model with requests in flight -- or waiting for its load -- is never unloaded; when only
such models hold the memory, the load waits for one to finish, then fails with
RESOURCE_EXHAUSTED naming the budget. Requests for a model whose load is under way wait for it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from extmind.embedding_models import find as find_known
from extmind.errors import (
    DeadlineExceeded,
    ExtmindError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.background import retrieved
from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.models.base import ServedModel
from services.embedder.registry import Resolved

log = logging.getLogger("extmind.embedder.pool")

BUDGET_FLAG = "--model-memory-gb (EMBEDDER_MODEL_MEMORY_GB)"
ALLOW_FLAG = "--allow-load (EMBEDDER_ALLOW_LOAD)"


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


@dataclass
class LoadPolicy:
    """What requests may load besides the models given at start, and the memory they share."""

    loadable: list[Resolved] = field(default_factory=list)  # found locally, loaded at first use
    missing: dict[str, str] = field(default_factory=dict)  # allowed name (lower case) -> why it is not loadable
    budget_bytes: int = 0  # parameter bytes all loaded models may hold together; 0 = no limit
    load_options: dict = field(default_factory=dict)  # registry.load's dtype / max_input_tokens
    wait_s: float = 30.0  # longest a load waits for busy models to free memory


@dataclass
class Entry:
    """One model this embedder serves, in memory or not."""

    resolved: Resolved
    aliases: list[str]
    model: ServedModel | None = None
    in_flight: int = 0  # requests holding it (running, or waiting for its load)
    last_used: int = 0  # the pool's clock at its latest use: the smallest is unloaded first
    reserved: int = 0  # bytes held for it while it loads
    loading: asyncio.Task | None = None
    loaded_bytes: int = 0  # its exact size once it has been loaded (a reload needs no estimate)

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def kind(self) -> str:
        return self.resolved.kind

    @property
    def names(self) -> set[str]:
        """Lower-case names a request may use: the full name, its last part, the aliases."""
        return {self.name.lower(), self.name.split("/")[-1].lower(), *(a.lower() for a in self.aliases)}

    @property
    def nbytes(self) -> int:
        return self.model.nbytes if self.model is not None else 0


class ModelPool:
    def __init__(self, models: list[ServedModel], mlx: MLXThread, policy: LoadPolicy | None = None):
        """``models`` are loaded already (the start models, in order); ``policy.loadable`` are not."""
        self.mlx = mlx
        self.policy = policy or LoadPolicy()
        self._clock = itertools.count(1)
        self._changed = asyncio.Event()
        self.entries: list[Entry] = []
        for m in models:
            self.entries.append(
                Entry(
                    Resolved(m.path, m.name, m.kind, list(m.aliases)), list(m.aliases), model=m, loaded_bytes=m.nbytes
                )
            )
        self.start_entries = list(self.entries)
        served = {e.name for e in self.entries}
        for r in self.policy.loadable:
            if r.name not in served:
                self.entries.append(Entry(r, list(r.aliases)))
        budget = self.policy.budget_bytes
        if budget and self.used_bytes > budget:
            raise ResourceExhausted(
                f"the models given at start hold {_gb(self.used_bytes)} of parameters, over {BUDGET_FLAG} "
                f"of {_gb(budget)}: raise it or start fewer models"
            )

    # --- lookup ---------------------------------------------------------------------------------
    def lookup(self, name: str, kind: str | None) -> Entry:
        """The entry ``name`` means (full name, its last part or an alias; any case), loaded or not.

        Raises NotFound (not served; says why when the model is known or allowed) or
        InvalidArgument (served, but of the other kind than ``kind``)."""
        key = name.strip().lower()
        for e in self.entries:
            if key in e.names:
                if kind is not None and e.kind != kind:
                    raise InvalidArgument(f"model {name!r} is a {e.kind} model; this call needs an {kind} model")
                return e
        served = ", ".join(
            f"{e.name} ({e.kind}{'; ' + ', '.join(e.aliases) if e.aliases else ''}"
            f"{'' if e.model is not None else '; loaded on demand'})"
            for e in self.entries
        )
        if key in self.policy.missing:
            raise NotFound(
                f"model {name!r} may be loaded on demand but is not on this machine: {self.policy.missing[key]}"
            )
        known = find_known(name)
        if known is not None:
            raise NotFound(
                f"model {name!r} ({known.name}) is not loaded here and {ALLOW_FLAG} does not allow "
                f"loading it on demand; served: {served}. Start the embedder with --allow-load "
                f"{known.aliases[0]} (or '*' for every known model found locally)"
            )
        raise NotFound(f"model {name!r} is not served here; served: {served}")

    @property
    def loaded(self) -> list[ServedModel]:
        return [e.model for e in self.entries if e.model is not None]

    @property
    def used_bytes(self) -> int:
        """Parameter bytes of the loaded models plus those reserved by loads under way."""
        return sum(e.nbytes + e.reserved for e in self.entries)

    # --- use ------------------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, entry: Entry, deadline: float | None = None) -> AsyncIterator[ServedModel]:
        """Holds ``entry`` for one request (never unloaded meanwhile), loading it first if needed.

        ``deadline`` (event-loop time) bounds this request's wait for the load, not the load.
        Raises ResourceExhausted (the budget stayed held by busy models for ``policy.wait_s``, or
        the model alone is larger), DeadlineExceeded, NotFound or FailedPrecondition (the
        checkpoint does not load)."""
        loop = asyncio.get_running_loop()
        entry.in_flight += 1
        entry.last_used = next(self._clock)
        try:
            while entry.model is None:
                if entry.loading is None:
                    entry.loading = loop.create_task(self._load(entry))
                    entry.loading.add_done_callback(retrieved)
                try:
                    # Shielded: one waiter giving up must not cancel the load the others wait for.
                    await asyncio.wait_for(
                        asyncio.shield(entry.loading), None if deadline is None else deadline - loop.time()
                    )
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the request's deadline passed while {entry.name} was loading; retry with a "
                        "longer deadline (the load goes on)"
                    ) from None
            yield entry.model
        finally:
            entry.in_flight -= 1
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _load(self, entry: Entry) -> None:
        try:
            try:
                need = entry.loaded_bytes or await asyncio.to_thread(
                    registry.estimate_bytes, entry.resolved, self._dtype
                )
                await self._make_room(entry, need)
                model = await self.mlx.run(registry.load, entry.resolved, **self.policy.load_options)
            except (ExtmindError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a checkpoint that does not load (cut short, corrupt)
                raise FailedPrecondition(
                    f"model {entry.name} does not load from {entry.resolved.path} ({type(exc).__name__}: {exc}); "
                    "its files are incomplete or corrupt: download the checkpoint again"
                ) from exc
            model.aliases = list(entry.aliases)
            entry.model, entry.reserved = model, 0
            entry.loaded_bytes = model.nbytes
            self._trim(keep=entry)
            log.info(
                "model loaded on demand",
                extra={"model": model.name, "kind": model.kind, "path": str(model.path), "bytes": model.nbytes},
            )
        finally:
            entry.reserved = 0
            entry.loading = None
            self._notify()

    @property
    def _dtype(self) -> str:
        return self.policy.load_options.get("dtype", "float32")

    async def _make_room(self, entry: Entry, need: int) -> None:
        """Unloads idle models, least recently used first, until ``need`` more bytes fit the budget,
        then reserves them for ``entry`` (no await between the check and the reservation)."""
        budget = self.policy.budget_bytes
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.policy.wait_s
        if budget and need > budget:  # permanent until the flag changes: retrying cannot help
            raise FailedPrecondition(
                f"model {entry.name} needs {_gb(need)} of parameters, more than the whole {BUDGET_FLAG} "
                f"of {_gb(budget)}: raise it"
            )
        while budget and self.used_bytes + need > budget:
            idle = [e for e in self.entries if e.model is not None and e.in_flight == 0 and e is not entry]
            if idle:
                self._unload(min(idle, key=lambda e: e.last_used))
                continue
            left = give_up - loop.time()
            busy = [e.name for e in self.entries if e.model is not None or e.reserved]
            if left <= 0:
                raise ResourceExhausted(
                    f"loading {entry.name} needs {_gb(need)} more, but {_gb(self.used_bytes)} of the "
                    f"{_gb(budget)} of {BUDGET_FLAG} are held by models with requests in flight "
                    f"({', '.join(busy)}); retry shortly, or raise {BUDGET_FLAG}"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        entry.reserved = need

    def _trim(self, keep: Entry) -> None:
        """After a load: the estimate was low when the loaded model is larger; unload idle models
        (least recently used first) while over the budget."""
        budget = self.policy.budget_bytes
        while budget and self.used_bytes > budget:
            idle = [e for e in self.entries if e.model is not None and e.in_flight == 0 and e is not keep]
            if not idle:
                return
            self._unload(min(idle, key=lambda e: e.last_used))

    def _unload(self, entry: Entry) -> None:
        model, entry.model = entry.model, None
        log.info(
            "model unloaded (least recently used, to stay under the memory budget)",
            extra={"model": model.name, "bytes": model.nbytes, "budget": self.policy.budget_bytes},
        )
        # Its last reference goes on the MLX thread, which then hands the freed buffers back.
        self.mlx.submit(_release, [model])
        del model

    # --- listing --------------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        """Every model this embedder serves, loaded ones first (in start/load order): name,
        aliases, kind, loaded, memory_bytes, and for loaded ones dimensions, max_input_tokens,
        dtype, min_dimensions (0 / "" for the others until they load)."""
        out = []
        for e in sorted(self.entries, key=lambda e: e.model is None):
            m = e.model
            out.append(
                {
                    "name": e.name,
                    "aliases": list(e.aliases),
                    "kind": e.kind,
                    "loaded": m is not None,
                    "memory_bytes": e.nbytes,
                    "dimensions": m.dimensions if m else 0,
                    "max_input_tokens": m.max_input_tokens if m else 0,
                    "dtype": m.dtype if m else "",
                    "min_dimensions": m.min_dimensions if m else 0,
                }
            )
        return out


def _release(holder: list) -> None:
    holder.clear()
    gc.collect()
    import mlx.core as mx

    mx.clear_cache()
