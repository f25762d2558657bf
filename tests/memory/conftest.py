"""Fixtures shared by the memory tests."""

from __future__ import annotations

import pytest

from services.memory.kv_index import KVIndex
from services.memory.kv_memories import KVMemories
from services.memory.kv_store import KVStore


@pytest.fixture
async def kv(redis_server):
    """The memory service's engine (KVMemories) on a real Redis, without a server."""
    store = KVStore(redis_server.url)
    index = KVIndex(store)
    yield KVMemories(store, index, max_answer_bytes=64 * 1024 * 1024)
    index.close()
    await store.close()
