"""KV memories in Redis, the source of truth: create, list, delete, append, finish, roll back,
and the bulk reads that load a memory into RAM. Key names are in ``kv_layout``, the Lua scripts
in ``kv_scripts``.

State machine BUILDING -> READY: a batch of chunks goes to Redis as one MULTI/EXEC; per chunk a
plain SET of the keys and of the values (no copies through Lua) and a small script that checks
the memory (exists, BUILDING, room for the rows), links the chunk into the layer's list and counts
its rows, or drops the two keys. So a chunk is either whole and counted or absent, also across a
crash. The READY flip happens in the script that sees every layer hold len(token_ids) rows (or,
without token ids, in the ``finish`` script that checks every layer holds the same number of
rows). With ``appendfsync always`` Redis fsyncs the AOF before replying, so every reply is durable
(see ``redis_server.ensure_durable``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import json
import logging
import uuid

import numpy as np
import redis
import redis.asyncio as aredis

from extmind.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.memory import kv_scripts
from services.memory.kv_layout import (
    BUILDING,
    MEMORY_IDS_KEY,
    MemoryMeta,
    chunk_key,
    chunk_list_key,
    key_prefix,
    meta_key,
    positions_key,
    tokens_key,
)

log = logging.getLogger("extmind.memory.store")


@contextlib.contextmanager
def redis_errors():
    """Redis being down or loading is UNAVAILABLE for the caller."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError) as e:
        raise Unavailable(f"Redis is unreachable ({e}); retry when it is back") from e
    except redis.BusyLoadingError as e:
        raise Unavailable("Redis is still loading its data; retry in a moment") from e


def _page_token(after: str, fingerprint: str) -> str:
    raw = json.dumps({"a": after, "f": fingerprint}, separators=(",", ":")).encode()
    return "m1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_page_token(token: str, fingerprint: str) -> str:
    try:
        if not token.startswith("m1."):
            raise ValueError("prefix")
        body = token[3:]
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        after, fp = data["a"], data["f"]
        if not isinstance(after, str) or not isinstance(fp, str):
            raise ValueError("types")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise InvalidArgument(
            "page_token is not one this service issued; pass the next_page_token of "
            "the previous ListMemories response, or empty for the first page"
        ) from e
    if fp != fingerprint:
        raise InvalidArgument(
            "page_token belongs to a listing with another model_fingerprint filter; "
            "keep the filter the same across pages"
        )
    return after


# What KVStore.delete did (the DELETE script's answer).
DELETED, MISSING, KEPT_NOT_IDLE, KEPT_OTHER_INCARNATION = 1, 0, -1, -2


