"""The engine without memories: stock mlx-lm equivalence, batching, sampling, stops, cancellation."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from extmind import errors
from services.generator.attention_parts import compute_dtype
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling
from services.generator.sampling import sampler_for

from .helpers import PROMPTS, run


@pytest.fixture(scope="module")
def engines(llama_path, qwen3_path):
    made = {}
    for name, path in (("llama", llama_path), ("qwen3", qwen3_path)):
        e = GeneratorEngine(EngineConfig(model=str(path)))
        e.start()
        made[name] = e
    yield made
    for e in made.values():
        e.stop()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
async def test_no_memories_is_stock_mlx_lm(engines, name, llama_path, qwen3_path):
    engine = engines[name]
    path = llama_path if name == "llama" else qwen3_path
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")
    tokens, lps, _, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=16), None, True))

    def stock():  # mlx-lm's own generate_step on an unmodified load of the same checkpoint
        model, tok = load(str(path))
        out = []
        for t, lp in generate_step(mx.array(prompt), model, max_tokens=16):
            if t in tok.eos_token_ids:
                break
            top2 = np.sort(np.array(lp))[-2:]
            out.append((t, float(np.array(lp)[t]), float(top2[1] - top2[0])))
        return out

    want = engine.mlx.call(stock)
    if not engine.state.merged_projections:  # the stock modules run: bit-identical
        assert len(tokens) >= 8 and tokens == [t for t, _, _ in want]
        assert lps == [lp for _, lp, _ in want]
    else:  # merged matmuls may sum in another order (docs/architecture.md, "Merged projections")
        tol = 1e-3 if compute_dtype(engine.model) == mx.float32 else 5e-2
        n = next((i for i, (_, _, gap) in enumerate(want) if gap <= 2 * tol), len(want))  # a near tie ends it
        assert n >= 8 and tokens[:n] == [t for t, _, _ in want[:n]]
        np.testing.assert_allclose(lps[:n], [lp for _, lp, _ in want[:n]], atol=tol)
    assert final.prompt_tokens == len(prompt)


async def test_eight_concurrent_greedy_equal_alone(engines):
    engine = engines["llama"]
    reqs = [GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=12)) for p in PROMPTS]
    alone = [await run(engine, r) for r in reqs]
    together = await asyncio.gather(*(run(engine, r) for r in reqs))
    for a, b in zip(alone, together):
        assert a[0] == b[0] and len(a[0]) > 0


async def test_concurrent_streams_wake_their_loop_once_per_step(engines, monkeypatch):
    """A decode step's tokens for all the requests of one event loop reach it in one wake-up of
    the loop, not one per request (each wake-up is a syscall and a trade of the GIL)."""
    engine = engines["llama"]
    loop = asyncio.get_running_loop()
    wakes, steps = [], []
    plain = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a, **k: wakes.append(a) or plain(*a, **k))
    step_all = engine._scheduler._step_all
    monkeypatch.setattr(engine._scheduler, "_step_all", lambda: steps.append(1) or step_all())
    reqs = [GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=12)) for p in PROMPTS]
    outs = await asyncio.gather(*(run(engine, r) for r in reqs))
    tokens = sum(len(o[0]) for o in outs)
    admits = len(reqs)  # each admit's result comes back to the loop too
    assert tokens > 2 * len(steps)  # requests shared steps
    assert len(wakes) <= len(steps) + admits, (len(wakes), len(steps), tokens)


async def test_seeded_sampling_is_reproducible_in_a_batch(engines):
    engine = engines["llama"]
    s = Sampling(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.2, seed=1234, max_tokens=10)
    prompt = engine.tokenizer.encode("Alice met Bob")
    a = await run(engine, GenerationRequest(prompt, s))
    other = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(temperature=0.8, max_tokens=10))
    b, _ = await asyncio.gather(run(engine, GenerationRequest(prompt, s)), run(engine, other))
    assert a[0] == b[0]
    c = await run(engine, GenerationRequest(prompt, Sampling(**{**s.__dict__, "seed": 99})))
    assert c[0] != a[0]


def test_stateless_samplers_are_shared_so_a_batch_samples_in_one_call():
    # mlx-lm's BatchGenerator samples a batch in one call only when every row has the same sampler
    # object; otherwise it slices the logprobs and calls each row's sampler (ops per row and step).
    greedy = sampler_for(Sampling(max_tokens=4))
    assert sampler_for(Sampling(max_tokens=9, top_p=0.5, top_k=3)) is greedy  # greedy ignores them
    hot = sampler_for(Sampling(temperature=0.7, top_p=0.9))
    assert sampler_for(Sampling(temperature=0.7, top_p=0.9, max_tokens=3, stop=("x",))) is hot
    assert hot is not greedy and sampler_for(Sampling(temperature=0.7, top_p=0.8)) is not hot
    seeded = [sampler_for(Sampling(temperature=0.7, seed=1)) for _ in range(2)]
    assert seeded[0] is not seeded[1]  # each seeded request draws from its own key


async def test_a_batch_sharing_an_unseeded_sampler_samples_every_row(engines):
    engine = engines["llama"]
    s = Sampling(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, max_tokens=8)
    reqs = [GenerationRequest(engine.tokenizer.encode(p), s) for p in PROMPTS[:4]]
    outs = await asyncio.gather(*(run(engine, r) for r in reqs))
    for tokens, *_, final in outs:
        assert 1 <= final.completion_tokens <= 8 and len(tokens) <= final.completion_tokens
        assert all(0 <= t < engine.vocab_size for t in tokens)


async def test_stop_string_and_max_tokens(engines):
    engine = engines["llama"]
    prompt = engine.tokenizer.encode("The quick brown fox")
    tokens, _, text, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=20)))
    assert final.finish_reason == "length" and final.completion_tokens == 20 == len(tokens)
    assert len(text) > 4
    stop = text[3:6]
    _, _, text2, final2 = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=20, stop=(stop,))))
    assert final2.finish_reason == "stop_sequence"
    assert text2 == text[: text.find(stop)]


async def test_cancellation_frees_the_slot(engines):
    engine = engines["llama"]
    gen = engine.generate(GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=10_000)))
    got = 0
    async for _ in gen:
        got += 1
        if got == 3:
            break
    assert engine.stats()["active"] == 1
    await gen.aclose()
    for _ in range(100):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["active"] == 0
    # and the engine still serves
    tokens, *_ = await run(engine, GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=3)))
    assert len(tokens) == 3


async def test_a_caller_cancelled_while_its_admit_runs_frees_the_slot(engines):
    """The caller goes away after its request was admitted on the MLX thread but before the
    answer reached its loop: the request must still be cancelled, not generate on unread."""
    engine = engines["llama"]
    release = threading.Event()
    engine.mlx.submit(release.wait, 10)  # the admit queues behind this
    task = asyncio.ensure_future(
        run(engine, GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=10_000)))
    )
    for _ in range(200):
        await asyncio.sleep(0.01)
        if engine.mlx.has_waiting():
            break
    assert engine.mlx.has_waiting()
    release.set()
    engine.mlx.call(lambda: None)  # blocks this loop until the admit ran: its answer is not delivered yet
    assert engine.stats()["active"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["active"] == 0


@pytest.mark.parametrize(
    "sampling,prompt,match",
    [
        (Sampling(temperature=-1), [5], "temperature"),
        (Sampling(top_p=1.5), [5], "top_p"),
        (Sampling(min_p=-0.1), [5], "min_p"),
        (Sampling(repetition_penalty=-2), [5], "repetition_penalty"),
        (Sampling(top_k=10**6), [5], "top_k"),
        (Sampling(stop=("",)), [5], "stop"),
        (Sampling(stop=tuple(f"s{i}" for i in range(33))), [5], "33 stop strings; send at most 32"),
        (Sampling(), [], "empty"),
    ],
)
async def test_bad_requests_are_invalid_argument(engines, sampling, prompt, match):
    engine = engines["llama"]
    with pytest.raises(errors.InvalidArgument, match=match):
        await run(engine, GenerationRequest(prompt, sampling))
    with pytest.raises(errors.InvalidArgument):
        engine.encode_prompt(prompt="")
    with pytest.raises(errors.InvalidArgument, match="top_k"):
        await run(engine, GenerationRequest([5], Sampling(), MemoryOptions(("m",), top_k=10**6)))
    tokens, *_ = await run(engine, GenerationRequest([5, 6], Sampling(max_tokens=2)))
    assert len(tokens) == 2


async def test_top_logprobs_are_the_most_likely_tokens_of_each_step(engines):
    engine = engines["llama"]
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")
    chunks = []
    req = GenerationRequest(prompt, Sampling(max_tokens=6), None, True, top_logprobs=5)
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
    plain, plain_lps, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=6), None, True))
    assert [t for c in chunks for t in c.token_ids] == plain and [x for c in chunks for x in c.logprobs] == plain_lps
    steps = [s for c in chunks for s in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True)]
    assert len(steps) == len(plain)  # one list per token, however the tokens were grouped in Chunks
    for token, lp, top in steps:
        ids, values = [t for t, _ in top], [v for _, v in top]
        assert len(set(ids)) == 5 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert (ids[0], values[0]) == (token, pytest.approx(lp, abs=1e-6))  # greedy: the best
        assert sum(np.exp(values)) <= 1 + 1e-5
    with pytest.raises(errors.InvalidArgument, match="top_logprobs 21"):
        await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), None, True, top_logprobs=21))


@pytest.mark.parametrize("seed", [None, 7])
async def test_top_k_of_the_whole_vocabulary_keeps_every_token_and_fails_no_one(engines, seed):
    """Sampling.validate takes top_k up to the vocabulary's size; mlx-lm's apply_top_k raises for
    top_k >= the logits' width, on the MLX thread, which failed the step of the whole group: the
    request and every request batched with it ended INTERNAL. top_k = vocabulary keeps every
    token: the same tokens as top_k 0 (seeded), and the greedy request beside it is unharmed."""
    engine = engines["llama"]
    prompt = engine.tokenizer.encode("The quick brown fox")
    s = Sampling(temperature=0.8, top_k=engine.vocab_size, max_tokens=12, seed=seed)
    greedy = GenerationRequest(prompt, Sampling(max_tokens=12))
    alone = await run(engine, greedy)
    beside, whole = await asyncio.gather(run(engine, greedy), run(engine, GenerationRequest(prompt, s)))
    assert beside[0] == alone[0] and whole[3].completion_tokens >= 1
    if seed is not None:
        off = await run(engine, GenerationRequest(prompt, Sampling(**{**s.__dict__, "top_k": 0})))
        assert whole[0] == off[0]
