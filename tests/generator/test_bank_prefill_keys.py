"""The prefill keys a cached bank keeps (bank_cache.Bank.prefill_keys): what the cache counts for
them must be what a prefill actually reads, and keeping them must never cost a bank its place in
the cache (a breaker's cases against the first form, which kept them by evicting banks, the bank
itself included, and made them for prefills that never read them)."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load

from extmind.tiny_models import build_llama
from services.generator import decode_kernels, fused_attention, prefill_attention, prefill_merge_kernels, prefill_top_k
from services.generator.bank_cache import BankCache, LocalRetriever, bank_from_numpy
from services.generator.extended_attention import MemoryContext, install

from . import cuda_emulator


def _bank(memory_id: str, rows: int, layers: int = 2, d: int = 16, dtype=np.float16):
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((2, rows, d)).astype(dtype) for _ in range(layers)]
    return bank_from_numpy(memory_id, "1", keys, [k.copy() for k in keys])


def test_a_bank_that_fits_the_bound_stays_cached_after_its_first_prefill():
    """A bank of 2/3 of the bound stays a hit for every later request: its prefill keys, which do
    not fit beside it, are not kept (the first form grew the bank past the bound and evicted it,
    so every prompt over the memory fetched it again over gRPC to save two launches per layer)."""
    a = _bank("a", rows=64)
    cache = BankCache(a.nbytes * 3 // 2)
    for _ in range(2):  # two requests over memory "a", each with a prefill
        bank = cache.get("a", "1", lookup=False)
        if bank is None:  # a miss: fetched again (memory_lookup.MemoryLookup.context)
            bank = _bank("a", rows=64)
            cache.put(bank)
        retriever = LocalRetriever([bank])
        for layer in range(len(bank.keys)):  # the forward's layers (extended_attention._fused)
            retriever.prefill_keys(layer)
    assert cache.get("a", "1", lookup=False) is not None, "the bank's own prefill keys evicted it"


def test_a_prefill_whose_keys_cannot_fit_does_not_empty_the_cache():
    """A prefill over the larger of two cached banks whose keys do not fit evicts neither (the
    first form, layer by layer, evicted the other bank, then the bank itself: the cache ended
    empty)."""
    small = _bank("small", rows=16)
    big = _bank("big", rows=64)
    cache = BankCache((small.nbytes + big.nbytes) * 5 // 4)  # both fit, with room to spare
    cache.put(small)
    cache.put(big)
    retriever = LocalRetriever([big])
    for layer in range(len(big.keys)):
        retriever.prefill_keys(layer)
    kept = [m for m in ("small", "big") if cache.get(m, "1", lookup=False) is not None]
    assert kept, "one prefill over the big bank emptied the cache"


needs_emulator = pytest.mark.skipif(
    cuda_emulator.CXX is None or sys.platform != "linux", reason="the emulator needs a C++ compiler and glibc ucontext"
)


def _fused_prefill(tmp_path, monkeypatch, matmul_rows: int):
    """One fused prefill of 32 tokens through a tiny llama layer on the CUDA emulator (1 x 8 heads x
    32 tokens = 256 query rows; ``fused_attention.MATMUL_ROWS`` set to ``matmul_rows``) over a
    cached bank -> (the bank, the cache, its bytes before, whether the scan kernels took the top-k)."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    monkeypatch.setattr(fused_attention, "enabled", lambda mode="auto": True)
    monkeypatch.setattr(mx, "device_info", lambda: {"compute_capability_major": 9, "compute_capability_minor": 0})
    monkeypatch.setattr(fused_attention, "MATMUL_ROWS", matmul_rows)
    made_kernels = (
        decode_kernels.topk_scan_kernel,
        decode_kernels.topk_merge_kernel,
        prefill_merge_kernels.merge_kernel,
        prefill_attention.tensor_cores,
        prefill_top_k._kernel,
        decode_kernels.attend_kernel,
        fused_attention._attend_call,  # its launches hold kernel objects
        fused_attention._scan_attend_call,
    )
    for made in made_kernels:
        made.cache_clear()
    build_llama(tmp_path, hidden=128, heads=8, kv_heads=2, seed=5)
    model, _ = load(str(tmp_path))
    state = install(model)
    state.fused = True
    attn = model.layers[1].self_attn
    bank = _bank("m", rows=300, dtype=np.float32)
    cache = BankCache(1 << 30)
    cache.put(bank)
    before = cache.nbytes
    scanned = []
    scan = fused_attention._scan
    monkeypatch.setattr(fused_attention, "_scan", lambda *a, **kw: scanned.append(1) or scan(*a, **kw))
    B, L = 1, prefill_attention.MIN_QUERIES
    assert prefill_attention.fits(B, 8, L, L)
    state.memory = MemoryContext(LocalRetriever([bank]), top_k=4)
    h = mx.random.normal((B, L, 128), key=mx.random.key(1))
    kv = KVCache()
    try:
        out = attn(h, create_attention_mask(h, kv), kv)
        mx.eval(out)
    finally:
        state.memory = None
        for made in made_kernels:
            made.cache_clear()
    return bank, cache, before, bool(scanned)


@needs_emulator
def test_a_prefill_that_does_not_read_the_prefill_keys_does_not_make_or_count_them(tmp_path, monkeypatch):
    """``fused_attention.top_k_rows`` reads a bank's prefill keys only from MATMUL_ROWS (2048) query
    rows on; below that it takes the scan kernels. A fused prefill below it (here 1 x 8 heads x 32
    tokens = 256 rows; a 32-head model's prompts of 32 ... 63 tokens) must neither make them nor
    count their bytes (the first form made them for every call ``prefill_attention.fits`` took,
    left them unevaluated in the bank and counted them in the cache's bound)."""
    bank, cache, before, scanned = _fused_prefill(tmp_path, monkeypatch, fused_attention.MATMUL_ROWS)
    assert scanned  # the fused prefill ran, its top-k by the scan kernels
    made = sorted(bank.prefill)
    assert made == [], f"layer {made}'s prefill keys made for a prefill that did not read them"
    assert cache.nbytes == before, f"{cache.nbytes - before} bytes counted that this prefill never allocated"


@needs_emulator
def test_a_prefill_that_reads_the_prefill_keys_keeps_and_counts_them(tmp_path, monkeypatch):
    """The same prefill taking the matmul path (MATMUL_ROWS lowered below its 256 rows): the layer's
    keys are made, evaluated with the forward, kept with the cached bank and counted."""
    bank, cache, before, scanned = _fused_prefill(tmp_path, monkeypatch, 64)
    assert not scanned and sorted(bank.prefill) == [1]
    unit, rows_major = bank.prefill[1]
    np.testing.assert_array_equal(np.array(rows_major), np.array(bank.keys[1]).swapaxes(1, 2))
    assert cache.nbytes == before + unit.nbytes + rows_major.nbytes == bank.nbytes
