"""A failed append stream's clean-up and the memory deleted and created again under the same id
meanwhile (the generator's Memorize deletes a half-built memory and its caller retries at once;
the retry's append waits for that clean-up, kv_append.WriterSlots): the old stream's rows in
flight and its rollback leave the new memory alone. Real Redis, no gRPC."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from extmind.errors import InvalidArgument
from extmind.tensor import FLOAT16
from services.memory import limits
from services.memory.kv_layout import BUILDING, READY, Layout
from tests.memory import helpers as h

LAYOUT = Layout(2, 2, 8, FLOAT16)


def _occupy(pool, workers: int = 4) -> threading.Event:
    """Keeps every worker thread of the store's Redis-write pool busy until the event is set: a
    batch handed to it meanwhile stays in flight."""
    gate = threading.Event()
    for _ in range(workers):
        pool.submit(gate.wait, 30)
    return gate


async def test_the_old_streams_clean_up_leaves_a_memory_created_again_alone(kv, redis_server, monkeypatch):
    monkeypatch.setattr(limits, "FLUSH_BYTES", 1)  # every batch goes out at once: one is in flight
    rng = np.random.default_rng(5)
    K, V = h.random_kv(rng, 2, 2, 6, 8, FLOAT16)
    await kv.create("again", LAYOUT, "fp", token_ids=list(range(6)))
    async with kv.append_stream() as first:  # a first stream stores 3 rows per layer
        await first.target("again")
        for layer in range(2):
            await first.add(layer, K[layer][:, :3], V[layer][:, :3])
        await first.finish()

    gate = _occupy(kv.store.pool)
    failed = asyncio.Event()

    async def second():  # 2 more rows of layer 0 (in flight), then a bad message: it fails
        async with kv.append_stream() as stream:
            await stream.target("again")
            await stream.add(0, K[0][:, 3:5], V[0][:, 3:5])
            failed.set()
            await stream.add(5, K[0][:, 5:], V[0][:, 5:])

    task = asyncio.ensure_future(second())
    await failed.wait()
    await asyncio.sleep(0.05)  # its clean-up waits for the batch in flight
    assert not task.done()

    # Meanwhile the memory is deleted and created again (empty), and a retry opens it.
    await kv.delete("again")
    await kv.create("again", LAYOUT, "fp", token_ids=list(range(6)))
    retry = kv.append_stream()
    opened = asyncio.ensure_future(retry.target("again"))
    await asyncio.sleep(0.05)
    assert not opened.done()  # waits for the failed stream's clean-up
    gate.set()
    with pytest.raises(InvalidArgument, match="out of range"):
        await task
    meta = await opened

    # The new memory is as created: nothing of the old stream's rows, counts or bytes.
    assert (meta.state, meta.rows, meta.bytes) == (BUILDING, [0, 0], 0)
    assert redis_server.client().llen(b"em:{mem:again}:chunks:0") == 0
    async with retry:
        for layer in range(2):
            await retry.add(layer, K[layer], V[layer])
        done = await retry.finish()
    assert (done.rows_per_layer, done.state) == ([6, 6], READY)
    _, slices = await kv.fetch("again", [0])
    got = np.concatenate([s.keys for s in slices], 1)
    assert np.array_equal(got, K[0])
