"""The reaper of abandoned BUILDING memories on the engine, without a server: real Redis, a tiny
TTL, sweeps called directly. Two engines on one Redis stand for two memory services."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from extmind.errors import NotFound
from extmind.tensor import FLOAT32
from services.memory.kv_index import KVIndex
from services.memory.kv_layout import BUILDING, READY, Layout
from services.memory.kv_memories import KVMemories
from services.memory.kv_reaper import BuildingReaper
from services.memory.kv_store import KVStore
from tests.memory import helpers as h

TTL = 0.3  # seconds
LAYOUT = Layout(2, 1, 4, FLOAT32)


async def _engine(url):
    store = KVStore(url)
    return KVMemories(store, KVIndex(store), max_answer_bytes=64 * 1024 * 1024)


@pytest.fixture
async def engines(redis_server):
    """Two engines (two services) on the same Redis."""
    made = [await _engine(redis_server.url), await _engine(redis_server.url)]
    yield made
    for kv in made:
        kv.index.close()
        await kv.store.close()


def _keys(redis_server, memory_id):
    return redis_server.client().keys(f"*mem:{memory_id}*")


async def _append(kv, memory_id, K, V, layers):
    async with kv.append_stream() as stream:
        await stream.target(memory_id)
        for layer in layers:
            await stream.add(layer, K[layer], V[layer])
        return await stream.finish()


async def test_idle_building_memories_are_deleted_ready_ones_kept(engines, redis_server):
    kv, _ = engines
    reaper = BuildingReaper(kv, TTL)
    K, V = h.random_kv(np.random.default_rng(0), 2, 1, 5, 4, FLOAT32)
    never = await kv.create("never", LAYOUT, "fp")  # created, never appended
    assert never.state == BUILDING
    await kv.create("half", LAYOUT, "fp", token_ids=list(range(5)))
    assert (await _append(kv, "half", K, V, [0])).state == BUILDING  # one layer of two, then gone
    await kv.create("done", LAYOUT, "fp")
    assert (await _append(kv, "done", K, V, [0, 1])).state == READY
    meta = (await kv.get("half"))[0]
    assert meta.touch_us >= (await kv.get("never"))[0].touch_us > 0

    assert await reaper.sweep() == []  # all fresh
    before = REGISTRY.get_sample_value("extmind_memory_reaped_memories_total")
    await asyncio.sleep(TTL + 0.1)
    assert sorted(await reaper.sweep()) == ["half", "never"]
    assert REGISTRY.get_sample_value("extmind_memory_reaped_memories_total") == before + 2
    for gone in ("never", "half"):
        assert _keys(redis_server, gone) == []
        with pytest.raises(NotFound):
            await kv.get(gone)
    # READY memories are never touched, however old.
    listed, _ = await kv.list()
    assert [m.memory_id for m in listed] == ["done"]
    hits = await kv.search(["done"], 1, np.ones((1, 1, 4), np.float32), 2)
    assert hits.indices.shape == (1, 1, 2)
    assert await reaper.sweep() == []


async def test_a_stream_open_here_keeps_its_memory_and_tells_other_services(engines, redis_server):
    here, other = engines
    K, V = h.random_kv(np.random.default_rng(1), 2, 1, 6, 4, FLOAT32)
    await here.create("slow", LAYOUT, "fp", token_ids=list(range(6)))
    created = (await here.get("slow"))[0].touch_us
    async with here.append_stream() as stream:
        await stream.target("slow")
        for rows in ((0, 2), (2, 4), (4, 6)):  # slow appending: idle longer than the TTL between batches
            await asyncio.sleep(TTL + 0.1)
            assert await BuildingReaper(here, TTL).sweep() == []  # held by a stream of this service
            assert await BuildingReaper(other, TTL).sweep() == []  # here's sweep touched it just now
            await stream.add(0, K[0][:, rows[0] : rows[1]], V[0][:, rows[0] : rows[1]])
        assert (await here.get("slow"))[0].touch_us > created
        await asyncio.sleep(TTL + 0.1)
        assert await BuildingReaper(here, TTL).sweep() == []  # idle and open: still kept
        await stream.add(1, K[1], V[1])
        done = await stream.finish()
    assert done.state == READY and done.rows_per_layer == [6, 6]
    await asyncio.sleep(TTL + 0.1)
    assert await BuildingReaper(other, TTL).sweep() == []  # READY now
    assert (await here.get("slow"))[0].state == READY


async def test_an_append_after_the_reap_fails_and_stores_nothing(engines, redis_server):
    """A stream of another service (whose sweep never ran, so nobody refreshed the memory) went
    quiet past the TTL; after the reap its rows are refused and nothing of the memory comes back."""
    writer, reaper_side = engines
    K, V = h.random_kv(np.random.default_rng(2), 2, 1, 5, 4, FLOAT32)
    await writer.create("late", LAYOUT, "fp", token_ids=list(range(5)))
    await _append(writer, "late", K, V, [0])  # some rows stored
    with pytest.raises(NotFound, match="deleted"):
        async with writer.append_stream() as stream:
            await stream.target("late")
            await stream.add(1, K[1][:, :2], V[1][:, :2])  # queued, not yet sent
            await asyncio.sleep(TTL + 0.1)
            assert await BuildingReaper(reaper_side, TTL).sweep() == ["late"]
            await stream.add(1, K[1][:, 2:], V[1][:, 2:])
            await stream.finish()
    assert _keys(redis_server, "late") == []
    # A new stream on the reaped memory: NOT_FOUND at once, nothing stored.
    with pytest.raises(NotFound):
        await _append(writer, "late", K, V, [0])
    assert _keys(redis_server, "late") == []
    assert (await writer.list())[0] == []


async def test_the_reap_rechecks_in_redis(engines, redis_server):
    """A memory listed as idle but written since (or turned READY) is kept: the idleness is
    checked again in the script that deletes."""
    kv, _ = engines
    K, V = h.random_kv(np.random.default_rng(3), 2, 1, 3, 4, FLOAT32)
    await kv.create("busy", LAYOUT, "fp")
    await kv.create("finished", LAYOUT, "fp")
    await asyncio.sleep(TTL + 0.1)
    idle = {m for m, _, _ in await kv.store.idle_building(int(TTL * 1e6))}
    assert idle == {"busy", "finished"}
    await _append(kv, "busy", K, V, [0])  # touched now, still BUILDING
    await _append(kv, "finished", K, V, [0, 1])  # READY
    assert not await kv.reap("busy", int(TTL * 1e6))
    assert not await kv.reap("finished", int(TTL * 1e6))
    assert (await kv.get("busy"))[0].state == BUILDING and (await kv.get("finished"))[0].state == READY
    assert _keys(redis_server, "busy")


async def test_reaper_task_runs_and_stops(engines, redis_server):
    kv, _ = engines
    reaper = BuildingReaper(kv, TTL)
    assert reaper.interval == pytest.approx(TTL / 4)
    assert BuildingReaper(kv, 600).interval == 60
    with pytest.raises(ValueError):
        BuildingReaper(kv, 0)
    await kv.create("bg", LAYOUT, "fp")
    reaper.task.start()
    assert reaper.task.running
    try:
        for _ in range(50):
            await asyncio.sleep(0.05)
            if not _keys(redis_server, "bg"):
                break
        assert _keys(redis_server, "bg") == []
    finally:
        await reaper.task.stop()
    assert not reaper.task.running
