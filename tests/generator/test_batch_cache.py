"""batch_cache.HostPaddedBatchKVCache against mlx-lm's BatchKVCache: the same state after every
operation mlx-lm's BatchGenerator applies, with the padding known on the host; and a
BatchGenerator on either cache decodes the same bits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.utils import load

from services.generator import batch_cache
from services.generator.batch_cache import HostPaddedBatchKVCache, HostPaddedKVCache
from services.generator.decode_group import unpadded_caches

H, D = 2, 4


def _kv(rng, n: int, batch: int = 1) -> tuple[mx.array, mx.array]:
    shape = (batch, H, n, D)
    k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    return mx.array(k), mx.array(v)


def _sequence_caches(rng, lengths: list[int]) -> tuple[list[KVCache], list[HostPaddedKVCache]]:
    """One cache per length, the same keys and values in an mlx-lm KVCache and a HostPaddedKVCache."""
    plain, ours = [], []
    for n in lengths:
        a, b = KVCache(), HostPaddedKVCache()
        if n:
            k, v = _kv(rng, n)
            a.update_and_fetch(k, v)
            b.update_and_fetch(k, v)
        plain.append(a)
        ours.append(b)
    return plain, ours


def _same(a: BatchKVCache, b: HostPaddedBatchKVCache) -> None:
    assert type(a) is BatchKVCache and type(b) is HostPaddedBatchKVCache
    for x, y in ((a.keys, b.keys), (a.values, b.values)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape
            np.testing.assert_array_equal(np.array(x), np.array(y))
    assert a._idx == b._idx
    assert a.offset.tolist() == b.offset.tolist()
    assert a.left_padding.tolist() == b.left_padding.tolist() == b.host_padding


def _both(pair, fn) -> None:
    for c in pair:
        fn(c)
    _same(*pair)


@pytest.mark.parametrize("lengths", [[0, 0, 0], [3, 0, 5], [4, 4], [1, 6, 2, 0]])
def test_every_operation_matches_mlx_lm(lengths):
    """merge, a right-padded prompt chunk with prepare / finalize, decode steps, filter (with the
    shift of common padding), extend (empty and not, either side longer) and extract: the same
    arrays as mlx-lm's BatchKVCache, and host_padding equal to the device padding throughout."""
    rng = np.random.default_rng(sum(lengths) + len(lengths))
    plain, ours = _sequence_caches(rng, lengths)
    pair = (KVCache.merge(plain), HostPaddedKVCache.merge(ours))
    _same(*pair)
    B = len(lengths)

    # A prompt chunk of unequal lengths (right-padded, as PromptProcessingBatch.prompt does).
    chunk = [2, 5, 1, 3][:B]
    right = [max(chunk) - n for n in chunk]
    k, v = _kv(rng, max(chunk), B)
    _both(pair, lambda c: c.prepare(lengths=chunk, right_padding=right))
    _both(pair, lambda c: c.update_and_fetch(k, v))
    _both(pair, lambda c: c.finalize())

    for _ in range(3):  # decode steps
        kv = _kv(rng, 1, B)
        _both(pair, lambda c, kv=kv: c.update_and_fetch(*kv))

    for i in range(B):
        a, b = (c.extract(i) for c in pair)
        assert type(b) is HostPaddedKVCache and a.offset == b.offset
        np.testing.assert_array_equal(np.array(a.keys), np.array(b.keys))
        np.testing.assert_array_equal(np.array(a.values), np.array(b.values))

    # Another batch joins (longer or shorter than this one), then sequences leave.
    plain2, ours2 = _sequence_caches(rng, [7, 2])
    other = (KVCache.merge(plain2), HostPaddedKVCache.merge(ours2))
    _both(pair, lambda c: c.extend(other[0] if type(c) is BatchKVCache else other[1]))
    keep = [i for i in range(B + 2) if i % 2 == 1] or [0]
    _both(pair, lambda c: c.filter(keep))
    _both(pair, lambda c: c.filter([len(keep) - 1]))
    k, v = _kv(rng, 1, 1)
    _both(pair, lambda c: c.update_and_fetch(k, v))