class KVStore:
    """Async access to the memories in Redis (one client, pooled connections)."""

    def __init__(self, url: str, durability: str = "appendfsync-always"):
        self.url = url
        self.durability = durability
        self.r = aredis.Redis.from_url(
            url, socket_timeout=60, socket_connect_timeout=5, health_check_interval=30, max_connections=64
        )
        self._create = self.r.register_script(kv_scripts.CREATE)
        self._finish = self.r.register_script(kv_scripts.FINISH)
        self._rollback = self.r.register_script(kv_scripts.ROLLBACK)
        self._delete = self.r.register_script(kv_scripts.DELETE)
        self._touch = self.r.register_script(kv_scripts.TOUCH)
        # Bulk writes (append batches) use a blocking client on worker threads.
        self.sync = sync_client(url)
        self._link_sync = self.sync.register_script(kv_scripts.LINK_CHUNK)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="redis-write")

    async def close(self) -> None:
        await asyncio.to_thread(self.pool.shutdown, wait=True)
        self.sync.close()
        await self.r.aclose()

    async def ping(self) -> None:
        with redis_errors():
            await self.r.ping()

    # ---------------------------------------------------------------- catalogue

    async def create(self, meta: MemoryMeta, token_ids: np.ndarray | None, positions: np.ndarray | None) -> MemoryMeta:
        """Stores a new BUILDING memory (AlreadyExists if its id is taken). -> ``meta``, emptied."""
        tok = b"" if token_ids is None else np.asarray(token_ids, "<i4").tobytes()
        pos = b"" if positions is None else np.asarray(positions, "<u4").tobytes()
        memory_id = meta.memory_id
        with redis_errors():
            created = await self._create(
                keys=[meta_key(memory_id), tokens_key(memory_id), positions_key(memory_id)],
                args=[json.dumps(meta.creation_fields()), tok, pos],
            )
            if not created:
                raise AlreadyExists(f"memory {memory_id!r} exists already; pick another memory_id or delete it first")
            await self.r.zadd(MEMORY_IDS_KEY, {memory_id: 0})
        meta.state, meta.bytes = BUILDING, 0
        meta.rows, meta.chunks = [0] * meta.num_layers, [0] * meta.num_layers
        return meta

    async def get(self, memory_id: str) -> MemoryMeta:
        with redis_errors():
            h = await self.r.hgetall(meta_key(memory_id))
        return _found(memory_id, h)

    async def get_with_tokens(self, memory_id: str) -> tuple[MemoryMeta, np.ndarray, np.ndarray]:
        """``get`` and the memory's token ids (int32) and positions (uint32), read in one
        MULTI/EXEC (one slot: the keys share the hash tag): a delete, or a delete and create
        again, lands before or after both reads, never between. Read one after the other, a
        memory deleted in between answered with its meta and no tokens (citations of empty
        text), created again with another memory's tokens."""
        with redis_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hgetall(meta_key(memory_id))
            pipe.mget([tokens_key(memory_id), positions_key(memory_id)])
            h, (tok, pos) = await pipe.execute()
        return _found(memory_id, h), np.frombuffer(tok or b"", "<i4"), np.frombuffer(pos or b"", "<u4")

    async def list(self, fingerprint: str, page_size: int, page_token: str) -> tuple[list[MemoryMeta], str]:
        after = _parse_page_token(page_token, fingerprint) if page_token else ""
        out: list[MemoryMeta] = []
        lo = f"({after}" if after else "-"
        batch = max(page_size + 1, 64)
        with redis_errors():
            while len(out) <= page_size:
                ids = await self.r.zrangebylex(MEMORY_IDS_KEY, lo, "+", start=0, num=batch)
                if not ids:
                    break
                pipe = self.r.pipeline(transaction=False)
                for i in ids:
                    pipe.hgetall(meta_key(i.decode()))
                for h in await pipe.execute():
                    if h:
                        m = MemoryMeta.from_hash(h)
                        if not fingerprint or m.fingerprint == fingerprint:
                            out.append(m)
                lo = "(" + ids[-1].decode()
                if len(ids) < batch:
                    break
        if len(out) > page_size:
            out = out[:page_size]
            return out, _page_token(out[-1].memory_id, fingerprint)
        return out, ""

    async def delete(self, memory_id: str, *, idle_us: int | None = None, create_us: int | None = None) -> int:
        """Deletes every key of the memory and unlists it. -> DELETED, MISSING, KEPT_NOT_IDLE (the
        reaper's ``idle_us``: only a BUILDING memory untouched for longer than that is deleted) or
        KEPT_OTHER_INCARNATION (``create_us``: the memory under the id was created at another
        time), each checked in the same script (see ``kv_scripts.DELETE``)."""
        args = ["" if idle_us is None else int(idle_us), "" if create_us is None else int(create_us)]
        with redis_errors():
            done = await self._delete(keys=[meta_key(memory_id), key_prefix(memory_id)], args=args)
            if done == DELETED or (done == MISSING and idle_us is None):  # a listing entry without a meta goes too
                await self.r.zrem(MEMORY_IDS_KEY, memory_id)
        return done

    async def touch(self, memory_id: str) -> bool:
        """Marks a BUILDING memory as written now (``touch_us``). -> False if missing or READY."""
        with redis_errors():
            return bool(await self._touch(keys=[meta_key(memory_id)], args=[]))

    async def idle_building(self, idle_us: int, batch: int = 500) -> list[tuple[str, int, int]]:
        """(memory id, microseconds idle, bytes) of every listed BUILDING memory untouched for
        longer than ``idle_us`` by Redis's clock: the reaper's candidates (it re-checks each when
        deleting). One pass over the listing, ``batch`` metas per round trip."""
        out: list[tuple[str, int, int]] = []
        with redis_errors():
            secs, micros = await self.r.time()
            now = secs * 1_000_000 + micros
            lo = "-"
            while True:
                ids = await self.r.zrangebylex(MEMORY_IDS_KEY, lo, "+", start=0, num=batch)
                if not ids:
                    break
                pipe = self.r.pipeline(transaction=False)
                for i in ids:
                    pipe.hmget(meta_key(i.decode()), ["state", "touch_us", "create_us", "bytes"])
                for i, (state, touched, created, size) in zip(ids, await pipe.execute()):
                    if state != BUILDING.encode():
                        continue
                    idle = now - int(touched or created or now)
                    if idle > idle_us:
                        out.append((i.decode(), idle, int(size or 0)))
                lo = "(" + ids[-1].decode()
                if len(ids) < batch:
                    break
        return out

    # ---------------------------------------------------------------- appends

    def writer(self) -> ChunkWriter:
        return ChunkWriter(self)

    async def finish(self, memory_id: str) -> tuple[str, int, bool]:
        with redis_errors():
            state, rows, equal = await self._finish(keys=[meta_key(memory_id)], args=[])
        return state.decode(), int(rows), bool(equal)

    async def rollback(self, memory_id: str, create_us: int, stream: str, rows_before: dict[int, int]) -> bool:
        """Removes the chunks of append stream ``stream`` (while the memory is BUILDING and still
        the one created at ``create_us``)."""
        if not rows_before:
            return False
        args = [stream, str(create_us)]
        for layer, rows in rows_before.items():
            args += [layer, rows]
        with redis_errors():
            done = await self._rollback(keys=[meta_key(memory_id), key_prefix(memory_id)], args=args)
        return bool(done)


