"""Memories of float16 / bfloat16 models stay in the model's dtype: stored in Redis, fetched and
cached on the device in half the bytes of float32, ranked by the exact (float32) cosine of the
stored values; old float32 memories, alone or mixed with half ones, give the same answers as the
same rows stored in half precision (docs/extended-mind.md, "Dtypes")."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from extmind import tensor
from extmind.tiny_models import build_llama
from extmind.v1 import memory_pb2
from services.generator.bank_cache import LocalRetriever, bank_from_numpy, bank_from_stored, fetch_bank
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.kv_dtypes import MX_DTYPES, widen
from services.generator.memory_client import MemoryClient
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling
from services.memory.kv_layout import key_prefix

from .helpers import run
from .memory_helpers import TEXT, ref_memory
from .np_reference import Model, Retrievals

OTHER_TEXT = "The river flows to the sea, and the sea rises over the old stone bridge at night."

# The half-precision model itself (its matmuls, norms and activations, memories or not) strays
# from the float64 reference by up to ~1e-2 (float16) / ~5e-2 (bfloat16) in a logprob: greedy
# tokens are compared only where the reference's best logit leads by more than twice that.
TOLERANCE = {
    tensor.FLOAT16: dict(keys_atol=5e-3, logprob_atol=1e-2, margin=2e-2),
    tensor.BFLOAT16: dict(keys_atol=3e-2, logprob_atol=5e-2, margin=5e-2),
}


def _storage(a: np.ndarray, dtype: int) -> np.ndarray:
    """float32 numpy -> the storage array of ``dtype`` (rounded to nearest even)."""
    return tensor.decode_raw(tensor.encode(np.asarray(a, np.float32), dtype)).copy()


# ---------------------------------------------------------------- the retrieval itself


@pytest.mark.parametrize("dtype", [tensor.FLOAT16, tensor.BFLOAT16])
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_half_banks_rank_by_the_exact_cosine_of_the_stored_values(dtype, threshold):
    rng = np.random.default_rng(5)
    kvh, n, d, B, rep, L, top_k = 2, 400, 16, 2, 2, 3, 5
    keys = _storage(rng.standard_normal((kvh, n, d)) * 2, dtype)
    keys[:, 10] = keys[:, 20]  # exact ties
    values = _storage(rng.standard_normal((kvh, n, d)), dtype)
    bank = bank_from_numpy("m", "1", [keys], [values], dtype)
    assert bank.keys[0].dtype == MX_DTYPES[dtype] and bank.values[0].dtype == MX_DTYPES[dtype]
    assert bank.nbytes == 2 * kvh * n * d * 2 + kvh * n * 4  # half-precision rows + float32 norms
    K, V = widen(keys, dtype).astype(np.float64), widen(values, dtype).astype(np.float64)

    q = rng.standard_normal((B, kvh, rep, L, d)).astype(np.float32)
    got = LocalRetriever([bank]).retrieve(0, mx.array(q), top_k, threshold)
    indices, dots, vals = np.array(got.indices), np.array(got.dots), np.array(got.values)
    assert vals.dtype == np.float32
    unit = K / np.linalg.norm(K, axis=-1, keepdims=True)
    for b, g, r, t in np.ndindex(B, kvh, rep, L):
        qq = q[b, g, r, t].astype(np.float64)
        sim = unit[g] @ (qq / np.linalg.norm(qq))
        want = Retrievals(eps=1e-5)  # float32 rounding only: a float16 product would be ~1e-3 off
        want.add(sim, top_k, threshold)
        rows = [int(i) for i in indices[b, g, r, t] if i >= 0]
        assert not want.mismatches({i: 1 for i in rows}), (b, g, r, t)
        picked = indices[b, g, r, t] >= 0
        idx = indices[b, g, r, t][picked]
        np.testing.assert_allclose(dots[b, g, r, t][picked], K[g][idx] @ qq, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(vals[b, g, r, t][picked], V[g][idx])  # exactly the stored values


def test_banks_of_different_dtypes_are_searched_together_exactly():
    rng = np.random.default_rng(6)
    half = [_storage(rng.standard_normal((2, 50, 8)), tensor.FLOAT16) for _ in range(2)]
    wide = [rng.standard_normal((2, 70, 8)).astype(np.float32) for _ in range(2)]
    mixed = LocalRetriever(
        [bank_from_numpy("a", "1", [half[0]], [half[1]]), bank_from_numpy("b", "1", [wide[0]], [wide[1]])]
    )
    as_float32 = [widen(a, tensor.FLOAT16) for a in half]
    same = LocalRetriever(
        [bank_from_numpy("a", "1", [as_float32[0]], [as_float32[1]]), bank_from_numpy("b", "1", [wide[0]], [wide[1]])]
    )
    q = mx.array(rng.standard_normal((1, 2, 2, 4, 8)).astype(np.float32))
    for threshold in (None, 0.2):
        x, y = mixed.retrieve(0, q, 7, threshold), same.retrieve(0, q, 7, threshold)
        for field in ("indices", "dots", "values"):
            np.testing.assert_array_equal(np.array(getattr(x, field)), np.array(getattr(y, field)))


# ---------------------------------------------------------------- a half-precision generator


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def half(request, tmp_path_factory, module_memory_service):
    path = build_llama(
        tmp_path_factory.mktemp(request.param),
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        rope_scaling="llama3",
        seed=1,
        dtype=request.param,
    )
    engine = GeneratorEngine(EngineConfig(model=str(path), memory_url=module_memory_service.address, dtype="model"))
    engine.start()
    client = MemoryClient(module_memory_service.address)
    tokens = engine.tokenizer.encode(TEXT)
    mid = engine.memorize_blocking(tokens)["memory_id"]
    other = engine.memorize_blocking(engine.tokenizer.encode(OTHER_TEXT))["memory_id"]
    h = SimpleNamespace(
        engine=engine,
        client=client,
        dtype={"float16": tensor.FLOAT16, "bfloat16": tensor.BFLOAT16}[request.param],
        path=path,
        mid=mid,
        other=other,
        tokens=tokens,
        redis=module_memory_service.redis.client(),
    )
    h.mid32, h.other32 = _float32_copy(h, mid), _float32_copy(h, other)
    yield h
    client.close()
    engine.stop()


def _float32_copy(h, mid: str) -> str:
    """The rows of memory ``mid`` widened to float32 and stored as a float32 memory of the same
    model, as a writer that stores float32 would."""
    mem = h.client.get_memory(mid, include_tokens=True)
    stored = h.client.fetch_stored(mid, h.engine.num_layers)
    assert stored.dtype == h.dtype
    layout = memory_pb2.MemoryLayout()
    layout.CopyFrom(mem.layout)
    layout.dtype = tensor.FLOAT32
    copy = f"{mid}-float32"
    h.client.create_memory(
        memory_id=copy,
        layout=layout,
        fingerprint=mem.model_fingerprint,
        token_ids=mem.token_ids,
        positions=mem.positions,
        labels={},
    )
    h.client.append(
        memory_pb2.AppendMemoryRequest(
            memory_id=copy,
            layer=layer,
            keys=tensor.encode(widen(k, h.dtype)),
            values=tensor.encode(widen(v, h.dtype)),
        )
        for layer, (k, v) in enumerate(zip(stored.keys, stored.values))
    )
    return copy


def _redis_bytes(h, mid: str) -> int:
    prefix = key_prefix(mid)
    names = [*h.redis.scan_iter(match=f"{prefix}:k:*"), *h.redis.scan_iter(match=f"{prefix}:v:*")]
    return sum(h.redis.strlen(n) for n in names)


def test_memorize_stores_the_model_dtype_in_half_the_bytes(half):
    h = half
    assert h.engine.dtype == h.dtype and h.engine.info()["dtype"] == h.dtype
    mem = h.client.get_memory(h.mid)
    assert mem.layout.dtype == h.dtype
    rows, e = mem.num_tokens, h.engine
    half_bytes = 2 * e.num_layers * e.num_kv_heads * rows * e.head_dim * 2
    assert mem.bytes == _redis_bytes(h, h.mid) == half_bytes
    assert h.client.get_memory(h.mid32).bytes == _redis_bytes(h, h.mid32) == 2 * half_bytes
    # the stored rows are the model's own keys and values, rounded to its dtype once
    stored = h.client.fetch_stored(h.mid, e.num_layers)
    assert all(k.dtype == tensor.STORAGE[h.dtype] for k in (*stored.keys, *stored.values))
    want, _ = ref_memory(Model(h.path), h.tokens, e.special_ids)
    atol = TOLERANCE[h.dtype]["keys_atol"]
    for layer, (k, v) in enumerate(want):
        np.testing.assert_allclose(widen(stored.keys[layer], h.dtype), k, atol=atol, rtol=atol)
        np.testing.assert_allclose(widen(stored.values[layer], h.dtype), v, atol=atol, rtol=atol)


async def test_the_bank_cache_holds_half_the_bytes(half):
    h, e = half, half.engine
    copy = h.mid32
    prompt = e.tokenizer.encode("Water boils at")
    for mid in (h.mid, copy):
        await run(e, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid,), top_k=3)))

    def banks():
        resolved = e.resolver.resolve((h.mid, copy))
        return [e.bank_cache.get(m.memory_id, m.version) for m in resolved], e.bank_cache.nbytes

    (small, big), cached = e.mlx.call(banks)
    assert small.dtype == h.dtype and big.dtype == tensor.FLOAT32
    norms = sum(a.nbytes for a in small.inv_norms)
    assert norms == sum(a.nbytes for a in big.inv_norms) == e.num_layers * e.num_kv_heads * small.rows * 4
    assert small.nbytes - norms == (big.nbytes - norms) // 2 == h.client.get_memory(h.mid).bytes
    assert cached >= small.nbytes + big.nbytes


def test_a_bank_fetched_layer_by_layer_is_the_stored_rows_bit_for_bit(half):
    """fetch_bank (each layer to the device as soon as it arrived) gives the bank that fetching
    everything first and caching it then gives; FetchMemory hands every layer over once, in
    order, complete, and the arrays it hands over are the ones it returns."""
    h, e = half, half.engine
    for mid in (h.mid, h.mid32):
        info = e.resolver.resolve((mid,))[0]
        handed: list[tuple] = []
        stored = e.resolver.fetch(info, on_layer=lambda *a, out=handed: out.append(a))
        assert [a[0] for a in handed] == list(range(e.num_layers))
        for layer, keys, values, dtype in handed:
            assert dtype == stored.dtype and keys.shape[1] == values.shape[1] == info.rows
            assert np.shares_memory(keys, stored.keys[layer]) and np.shares_memory(values, stored.values[layer])
        piped = fetch_bank(e.resolver, info, e.mlx)
        whole = e.mlx.call(bank_from_stored, mid, info.version, stored)
        assert (
            (piped.rows, piped.dtype, piped.version)
            == (whole.rows, whole.dtype, whole.version)
            == (
                info.rows,
                stored.dtype,
                info.version,
            )
        )

        def same(a, b):
            return e.mlx.call(lambda: all(mx.array_equal(x, y).item() for x, y in zip(a, b)) and len(a) == len(b))

        assert same(piped.keys, whole.keys) and same(piped.values, whole.values)
        assert same(piped.inv_norms, whole.inv_norms)


async def test_local_and_remote_equal_the_numpy_model_on_the_stored_rows(half):
    h, e = half, half.engine
    tol = TOLERANCE[h.dtype]
    ref = Model(h.path)
    keys, values = h.client.fetch(h.mid, e.num_layers)  # the stored rows, widened exactly
    bank = list(zip(keys, values))
    prompt = e.tokenizer.encode("Water boils at")
    _, plain_lp, _, _ = await run(e, GenerationRequest(prompt, Sampling(max_tokens=4), return_logprobs=True))
    for top_k, threshold in ((3, None), (10, 0.1)):
        margins = []
        want, want_lp = ref.greedy(prompt, 4, memory=bank, top_k=top_k, threshold=threshold, margins=margins)
        assert min(margins) > tol["margin"], f"the reference's two best logits are {min(margins):.2e} apart"
        for mode in ("local", "remote"):
            got, got_lp, _, _ = await run(
                e,
                GenerationRequest(
                    prompt,
                    Sampling(max_tokens=4),
                    MemoryOptions((h.mid,), top_k=top_k, threshold=threshold, mode=mode),
                    return_logprobs=True,
                ),
            )
            assert got == want, mode
            np.testing.assert_allclose(got_lp, want_lp, atol=tol["logprob_atol"])
            assert np.max(np.abs(np.array(got_lp) - plain_lp)) > 3 * tol["logprob_atol"]  # memories matter


async def test_float32_memories_alone_or_mixed_give_what_the_half_ones_give(half):
    """A float32 memory (rows stored wide by another writer) is fetched, searched and attended
    by the half-precision model; next to a half-precision memory in one request too. Holding the
    same values, it gives exactly the answers of the half-precision memory, LOCAL and REMOTE."""
    h, e = half, half.engine
    copy, other_copy = h.mid32, h.other32
    prompt = e.tokenizer.encode("Alice met Bob at the")
    sets = {
        "half": (h.mid, h.other),
        "float32": (copy, other_copy),
        "mixed": (h.mid, other_copy),
        "mixed, float32 first": (copy, h.other),
    }
    for mode in ("local", "remote"):
        for threshold in (None, 0.1):
            out = {}
            for name, ids in sets.items():
                r = GenerationRequest(
                    prompt,
                    Sampling(max_tokens=6),
                    # every pick counts: a weight floor could tip differently for half and float32 banks
                    MemoryOptions(
                        ids, top_k=4, threshold=threshold, mode=mode, return_citations=True, citation_min_weight=0.0
                    ),
                    return_logprobs=True,
                )
                tokens, lps, _, final = await run(e, r)
                assert final.row_counts is not None and final.row_counts.sum() > 0
                out[name] = tokens, lps, final.row_counts
            for name in sets:
                assert out[name][0] == out["half"][0], (mode, threshold, name)
                np.testing.assert_allclose(out[name][1], out["half"][1], atol=1e-6, err_msg=f"{mode} {name}")
                # the same rows, numbered in request order whatever the dtypes
                np.testing.assert_array_equal(out[name][2], out["half"][2], err_msg=f"{mode} {name}")
    alone = [
        (await run(e, GenerationRequest(prompt, Sampling(max_tokens=6), MemoryOptions((mid,), top_k=4))))[0]
        for mid in (h.mid, copy)
    ]
    assert alone[0] == alone[1]


async def test_a_half_precision_model_counts_the_picks_above_the_floor(half):
    """citation_min_weight on a float16 / bfloat16 model (its half-precision queries and stored
    rows): the counts equal the numpy model's picks whose softmax weight reaches the floor, LOCAL
    and REMOTE. A short memory and a top-k over all its rows leave no top-k choice to the half
    model's rounding; the floor sits in a gap between the reference's weights far wider (relative)
    than that rounding moves a weight (a weight moves by about its logit's error, TOLERANCE)."""
    h, e = half, half.engine
    rel = 4 * TOLERANCE[h.dtype]["logprob_atol"]
    mid = e.memorize_blocking(e.tokenizer.encode("Alice met Bob at the old station by the river."))["memory_id"]
    keys, values = h.client.fetch(mid, e.num_layers)
    rows = keys[0].shape[1]
    bank = list(zip(keys, values))
    n, top_k = 4, 64
    assert rows < top_k
    ref, found = Model(h.path), None
    for text in ("Water boils at", "Alice met Bob at", "The station", "Bob said that"):
        prompt = e.tokenizer.encode(text)
        margins, picks = [], []
        want_tokens, _ = ref.greedy(prompt, n, memory=bank, top_k=top_k, layers={1}, margins=margins, picks=picks)
        if min(margins) <= TOLERANCE[h.dtype]["margin"]:
            continue
        weights = np.sort(np.concatenate([w for _, w in picks]))
        ratio = weights[1:] / weights[:-1]  # the floor drops some picks and keeps the others
        i = int(np.argmax(ratio))
        if ratio[i] > 1 + rel:
            found = prompt, want_tokens, picks, float(np.sqrt(weights[i] * weights[i + 1]))
            break
    assert found, "no prompt whose greedy tokens and floor are decidable at this dtype"
    prompt, want_tokens, picks, floor = found
    want: dict[int, int] = {}
    for r_, w in picks:
        for r in r_[w >= floor]:
            want[int(r)] = want.get(int(r), 0) + 1
    assert 0 < sum(want.values()) < sum(len(r_) for r_, _ in picks)  # the floor drops some, keeps some
    for mode in ("local", "remote"):
        opts = MemoryOptions(
            (mid,), top_k=top_k, mode=mode, layers=(1,), return_citations=True, citation_min_weight=floor
        )
        tokens, _, _, final = await run(e, GenerationRequest(prompt, Sampling(max_tokens=n), opts))
        assert tokens == want_tokens, mode
        got = {r: int(c) for r, c in enumerate(final.row_counts) if c}
        assert got == want, mode
