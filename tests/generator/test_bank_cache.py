"""BankCache.contains: the lookup a request makes off the MLX thread right after resolving its
memories (services/generator/engine.py ``_resolve``)."""

import threading

import numpy as np
from prometheus_client import REGISTRY

from services.generator.bank_cache import BankCache, bank_from_numpy


def _bank(memory_id: str, version: str, rows: int = 8):
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((2, rows, 4)).astype(np.float32)]
    return bank_from_numpy(memory_id, version, keys, [k.copy() for k in keys])


def _count(name: str) -> float:
    return REGISTRY.get_sample_value(f"extmind_generator_bank_cache_{name}_total") or 0.0


def test_contains_answers_for_the_version_and_leaves_eviction_to_get():
    cache = BankCache(1 << 20)
    cache.put(_bank("m", "v1"))
    hits, misses = _count("hits"), _count("misses")
    assert cache.contains("m", "v1")
    assert not cache.contains("m", "v2")  # deleted and created again: not the cached rows
    assert not cache.contains("other", "v1")
    assert (_count("hits") - hits, _count("misses") - misses) == (1, 2)
    assert len(cache) == 1  # a stale version stays until the MLX thread looks it up
    assert cache.get("m", "v2", lookup=False) is None and len(cache) == 0 and cache.nbytes == 0


def test_contains_from_another_thread_while_banks_come_and_go():
    """Lookups on a worker thread while the owner puts and evicts (an LRU of two banks): every
    answer is True or False for a bank that was or was not there, never an error."""
    size = _bank("x", "1").nbytes
    cache = BankCache(2 * size)
    stop = threading.Event()
    errors = []

    def look():
        while not stop.is_set():
            try:
                for i in range(4):
                    cache.contains(f"m{i}", "1")
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

    t = threading.Thread(target=look)
    t.start()
    try:
        for n in range(300):
            cache.put(_bank(f"m{n % 4}", "1"))
            if n % 7 == 0:
                cache.evict(f"m{(n + 1) % 4}")
    finally:
        stop.set()
        t.join()
    assert not errors
    assert len(cache) <= 2 and cache.nbytes == sum(b.nbytes for b in cache._entries.values())