class ChunkWriter:
    """Queues the chunks of one append stream and sends them in batches (one MULTI/EXEC each),
    one batch at a time so chunks keep their order. Every reply of a batch is durable.

    Batches go out through the blocking client on a worker thread: a multi-MiB ``sendall`` runs
    in C without the GIL, so the event loop keeps receiving the next gRPC messages meanwhile."""

    def __init__(self, store: KVStore):
        self.store = store
        self.stream = uuid.uuid4().hex[:12]  # names this stream's chunks
        self.seq = 0
        self.pipe = store.sync.pipeline(transaction=False)
        self.pending: list[int] = []  # layer of each queued chunk
        self.pending_bytes = 0

    def add(self, memory_id: str, create_us: int, layer: int, keys, values, rows: int) -> None:
        """Queues one chunk (sent by the next ``take``'s awaitable) for the memory created at
        ``create_us`` (NOT_FOUND if it was deleted, also when created again since)."""
        name = f"{self.stream}.{self.seq}"
        self.seq += 1
        k, v = chunk_key(memory_id, "k", layer, name), chunk_key(memory_id, "v", layer, name)
        # One MULTI/EXEC per chunk (not per batch): Redis applies and fsyncs each chunk while the
        # rest of the batch is still arriving.
        self.pipe.execute_command("MULTI")
        self.pipe.set(k, keys)
        self.pipe.set(v, values)
        self.store._link_sync(
            keys=[meta_key(memory_id), k, v, chunk_list_key(memory_id, layer)],
            args=[layer, rows, len(keys) + len(values), name, str(create_us)],
            client=self.pipe,
        )
        self.pipe.execute_command("EXEC")
        self.pending.append(layer)
        self.pending_bytes += len(keys) + len(values)

    def take(self):
        """-> an awaitable sending the queued chunks, returning [(layer, rows after, ready)]."""
        pipe, pending = self.pipe, self.pending
        self.pipe = self.store.sync.pipeline(transaction=False)
        self.pending, self.pending_bytes = [], 0
        return asyncio.get_running_loop().run_in_executor(self.store.pool, self._send, pipe, pending)

    @staticmethod
    def _send(pipe, pending: list[int]) -> list[tuple[int, int, bool]]:
        if not pending:
            return []
        with redis_errors():
            try:
                replies = pipe.execute(raise_on_error=False)
            finally:
                pipe.reset()
        out = []
        for layer, exec_reply in zip(pending, replies[4::5]):  # MULTI, SET, SET, link, EXEC per chunk
            reply = exec_reply[2] if isinstance(exec_reply, list) and len(exec_reply) == 3 else exec_reply
            if isinstance(reply, Exception):
                msg = str(reply)
                if "EXTMIND_NOT_FOUND" in msg:
                    raise NotFound(
                        "the memory was deleted while rows were being appended (by DeleteMemory, or as "
                        "abandoned: BUILDING and untouched for longer than MEMORY_BUILDING_TTL)"
                    )
                if "EXTMIND_NOT_BUILDING" in msg:
                    raise FailedPrecondition("the memory is READY already; a READY memory takes no more rows")
                if "EXTMIND_OVERFLOW" in msg:
                    raise InvalidArgument(f"layer {layer} would hold more rows than the memory's token_ids")
                if isinstance(reply, (redis.ConnectionError, redis.TimeoutError)):
                    raise Unavailable(f"Redis is unreachable ({reply}); retry when it is back")
                raise reply
            out.append((layer, int(reply[0]), bool(reply[1])))
        return out