def test_extend_of_empty_batches_and_of_mlx_lms_class():
    """Two batches without keys extend by concatenation; a batch of mlx-lm's own class joining
    has its padding read once and tracked from then on."""
    rng = np.random.default_rng(3)
    a = HostPaddedBatchKVCache([0, 2])
    a.extend(HostPaddedBatchKVCache([1]))
    assert a.host_padding == a.left_padding.tolist() == [0, 2, 1]
    plain, ours = _sequence_caches(rng, [2, 5])
    theirs = KVCache.merge(plain)
    mine = HostPaddedKVCache.merge(_sequence_caches(rng, [4])[1])
    mine.extend(theirs)
    assert mine.host_padding == mine.left_padding.tolist() == [1, 3, 0]


def test_unpadded_caches_from_the_host():
    """The decode batch's caches count as unpadded exactly when no sequence pads, for either class."""

    class Gen:  # what unpadded_caches reads of a BatchGenerator
        class _generation_batch:
            prompt_cache: list = []

    for cls in (BatchKVCache, HostPaddedBatchKVCache):
        Gen._generation_batch.prompt_cache = [cls([0, 0]), cls([0, 0])]
        assert len(unpadded_caches(Gen)) == 2
        Gen._generation_batch.prompt_cache = [cls([0, 0]), cls([0, 1])]
        assert unpadded_caches(Gen) == {}


def _decode(gen: BatchGenerator, plan: dict, steps: int = 40) -> tuple[dict, set]:
    """Steps ``gen`` ``steps`` times, inserting ``plan[step]``'s prompts at that step and removing
    sequence 1 at step 5. -> (uid -> [(token, logprobs as numpy)], the decode batch's cache classes)."""
    out: dict = {}
    classes = set()
    for step in range(steps):
        for prompt, n, caches in plan.get(step, []):
            gen.insert([prompt], max_tokens=[n], caches=caches)
        _, responses = gen.next()
        for r in responses:
            out.setdefault(r.uid, []).append((r.token, np.array(r.logprobs)))
        classes.update(type(c) for c in gen._generation_batch.prompt_cache)
        if step == 5:
            gen.remove([1])
    return out, classes


def test_batch_generator_decodes_the_same_bits(llama_path):
    """mlx-lm's BatchGenerator on HostPaddedKVCaches (prompts of unequal lengths joining at
    different steps, finishing at different steps, one removed) gives the tokens and logprobs of
    the same BatchGenerator on its own caches, bit for bit."""
    model, _ = load(str(llama_path))
    layers = len(model.layers)
    prompts = [[5, 9, 12], [7, 3, 8, 11, 2, 6, 4], [14], [21, 22, 23, 24, 25]]
    runs = []
    for ours in (False, True):

        def cache(ours=ours):
            return [batch_cache.prompt_cache(layers)] if ours else None

        plan = {
            0: [(prompts[0], 9, cache()), (prompts[1], 12, cache())],
            2: [(prompts[2], 6, cache())],
            4: [(prompts[3], 10, cache())],
        }
        gen = BatchGenerator(model, stop_tokens=[[10**6]], completion_batch_size=8, prefill_batch_size=8)
        out, classes = _decode(gen, plan)
        gen.close()
        assert classes == ({HostPaddedBatchKVCache} if ours else {BatchKVCache})
        runs.append(out)
    plain, host = runs
    assert len(plain[1]) < 12  # removed before its end
    assert plain.keys() == host.keys() and sum(len(v) for v in plain.values()) > 20
    for uid in plain:
        assert [t for t, _ in plain[uid]] == [t for t, _ in host[uid]]
        for (_, a), (_, b) in zip(plain[uid], host[uid]):
            np.testing.assert_array_equal(a, b)
