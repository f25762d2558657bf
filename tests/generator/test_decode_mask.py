"""Decode without a mask (docs/architecture.md, "Decode without a mask"): a one-token forward over
a batch with no left padding drops mlx-lm's all-true mask, a padded batch keeps it, and the
tokens are the same either way. A prompt chunk whose boolean mask is the causal one runs with
"causal" (prefill_attention.causal_when_equal)."""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load

from extmind.tiny_models import build_llama
from services.generator import prefill_attention
from services.generator.decode_group import unpadded_caches
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run
from .memory_helpers import TEXT


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
    caches = unpadded_caches(gen)
    assert len(caches) == len(model.layers) and all(c is caches[id(c)] for c in caches.values())

    # Two prompts of different lengths share one decode batch: the shorter is left-padded.
    short, long_ = gen.insert([[9, 10], [11, 12, 13, 14, 15, 16, 17]])
    _decode_until_started(gen, {short, long_})
    assert unpadded_caches(gen) == {}

    # Once only the longest remains, mlx-lm shifts the padding away.
    gen.remove([alone, short])
    gen.next()
    assert len(unpadded_caches(gen)) == len(model.layers)
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
    masks_seen.update({k: 0 for k in masks_seen})  # not the load's checks of the layers
    try:
        short = GenerationRequest([5, 6], Sampling(max_tokens=12))
        long_ = GenerationRequest(list(range(5, 25)), Sampling(max_tokens=12))
        layers = len(engine.model.layers)
        alone = [await run(engine, r) for r in (short, long_)]
        # Masked: only a sequence's first decode forward (mlx-lm runs it when the prompt ends,
        # before the scheduler looks at the new batch) and a one-token prompt chunk (short).
        assert masks_seen["masked"] <= 3 * layers and masks_seen["unmasked"] >= 16 * layers
        # The long prompt alone (not padded): its chunk's boolean mask is the causal one (the
        # short one's chunk is its one token before the last: a one-token forward, counted above).
        assert masks_seen["prefill causal"] == layers and masks_seen["prefill array"] == 0

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


@pytest.fixture(scope="module")
def sliding_llama(tmp_path_factory):
    """A Llama whose layers alternate a 7-token sliding window (mlx-lm's RotatingKVCache, its
    batch mask a window once the context passes it) with full attention."""
    path = build_llama(tmp_path_factory.mktemp("sliding"), hidden=64, layers=4, heads=4, kv_heads=2, seed=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(sliding_window=7, layer_types=["sliding_attention", "full_attention"] * 2)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


async def _alone_then_together(engine, reqs):
    """-> (tokens, logprobs, citations' spans and row hits) of each request run alone, then of
    all of them batched."""
    out = [await run(engine, r) for r in reqs] + list(await asyncio.gather(*(run(engine, r) for r in reqs)))
    return [(t, lps, [(c.token_start, c.token_end, c.row_hits) for c in final.citations]) for t, lps, _, final in out]


@pytest.mark.parametrize("step", [2048, 6])
def test_causal_chunks_generate_exactly_what_their_boolean_masks_do(
    sliding_llama, module_memory_service, monkeypatch, step
):
    """Tokens, logprobs and citations (memories on every layer or some, with and without a floor)
    are identical with and without ``causal_when_equal``, for prompts alone and batched, prefilled
    whole and in 6-token chunks after a cached prefix, on a model whose sliding-window layers get
    masks of their own (some causal, some not)."""
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 9, 33)]
    floors_layers = ((0.0, ()), (0.05, ()), (0.0, (1, 2)), (0.02, ()))
    checked, answers, results = prefill_attention.causal_when_equal, [], {}

    def answering(mask):  # what it answered: both kinds must occur for the comparison to mean anything
        answers.append(checked(mask))
        return answers[-1]

    for substituted in (True, False):
        monkeypatch.setattr(prefill_attention, "causal_when_equal", answering if substituted else lambda m: m)
        engine = GeneratorEngine(
            EngineConfig(model=str(sliding_llama), memory_url=module_memory_service.address, prefill_step_size=step)
        )
        engine.start()
        try:
            mid = engine.memorize_blocking(engine.tokenizer.encode(TEXT[:600]))["memory_id"]
            reqs = [
                GenerationRequest(
                    p,
                    Sampling(max_tokens=12),
                    MemoryOptions((mid,), top_k=4, layers=layers, return_citations=True, citation_min_weight=floor),
                    return_logprobs=True,
                )
                for p, (floor, layers) in zip(prompts, floors_layers)
            ]
            results[substituted] = asyncio.run(_alone_then_together(engine, reqs))
        finally:
            engine.stop()
    assert all(tokens and cites for tokens, _, cites in results[True])
    assert "causal" in answers and any(isinstance(a, mx.array) for a in answers)  # window masks that bite
    assert results[True] == results[False]


def test_a_memorize_chunk_leaves_no_mask_remembered(sliding_llama):
    """Memorize's forwards run outside the scheduler's steps: their masks (a sliding window's
    array masks, which ``causal_when_equal`` remembers with its answer) are dropped after each
    chunk, not held by an idle generator until the next step."""
    from services.generator import prefill_attention
    from services.generator.extended_attention import install
    from services.generator.memory_builder import plan_windows, window_chunks

    model, _ = load(str(sliding_llama))
    state = install(model)
    tokens = list(range(5, 45))
    (window,) = plan_windows(len(tokens), window=64, stride=64)
    seen = []
    remember = prefill_attention.causal_when_equal

    def spying(mask):
        out = remember(mask)
        seen.append(len(prefill_attention._causal_answers))
        return out

    prefill_attention.causal_when_equal = spying
    try:
        chunks = list(window_chunks(model, state, tokens, window, special_ids=(), chunk=12))
    finally:
        prefill_attention.causal_when_equal = remember
    assert len(chunks) == 4 and max(seen) > 0  # window masks were remembered during a chunk
    assert prefill_attention._causal_answers == {}