# ---------------------------------------------------------------- bulk reads (sync, hiredis)


def sync_client(url: str) -> redis.Redis:
    # 1 MiB socket reads: bulk GETs of multi-MiB chunks parse ~1.7x faster than with 64 KiB.
    return redis.Redis.from_url(url, socket_timeout=120, socket_connect_timeout=5, socket_read_size=1 << 20)


def scan_memories(client: redis.Redis) -> list[MemoryMeta]:
    """Every memory in Redis (SCAN over the meta keys), and the listing set repaired to match."""
    keys = [k for k in client.scan_iter(match="em:{mem:*}:meta", count=10_000)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
    metas = [MemoryMeta.from_hash(h) for h in pipe.execute() if h]
    listed = {x.decode() for x in client.zrange(MEMORY_IDS_KEY, 0, -1)}
    present = {m.memory_id for m in metas}
    missing, stale = present - listed, listed - present
    if missing:
        client.zadd(MEMORY_IDS_KEY, {i: 0 for i in missing})
    if stale:
        client.zrem(MEMORY_IDS_KEY, *stale)
    if missing or stale:
        log.warning("repaired the memory listing", extra={"added": len(missing), "removed": len(stale)})
    return metas


def read_layer(client: redis.Redis, meta: MemoryMeta, storage: np.dtype, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (keys, values) as [num_kv_heads, rows, head_dim] arrays of ``storage`` dtype,
    read with pipelined GETs (chunks in order) into preallocated arrays."""
    H, D = meta.num_kv_heads, meta.head_dim
    row_bytes = H * D * storage.itemsize
    names = [x.decode() for x in client.lrange(chunk_list_key(meta.memory_id, layer), 0, -1)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(chunk_key(meta.memory_id, "k", layer, name))
        pipe.get(chunk_key(meta.memory_id, "v", layer, name))
    blobs = pipe.execute()
    N = meta.rows[layer]
    keys = np.empty((H, N, D), storage)
    values = np.empty((H, N, D), storage)
    off = 0
    for i in range(0, len(blobs), 2):
        kb, vb = blobs[i], blobs[i + 1]
        blobs[i] = blobs[i + 1] = None  # free each chunk once copied
        if kb is None or vb is None or len(kb) != len(vb) or len(kb) % row_bytes:
            raise RuntimeError(f"memory {meta.memory_id!r} layer {layer}: a chunk is missing or damaged")
        n = len(kb) // row_bytes
        if off + n > N:
            break
        keys[:, off : off + n] = np.frombuffer(kb, storage).reshape(H, n, D)
        values[:, off : off + n] = np.frombuffer(vb, storage).reshape(H, n, D)
        off += n
    if off != N:
        raise RuntimeError(f"memory {meta.memory_id!r} layer {layer}: chunks hold {off}+ rows, meta says {N}")
    return keys, values


def read_layers(
    client: redis.Redis, meta: MemoryMeta, storage: np.dtype, layers=None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """-> {layer: (keys, values)} (see ``read_layer``)."""
    layers = range(meta.num_layers) if layers is None else layers
    return {layer: read_layer(client, meta, storage, layer) for layer in layers}


def _found(memory_id: str, h: dict) -> MemoryMeta:
    """The memory of meta hash ``h`` (as read from Redis); NotFound when it is empty."""
    if not h:
        raise NotFound(f"memory {memory_id!r} does not exist; ListMemories shows the stored ones")
    return MemoryMeta.from_hash(h)
