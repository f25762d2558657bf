"""BankCache.contains: the lookup a request makes off the MLX thread right after resolving its
memories (services/generator/memory_lookup.py ``MemoryLookup._resolve``); through the engine, the LRU's order."""

import threading

import numpy as np
from prometheus_client import REGISTRY

from services.generator.bank_cache import BankCache, bank_from_numpy
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run


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


async def test_a_request_joining_its_banks_live_group_keeps_the_bank_recent(engine, client, monkeypatch):
    """The bank cache is an LRU: a bank that requests keep using stays, one not used since goes
    first. A request that joins the running group of its memory (no new retriever is made) uses
    the bank as much as the one that made the group."""
    text = engine.tokenizer.encode("Bob likes trains and Alice likes boats.")
    a, b, c = (engine.memorize_blocking(text, memory_id=f"lru-{n}")["memory_id"] for n in "abc")
    prompt = engine.tokenizer.encode("Alice met")

    def req(mid, n):
        return GenerationRequest(prompt, Sampling(max_tokens=n), MemoryOptions((mid,), top_k=2))

    try:
        big = BankCache(1 << 30)
        for owner in (engine, engine.lookups):  # the engine's and its memory lookups' one cache
            monkeypatch.setattr(owner, "bank_cache", big)
        await run(engine, req(a, 1))
        size = engine.bank_cache.nbytes
        cache = BankCache(size * 5 // 2)  # room for two of the three banks
        for owner in (engine, engine.lookups):
            monkeypatch.setattr(owner, "bank_cache", cache)

        long_a = engine.generate(req(a, 3000))
        await anext(long_a)  # its group runs, over bank a
        await run(engine, req(b, 1))  # bank b, used after a
        admit, seen = engine._scheduler.admit, []

        def admitted(*args):  # on the MLX thread: the groups right after the admission
            admit(*args)
            seen.append(engine._scheduler.stats())

        monkeypatch.setattr(engine._scheduler, "admit", admitted)
        await run(engine, req(a, 1))  # uses bank a: now a is the most recently used
        assert seen == [dict(active=2, groups=1)]  # it joined the running group of a
        await long_a.aclose()

        await run(engine, req(c, 1))  # a third bank: the least recently used one goes
        versions = [(m.memory_id, m.version) for m in engine.resolver.resolve((a, b, c))]
        kept = engine.mlx.call(lambda: [m for m, v in versions if cache.get(m, v, lookup=False)])
        assert kept == [a, c]
    finally:
        for m in (a, b, c):
            client.delete_memory(m)


def test_a_banks_prefill_keys_are_kept_in_free_room_only_and_go_before_any_bank():
    """Bank.prefill_keys: the unit keys and row-major keys of a prefill's top-k
    (prefill_top_k.prefill_keys), kept after the first call per layer where the cache has the room
    free, counted there; never by evicting a bank; dropped first when a bank needs the room."""
    import mlx.core as mx

    a, b, c = (_bank(m, "1", rows=64) for m in "abc")
    base = a.nbytes
    cache = BankCache(3 * base)  # three banks, or two and one bank's prefill keys
    cache.put(a)
    cache.put(b)
    unit, rows_major = a.prefill_keys(0)
    assert a.prefill_keys(0)[0] is unit and a.prefill_keys(0)[1] is rows_major  # kept
    keys_t, inv = a.keys[0], a.inv_norms[0]
    np.testing.assert_array_equal(np.array(rows_major), np.array(keys_t).swapaxes(1, 2))
    np.testing.assert_allclose(np.array(unit), np.array(keys_t) * np.array(inv)[:, None, :], rtol=1e-6)
    grown = unit.nbytes + rows_major.nbytes
    assert 0 < grown < base  # the test's bound leaves room for one bank's keys, not two
    assert a.nbytes == base + grown and cache.nbytes == 2 * base + grown
    b_keys = b.prefill_keys(0)  # no room left: made for the caller, not kept, nothing evicted
    assert not b.prefill and b.prefill_keys(0)[0] is not b_keys[0]
    assert cache.nbytes == 2 * base + grown and len(cache) == 2
    cache.put(c)  # a third bank: a's prefill keys go, no bank does
    assert not a.prefill and a.nbytes == base and cache.nbytes == 3 * base and len(cache) == 3
    cache.evict("a")
    a.prefill_keys(0)  # a bank no longer cached keeps none (nothing would count them)
    assert not a.prefill and cache.nbytes == 2 * base
    assert mx.array_equal(a.prefill_keys(0)[1], rows_major)


def test_only_a_cached_bank_keeps_prefill_keys():
    """Kept prefill keys are counted in the cache's bound, so only a bank the cache holds keeps
    them: a bank too large for it (returned, not cached), an evicted one and a retriever of several
    banks make them per forward (the same values each time)."""
    from services.generator.bank_cache import LocalRetriever

    a, b = _bank("a", "1", rows=8), _bank("b", "1", rows=5)
    r = LocalRetriever([a, b])
    unit, rows_major = r.prefill_keys(0)
    assert r.prefill_keys(0)[0] is not unit and not a.prefill and not b.prefill  # several banks: per forward
    want = np.concatenate([np.array(a.keys[0]), np.array(b.keys[0])], axis=2).swapaxes(1, 2)
    np.testing.assert_array_equal(np.array(rows_major), want)
    assert unit.shape == (2, 4, 13)

    big = _bank("big", "1", rows=64)
    a.prefill_keys(0)  # outside any cache (tests, benches): kept, no bound
    assert a.prefill
    cache = BankCache(big.nbytes - 1)
    cache.put(big)  # too large: returned to its request, not cached
    big.prefill_keys(0)
    assert not big.prefill and cache.nbytes == 0
    cache.put(a)  # put drops what it kept before, then counts what it keeps
    assert not a.prefill and cache.nbytes == a.nbytes
    a.prefill_keys(0)
    assert a.prefill and cache.nbytes == a.nbytes
    cache.evict("a")  # evicted: its kept keys go with it
    assert not a.prefill and cache.nbytes == 0
    a.prefill_keys(0)
    assert not a.prefill
