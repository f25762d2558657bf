"""kv_append.WriterSlots: one append stream per memory; a writer opening a memory whose last
stream failed a moment ago waits for that stream's clean-up instead of being refused (a client
retrying at once, as the generator's Memorize does after a failed window)."""

from __future__ import annotations

import asyncio

import pytest

from extmind.errors import FailedPrecondition
from services.memory.kv_append import WriterSlots


async def test_a_retry_waits_for_the_failed_streams_clean_up():
    slots = WriterSlots()
    await slots.claim("m")
    rolled_back = asyncio.Event()
    order = []

    async def abort():  # a failed stream's clean-up: rolls back, then releases its slot
        await rolled_back.wait()
        order.append("rolled back")
        slots.release("m")

    slots.keep(abort(), "m")
    retry = asyncio.ensure_future(slots.claim("m"))
    await asyncio.sleep(0.01)
    assert not retry.done()  # still rolling back: waits, not FailedPrecondition
    await slots.claim("other")  # other memories do not wait
    rolled_back.set()
    await retry
    order.append("claimed")
    assert order == ["rolled back", "claimed"]
    assert slots.held() == {"m", "other"}


async def test_a_stream_still_writing_is_refused_at_once():
    slots = WriterSlots()
    await slots.claim("m")
    with pytest.raises(FailedPrecondition, match="another AppendMemory stream is writing memory 'm'"):
        await asyncio.wait_for(slots.claim("m"), timeout=1)


async def test_a_clean_up_that_raises_still_lets_the_next_writer_in():
    slots = WriterSlots()
    await slots.claim("m")

    async def abort():
        try:
            raise RuntimeError("redis went away")
        finally:
            slots.release("m")

    task = slots.keep(abort(), "m")
    await slots.claim("m")
    assert task.done() and isinstance(task.exception(), RuntimeError)
    assert slots.held() == {"m"}
