"""The KV memories engine without a server: real Redis, no gRPC. create -> append -> finish ->
search -> fetch -> delete, and a failed append stream that leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from extmind.errors import InvalidArgument, NotFound
from extmind.tensor import FLOAT16
from services.memory.kv_layout import BUILDING, READY, Layout
from tests.memory import helpers as h


async def test_create_append_finish_search_delete(kv, redis_server):
    rng = np.random.default_rng(3)
    K, V = h.random_kv(rng, 2, 2, 9, 8, FLOAT16)  # [layers, heads, rows, dim]
    meta = await kv.create("eng-1", Layout(2, 2, 8, FLOAT16), "fp-engine", labels={"k": "v"})
    assert (meta.memory_id, meta.state, meta.rows, meta.expected) == ("eng-1", BUILDING, [0, 0], -1)

    async with kv.append_stream() as stream:
        for layer in range(2):
            for lo, hi in ((0, 4), (4, 9)):  # two batches per layer; later messages may omit the id
                got = await stream.target("eng-1" if layer == lo == 0 else "")
                assert got.memory_id == "eng-1"
                await stream.add(layer, K[layer][:, lo:hi], V[layer][:, lo:hi])
        done = await stream.finish()  # no token ids: READY because every layer holds 9 rows
    assert (done.memory_id, done.rows_per_layer, done.state) == ("eng-1", [9, 9], READY)
    assert done.bytes_stored == K.nbytes + V.nbytes

    meta, tokens, positions = await kv.get("eng-1", include_tokens=True)
    assert meta.state == READY and meta.num_tokens == 9 and meta.labels == {"k": "v"}
    assert tokens.size == 0 and positions.size == 0
    listed, next_page = await kv.list()
    assert [m.memory_id for m in listed] == ["eng-1"] and next_page == ""

    Q = rng.standard_normal((4, 3, 8)).astype(np.float32)  # 4 query heads over 2 KV heads
    hits = await kv.search(["eng-1"], 1, Q, 4, return_vectors=True)
    ref = h.cosine_reference(Q, [h.as_float32(K[1], FLOAT16)])
    live = h.check_search(hits.scores, hits.indices, ref, 4)
    assert live.all() and hits.dtype == FLOAT16
    for head in range(4):  # returned keys are the rows the indices name, of the KV head searched
        assert np.array_equal(hits.keys[head], K[1][head // 2][hits.indices[head]])
        assert np.array_equal(hits.values[head], V[1][head // 2][hits.indices[head]])

    meta, slices = await kv.fetch("eng-1", [1], chunk_bytes=2 * 2 * 8 * 2 * 4)  # 4 rows per slice
    slices = list(slices)
    assert [(s.layer, s.row_offset) for s in slices] == [(1, 0), (1, 4), (1, 8)]
    assert np.array_equal(np.concatenate([s.keys for s in slices], 1), K[1])
    assert np.array_equal(np.concatenate([s.values for s in slices], 1), V[1])

    with pytest.raises(InvalidArgument, match="top_k"):
        await kv.search(["eng-1"], 0, Q, kv.max_top_k + 1)

    await kv.delete("eng-1")
    for call in (kv.get("eng-1"), kv.search(["eng-1"], 0, Q, 1), kv.delete("eng-1")):
        with pytest.raises(NotFound):
            await call
    assert redis_server.client().keys("*mem:eng-1*") == []


async def test_failed_stream_changes_nothing(kv):
    rng = np.random.default_rng(4)
    K, V = h.random_kv(rng, 2, 2, 6, 8, FLOAT16)
    await kv.create("eng-2", Layout(2, 2, 8, FLOAT16), "fp-engine", token_ids=list(range(6)))
    with pytest.raises(InvalidArgument, match="out of range"):
        async with kv.append_stream() as stream:
            await stream.target("eng-2")
            await stream.add(0, K[0], V[0])
            await stream.add(5, K[1], V[1])  # no layer 5: the stream fails after layer 0 was queued
    meta, _, _ = await kv.get("eng-2")
    assert meta.state == BUILDING and meta.rows == [0, 0] and meta.bytes == 0
    async with kv.append_stream() as stream:  # the memory is free for the next stream
        await stream.target("eng-2")
        for layer in range(2):
            await stream.add(layer, K[layer], V[layer])
        assert (await stream.finish()).state == READY


async def test_a_stream_failing_before_any_of_its_rows_landed_rolls_back_cleanly(kv, caplog):
    """Rows queued, none sent yet (a batch goes to Redis at limits.FLUSH_BYTES): the rollback frees
    nothing, and must still answer (its script passed -0 to HINCRBY, which Redis refuses, and the
    stream logged that its rows could not be rolled back)."""
    K, V = h.random_kv(np.random.default_rng(6), 2, 2, 4, 8, FLOAT16)
    await kv.create("eng-3", Layout(2, 2, 8, FLOAT16), "fp-engine", token_ids=list(range(4)))
    with caplog.at_level("INFO", logger="extmind.memory"), pytest.raises(InvalidArgument, match="out of range"):
        async with kv.append_stream() as stream:
            await stream.target("eng-3")
            await stream.add(0, K[0], V[0])
            await stream.add(2, K[1], V[1])
    assert "could not be rolled back" not in caplog.text
    assert "rolled back this stream's rows" in caplog.text
    meta, _, _ = await kv.get("eng-3")
    assert await kv.store.rollback("eng-3", meta.create_us, "no-such-stream", {0: 0, 1: 0}) is True
    meta, _, _ = await kv.get("eng-3")
    assert meta.state == BUILDING and meta.rows == [0, 0] and meta.bytes == 0


async def test_a_missing_memory_does_not_keep_its_writer_slot(kv):
    """A stream that names a memory that does not exist fails NotFound and holds nothing: the id
    can be created and written right after (it used to stay 'being written' until a restart)."""
    K, V = h.random_kv(np.random.default_rng(5), 1, 2, 3, 8, FLOAT16)
    with pytest.raises(NotFound):
        async with kv.append_stream() as stream:
            await stream.target("later")
    await kv.create("later", Layout(1, 2, 8, FLOAT16), "fp-engine")
    async with kv.append_stream() as stream:
        await stream.target("later")
        await stream.add(0, K[0], V[0])
        assert (await stream.finish()).state == READY


async def test_a_stream_cancelled_while_its_last_batch_is_written_is_rolled_back(kv):
    """Cancelled (client gone, deadline) while the final batch is being written by the executor:
    the rollback waits for that write, so no row of the stream stays behind and the rows can be
    sent again."""
    import asyncio

    K, V = h.random_kv(np.random.default_rng(6), 2, 2, 400, 64, FLOAT16)
    await kv.create("cut", Layout(2, 2, 64, FLOAT16), "fp-engine", token_ids=list(range(400)))
    for delay in (0, 0.001, 0.005):  # the cancel lands at different points of the write
        started = asyncio.Event()

        async def send(started=started):
            async with kv.append_stream() as stream:
                await stream.target("cut")
                for layer in range(2):
                    await stream.add(layer, K[layer], V[layer])
                started.set()
                await stream.finish()

        task = asyncio.ensure_future(send())
        await started.wait()
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # the shielded clean-up finishes
        meta, _, _ = await kv.get("cut")
        if meta.state == READY:  # the write won the race before the cancel: nothing to roll back
            break
        assert meta.state == BUILDING and meta.rows == [0, 0], (delay, meta.rows)
    if meta.state != READY:  # the same rows go in again
        async with kv.append_stream() as stream:
            await stream.target("cut")
            for layer in range(2):
                await stream.add(layer, K[layer], V[layer])
            assert (await stream.finish()).state == READY


async def test_a_memory_loads_from_the_stream_that_wrote_all_its_rows_else_from_redis(kv, caplog):
    """A READY memory loads into RAM from the rows its one append stream stored (no read back
    from Redis; the caller's arrays are copied, so changing them later changes nothing); a memory
    whose rows came from two streams loads from Redis. Either way RAM holds exactly the rows."""
    import asyncio
    import logging

    caplog.set_level(logging.INFO, logger="extmind.memory.index")
    K, V = h.random_kv(np.random.default_rng(7), 2, 2, 10, 8, FLOAT16)
    layout = Layout(2, 2, 8, FLOAT16)

    async def loaded(memory_id):
        for _ in range(200):
            if memory_id in kv.index.loaded:
                return kv.index.loaded[memory_id]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{memory_id} was not loaded")

    def source(memory_id):
        return [r.source for r in caplog.records if r.getMessage() == "memory loaded" and r.memory_id == memory_id]

    await kv.create("one-stream", layout, "fp-engine", token_ids=list(range(10)))
    sent = K.copy(), V.copy()
    async with kv.append_stream() as stream:
        await stream.target("one-stream")
        for layer in range(2):
            for lo, hi in ((0, 3), (3, 10)):
                await stream.add(layer, sent[0][layer][:, lo:hi], sent[1][layer][:, lo:hi])
        assert (await stream.finish()).state == READY
    sent[0][:] = 0  # the caller reuses its buffers
    sent[1][:] = 0
    mem = await loaded("one-stream")
    assert source("one-stream") == ["append stream"]
    for layer in range(2):
        assert np.array_equal(mem.keys[layer], K[layer]) and np.array_equal(mem.values[layer], V[layer])

    await kv.create("two-streams", layout, "fp-engine", token_ids=list(range(10)))
    for lo, hi in ((0, 4), (4, 10)):
        async with kv.append_stream() as stream:
            await stream.target("two-streams")
            for layer in range(2):
                await stream.add(layer, K[layer][:, lo:hi], V[layer][:, lo:hi])
            done = await stream.finish()
    assert done.state == READY
    mem = await loaded("two-streams")
    assert source("two-streams") == ["redis"]
    for layer in range(2):
        assert np.array_equal(mem.keys[layer], K[layer]) and np.array_equal(mem.values[layer], V[layer])
    meta, slices = await kv.fetch("two-streams", [1])
    assert np.array_equal(np.concatenate([s.keys for s in slices], 1), K[1])


def test_a_load_hands_over_the_rows_before_it_builds_the_indexes(kv):
    """FetchMemory waits only for the rows: ``load`` passes them to ``on_rows`` before any
    index exists, then returns the memory with its indexes."""
    from services.memory.kv_layout import MemoryMeta
    from services.memory.kv_search import LoadedMemory, MemoryRows

    K, V = h.random_kv(np.random.default_rng(8), 2, 2, 6, 8, FLOAT16)
    meta = MemoryMeta("m", 2, 2, 8, FLOAT16, "fp", 6, READY, K.nbytes + V.nbytes, {}, 1, rows=[6, 6], chunks=[2, 2])
    handed = []
    appended = [[(K[x][:, :2], V[x][:, :2]), (K[x][:, 2:], V[x][:, 2:])] for x in range(2)]
    mem = kv.index.load(meta, appended, on_rows=lambda rows: handed.append((type(rows), rows.keys, rows.values)))
    assert len(handed) == 1 and handed[0][0] is MemoryRows
    assert isinstance(mem, LoadedMemory) and len(mem.indexes) == 2 and mem.rows == 6
    for layer in range(2):
        assert np.array_equal(handed[0][1][layer], K[layer]) and np.array_equal(handed[0][2][layer], V[layer])
        assert np.array_equal(mem.keys[layer], K[layer])


def test_a_load_builds_its_indexes_after_the_fetches_of_its_rows(kv, monkeypatch):
    """While a FetchMemory stream sends a memory's rows, a load of that memory has handed its
    rows over and waits to build the indexes (the fetch gets the CPU); at most
    FETCH_YIELD_SECONDS."""
    import threading
    import time

    from services.memory import kv_index
    from services.memory.kv_layout import MemoryMeta

    K, V = h.random_kv(np.random.default_rng(9), 2, 2, 6, 8, FLOAT16)
    meta = MemoryMeta("m", 2, 2, 8, FLOAT16, "fp", 6, READY, K.nbytes + V.nbytes, {}, 1, rows=[6, 6], chunks=[1, 1])
    appended = [[(K[x], V[x])] for x in range(2)]
    rows, loaded = [], []
    with kv.index.fetching("m"), kv.index.fetching("m"):  # two streams of it
        job = threading.Thread(target=lambda: loaded.append(kv.index.load(meta, appended, on_rows=rows.append)))
        job.start()
        for _ in range(500):
            if rows:
                break
            time.sleep(0.01)
        assert rows and np.array_equal(rows[0].keys[1], K[1])
        time.sleep(0.2)
        assert not loaded  # both streams still send
    job.join(10)
    assert loaded and len(loaded[0].indexes) == 2

    monkeypatch.setattr(kv_index, "FETCH_YIELD_SECONDS", 0.2)
    with kv.index.fetching("m"):  # a stream that never ends delays the indexes only so long
        t0 = time.monotonic()
        assert len(kv.index.load(meta, appended).indexes) == 2
        assert 0.15 < time.monotonic() - t0 < 5  # waited 0.2 s in all, then built


async def test_a_memory_created_again_while_its_meta_is_read_is_not_loaded_with_the_old_meta(kv):
    """A search starts loading a READY memory that is not in RAM; while its meta is read, the
    memory is deleted, created again and partly written. The load must not read the new
    memory's rows under the old meta (same rows per layer: the read succeeds) and keep that in
    RAM: the new memory would then be served while BUILDING, and never loaded once READY."""
    import asyncio

    from extmind.errors import FailedPrecondition

    K, V = h.random_kv(np.random.default_rng(8), 1, 2, 6, 8, FLOAT16)
    layout = Layout(1, 2, 8, FLOAT16)

    async def write(memory_id, lo, hi):
        async with kv.append_stream() as stream:
            await stream.target(memory_id)
            await stream.add(0, K[0][:, lo:hi], V[0][:, lo:hi])
            return await stream.finish()

    await kv.create("again", layout, "fp-engine")
    assert (await write("again", 0, 3)).state == READY  # 3 rows, READY without token ids
    for _ in range(200):
        if "again" in kv.index.loaded:
            break
        await asyncio.sleep(0.01)
    kv.index.drop("again")  # out of RAM, as a memory made READY by another process is
    plain_get, injected = kv.store.get, []

    async def get_then_recreate(memory_id):
        meta = await plain_get(memory_id)
        if not injected:
            injected.append(meta)
            await kv.delete("again")
            await kv.create("again", layout, "fp-engine", token_ids=list(range(6)))
            assert (await write("again", 0, 3)).state == BUILDING  # 3 of 6 rows: as many as before
        return meta

    kv.store.get = get_then_recreate
    Q = np.ones((2, 1, 8), np.float32)
    with pytest.raises(FailedPrecondition, match="BUILDING"):
        await kv.search(["again"], 0, Q, 2)
    assert injected and "again" not in kv.index.loaded
    kv.store.get = plain_get
    assert (await write("again", 3, 6)).state == READY
    meta, slices = await kv.fetch("again")
    rows = np.concatenate([s.keys for s in slices], axis=1)
    assert meta.num_tokens == 6 and np.array_equal(rows, K[0])


async def test_a_memory_created_again_while_its_rows_are_read_is_not_served(kv, monkeypatch):
    """The same, a moment later: the memory is created again while the load reads its rows from
    Redis (here: its meta gets another create_us mid-read). The load fails FAILED_PRECONDITION
    instead of answering with rows that may be the new memory's under the old meta."""
    import asyncio

    from extmind.errors import FailedPrecondition
    from services.memory import kv_store
    from services.memory.kv_layout import meta_key

    K, V = h.random_kv(np.random.default_rng(9), 1, 2, 4, 8, FLOAT16)
    await kv.create("reread", Layout(1, 2, 8, FLOAT16), "fp-engine", token_ids=list(range(4)))
    async with kv.append_stream() as stream:
        await stream.target("reread")
        await stream.add(0, K[0], V[0])
        assert (await stream.finish()).state == READY
    while "reread" not in kv.index.loaded:
        await asyncio.sleep(0.01)
    kv.index.drop("reread")
    plain = kv_store.read_layer

    def read_then_recreate(client, meta, storage, layer):
        out = plain(client, meta, storage, layer)
        client.hset(meta_key(meta.memory_id), "create_us", meta.create_us + 1)
        return out

    monkeypatch.setattr(kv_store, "read_layer", read_then_recreate)
    with pytest.raises(FailedPrecondition, match="deleted while it loaded"):
        await kv.search(["reread"], 0, np.ones((2, 1, 8), np.float32), 2)
    assert "reread" not in kv.index.loaded
    monkeypatch.setattr(kv_store, "read_layer", plain)
    assert (await kv.search(["reread"], 0, np.ones((2, 1, 8), np.float32), 2)).indices.shape == (2, 1, 2)


async def test_a_memory_deleted_while_its_rows_are_read_is_failed_precondition_not_internal(kv, monkeypatch):
    """A delete that lands between a load's listing of a layer's chunks and its reads of them (a
    search racing ``DeleteMemory``) leaves the load with chunks gone: that is the memory deleted
    while it loaded (FAILED_PRECONDITION), not a damaged memory (INTERNAL). A chunk missing from a
    memory that is still there stays an error of its own."""
    import asyncio

    from extmind.errors import FailedPrecondition
    from services.memory import kv_store
    from services.memory.kv_layout import chunk_key, chunk_list_key, meta_key

    K, V = h.random_kv(np.random.default_rng(10), 1, 2, 4, 8, FLOAT16)
    Q = np.ones((2, 1, 8), np.float32)
    for mid in ("gone", "damaged"):
        await kv.create(mid, Layout(1, 2, 8, FLOAT16), "fp-engine", token_ids=list(range(4)))
        async with kv.append_stream() as stream:
            await stream.target(mid)
            await stream.add(0, K[0], V[0])
            assert (await stream.finish()).state == READY
        while mid not in kv.index.loaded:
            await asyncio.sleep(0.01)
        kv.index.drop(mid)
    plain = kv_store.read_layer

    def chunks_gone_then_read(client, meta, storage, layer):
        names = [x.decode() for x in client.lrange(chunk_list_key(meta.memory_id, layer), 0, -1)]
        client.delete(*[chunk_key(meta.memory_id, kind, layer, n) for n in names for kind in "kv"])
        if meta.memory_id == "gone":  # deleted meanwhile: its meta goes too
            client.delete(meta_key(meta.memory_id))
        return plain(client, meta, storage, layer)

    monkeypatch.setattr(kv_store, "read_layer", chunks_gone_then_read)
    with pytest.raises(FailedPrecondition, match="deleted while it loaded"):
        await kv.search(["gone"], 0, Q, 2)
    with pytest.raises(RuntimeError, match="a chunk is missing or damaged"):
        await kv.search(["damaged"], 0, Q, 2)
    assert "gone" not in kv.index.loaded and "damaged" not in kv.index.loaded


async def test_a_memory_and_its_tokens_are_read_as_one_snapshot(kv, monkeypatch):
    """GetMemory with include_tokens (a generator resolving memories for citations) while another
    client deletes the memory: the answer is the memory with its tokens or NOT_FOUND, never its
    meta with no tokens (citations of empty text) or with the tokens of a memory created again.
    Here the delete lands right after the meta is read, where the two reads used to be split."""
    await kv.create("snap", Layout(1, 2, 8, FLOAT16), "fp-engine", token_ids=[5, 6, 7, 8])
    plain = kv.store.r.hgetall

    async def hgetall_then_delete(name):
        h = await plain(name)
        await kv.store.delete("snap")
        return h

    monkeypatch.setattr(kv.store.r, "hgetall", hgetall_then_delete)
    try:
        meta, tokens, positions = await kv.get("snap", include_tokens=True)
    except NotFound:
        return
    assert list(tokens) == [5, 6, 7, 8] and meta.memory_id == "snap"
