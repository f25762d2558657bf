"""Decode without a mask (docs/architecture.md, "Decode without a mask"): a one-token forward over
a batch with no left padding drops mlx-lm's all-true mask, a padded batch keeps it, and the
tokens are the same either way. A prompt chunk whose boolean mask is the causal one runs with
"causal" (prefill_attention.causal_when_equal)."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load

from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import GenerationRequest, Sampling
from services.generator.scheduler import _unpadded_caches

from .helpers import run


def _decode_until_started(gen: BatchGenerator, uids: set) -> None:
    """Steps ``gen`` until every sequence in ``uids`` has produced a token."""
    seen: set = set()
    for _ in range(100):
        _, responses = gen.next()
        seen |= {r.uid for r in responses}
        if uids <= seen:
            return
    raise AssertionError("the sequences never started decoding")


def test_unpadded_caches_follow_the_batch(llama_path):
    model, _ = load(str(llama_path))
    gen = BatchGenerator(model, max_tokens=50, stop_tokens=[[10**6]])

    (alone,) = gen.insert([[5, 6, 7, 8]])
    _decode_until_started(gen, {alone})
    caches = _unpadded_caches(gen)
    assert len(caches) == len(model.layers) and all(c is caches[id(c)] for c in caches.values())

    # Two prompts of different lengths share one decode batch: the shorter is left-padded.
    short, long_ = gen.insert([[9, 10], [11, 12, 13, 14, 15, 16, 17]])
    _decode_until_started(gen, {short, long_})
    assert _unpadded_caches(gen) == {}

    # Once only the longest remains, mlx-lm shifts the padding away.
    gen.remove([alone, short])
    gen.next()
    assert len(_unpadded_caches(gen)) == len(model.layers)
    gen.close()


@pytest.fixture()
def masks_seen(monkeypatch):
    """Counts the one-token attention calls (decode) by whether they got a mask."""
    seen = {"masked": 0, "unmasked": 0, "prefill causal": 0, "prefill array": 0}
    sdpa = mx.fast.scaled_dot_product_attention

    def counting(q, k, v, *args, mask=None, **kwargs):
        if q.shape[2] == 1:
            seen["masked" if mask is not None else "unmasked"] += 1
        else:
            seen["prefill causal" if isinstance(mask, str) and mask == "causal" else "prefill array"] += 1
        return sdpa(q, k, v, *args, mask=mask, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", counting)
    return seen


async def test_one_stream_decodes_without_a_mask_a_padded_batch_with_one(llama_path, masks_seen):
    engine = GeneratorEngine(EngineConfig(model=str(llama_path)))
    engine.start()
    try:
        short = GenerationRequest([5, 6], Sampling(max_tokens=12))
        long_ = GenerationRequest(list(range(5, 25)), Sampling(max_tokens=12))
        layers = len(engine.model.layers)
        alone = [await run(engine, r) for r in (short, long_)]
        # Masked: only a sequence's first decode forward (mlx-lm runs it when the prompt ends,
        # before the scheduler looks at the new batch) and a one-token prompt chunk (short).
        assert masks_seen["masked"] <= 3 * layers and masks_seen["unmasked"] >= 16 * layers
        # Each prompt alone (not padded): its chunk's boolean mask is the causal one.
        assert masks_seen["prefill causal"] == 2 * layers and masks_seen["prefill array"] == 0

        masks_seen.update({k: 0 for k in masks_seen})
        together = await asyncio.gather(run(engine, short), run(engine, long_))
        # Different lengths in one batch: the shorter is padded and every shared step is masked.
        assert masks_seen["masked"] >= 8 * layers
        # Prefilled together, right-padded then shifted: the chunk's mask is still causal.
        assert masks_seen["prefill causal"] >= layers
        for a, b in zip(alone, together):
            assert len(a[0]) > 0 and a[0] == b[0]
    finally:
        engine.stop()
