"""A request that finds its group empty starts solo from its prompt (``Solo.from_prompt``:
mlx-lm's ``generate_step`` prefills it), so a lone stream never pays the batch steps and the
hand-over. Whether it stays alone, is joined mid-stream (back into a batch
with its cache) or is joined before its first step (into the batch as a prompt), it gets the
tokens, logprobs and top logprobs it gets batched throughout."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from extmind import errors
from services.generator import attention_mass, decode_group, solo
from services.generator import scheduler as sched
from services.generator.request_types import LOCAL, REMOTE, GenerationRequest, MemoryOptions, Sampling

from .helpers import MlxHold, first_steps_queued, queued, stock_steps
from .memory_helpers import assert_counts_match, assert_decidable, ref_memory, row_hits
from .np_reference import Retrievals
from .test_solo_decode import ALONG, SAMPLINGS, joined, run, same_steps


@pytest.fixture
def seen(monkeypatch):
    """Counts solos made from a prompt ("fresh"), hand-overs to solo ("solo") and resumes of a
    started solo ("resume") or of one joined before its first step ("unstarted")."""
    counts = {"fresh": 0, "solo": 0, "resume": 0, "unstarted": 0}
    from_prompt, go_solo, resume = solo.Solo.from_prompt, sched.Scheduler._go_solo, decode_group.DecodeGroup.resume

    def fresh(cls, *a, **kw):
        counts["fresh"] += 1
        return from_prompt(*a, **kw)

    def going(self, group, r):
        counts["solo"] += 1
        go_solo(self, group, r)

    def resuming(group):
        counts["resume" if group.solo.started else "unstarted"] += 1
        resume(group)

    monkeypatch.setattr(solo.Solo, "from_prompt", classmethod(fresh))
    monkeypatch.setattr(sched.Scheduler, "_go_solo", going)
    monkeypatch.setattr(decode_group.DecodeGroup, "resume", resuming)
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 2)
    return counts


async def together(engine, *reqs):
    """Runs ``reqs`` admitted back to back before any step: the MLX thread is held until every
    admit waits for it."""
    hold = MlxHold(engine)
    await hold.started()  # until the thread takes it, the hold itself counts as waiting
    tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
    await queued(engine, len(reqs))  # the admits, queued behind the hold
    hold.release()
    await hold.done()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("name", list(SAMPLINGS))
async def test_from_prompt_alone_joined_and_batched_give_the_same_tokens(plain_engine, seen, monkeypatch, name):
    engine = plain_engine
    req = GenerationRequest(
        engine.tokenizer.encode("Alice met Bob at the"), SAMPLINGS[name], return_logprobs=True, top_logprobs=3
    )
    alone = await run(engine, req)
    assert seen == {"fresh": 1, "solo": 0, "resume": 0, "unstarted": 0} and len(alone[0]) >= 12

    # joined at its 6th token: back into a batch with its cache, solo again once the other ends
    a, b = await joined(
        engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5)), monkeypatch
    )
    assert seen["fresh"] == 2 and seen["resume"] == 1 and seen["solo"] >= 1 and b[3].completion_tokens == 5
    same_steps(alone, a)

    # joined before its first step: into the batch as a prompt, batched throughout
    long = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=40))
    before = dict(seen)
    c, _ = await together(engine, req, long)
    assert seen["fresh"] == before["fresh"] + 1 and seen["unstarted"] == before["unstarted"] + 1
    assert seen["resume"] == before["resume"]  # (the longer one goes solo once req has ended)
    same_steps(alone, c)
    assert engine.stats()["active"] == 0


async def test_a_lone_greedy_request_is_stock_generate_step_bit_for_bit(plain_engine, seen):
    """Solo from its prompt, a request is mlx-lm's generate_step on the same model: the same
    tokens and the same logprobs to the bit (batched, logprobs may round differently)."""
    engine = plain_engine
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")
    tokens, lps, _, final, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=16), None, True))
    assert seen["fresh"] == 1
    want = stock_steps(engine, prompt, 16, engine.config.prefill_step_size)
    assert len(tokens) >= 8 and tokens == [t for t, _ in want] and lps == [lp for _, lp in want]
    assert final.completion_tokens >= len(tokens)


async def test_the_first_token_is_read_before_the_next_forward_is_built(plain_engine, seen, monkeypatch):
    """A solo from its prompt reads its first token after the last prompt token's forward alone;
    generate_step, started at the second step, runs the first token's forward and the next one's
    ahead, then one per step (solo.py): the forwards built per step are 1, 2, 1, 1, ..., and the
    tokens are still generate_step's to the bit (the test above)."""
    engine = plain_engine
    model_type, step = type(engine.model), solo.Solo.step
    built, per_step = [0], []
    forward = model_type.__call__

    def counting(self, *a, **kw):
        built[0] += 1
        return forward(self, *a, **kw)

    def counted_step(self):
        built[0] = 0
        out = step(self)
        per_step.append(built[0])
        return out

    monkeypatch.setattr(model_type, "__call__", counting)
    monkeypatch.setattr(solo.Solo, "step", counted_step)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")
    tokens, *_ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=6)))
    assert seen["fresh"] == 1 and len(per_step) == len(tokens) >= 3
    assert per_step == [1, 2] + [1] * (len(tokens) - 2), per_step


def counted_steps(monkeypatch) -> list:
    """The attention-mass steps of every request that ends, in the order they end."""
    steps, means = [], attention_mass.MassSum.means
    monkeypatch.setattr(attention_mass.MassSum, "means", lambda self: steps.append(self.steps) or means(self))
    return steps


def counted_reference(engine, memory, ref, n: int, top_k: int):
    """A citing request's options (every pick counts) and the numpy model's greedy tokens and
    retrievals for its prompt, every top-k set decidable. -> (prompt, options, tokens, Retrievals,
    the memory's tokens)."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    opts = MemoryOptions((mid,), top_k=top_k, return_citations=True, max_citations=1000, citation_min_weight=0.0)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    want_hits, margins = Retrievals(), []
    want, _ = ref.greedy(prompt, n, memory=bank, top_k=top_k, hits=want_hits, margins=margins)
    assert_decidable(margins)
    return prompt, opts, want, want_hits, tokens


@pytest.mark.parametrize("n", [1, 2, 20])
async def test_a_citing_request_with_memories_starts_solo_and_counts_every_forward_once(
    engine, memory, ref, seen, monkeypatch, n
):
    """A request with memories that finds its group empty starts solo from its prompt too: the
    numpy model's tokens, its retrievals counted per row (tie-aware), and every forward counted
    once - the last prompt token's (counted even when its token is the last: a batch counts it in
    the step that ends the prompt) and every generated token's but the last - so n forwards of
    layers x heads x top_k picks for n tokens, and n attention-mass steps."""
    top_k = 3
    steps = counted_steps(monkeypatch)
    prompt, opts, want, want_hits, tokens = counted_reference(engine, memory, ref, n, top_k)
    got = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), opts))
    assert seen == {"fresh": 1, "solo": 0, "resume": 0, "unstarted": 0}
    assert got[0] == want and got[3].completion_tokens == n
    assert int(got[3].row_counts.sum()) == engine.num_layers * engine.num_heads * top_k * n
    assert_counts_match(row_hits(got[3], tokens, engine.tokenizer), want_hits)
    assert steps == [n]


async def test_a_request_with_memories_started_solo_and_joined_counts_every_forward_once(
    engine, memory, ref, seen, monkeypatch
):
    """Started solo from its prompt and joined mid-stream by another request of its group (back
    into the batch with its cache, solo again once alone): the same tokens and counts as alone,
    each forward counted once in both requests."""
    top_k, n = 3, 20
    steps = counted_steps(monkeypatch)
    prompt, opts, want, want_hits, tokens = counted_reference(engine, memory, ref, n, top_k)
    req = GenerationRequest(prompt, Sampling(max_tokens=n), opts)
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5), opts)
    a, b = await joined(engine, req, other, monkeypatch)
    assert seen["fresh"] == 1 and seen["resume"] == 1 and seen["solo"] >= 1
    per_token = engine.num_layers * engine.num_heads * top_k
    assert a[0] == want and a[3].completion_tokens == n
    assert int(a[3].row_counts.sum()) == per_token * n
    assert_counts_match(row_hits(a[3], tokens, engine.tokenizer), want_hits)
    assert int(b[3].row_counts.sum()) == per_token * b[3].completion_tokens == per_token * 5
    assert steps == [5, n]


@pytest.mark.parametrize(("mode", "layers"), [(REMOTE, ()), (LOCAL, (1,)), (REMOTE, (0,))])
async def test_remote_retrieval_and_a_layer_subset_started_solo(engine, memory, seen, monkeypatch, mode, layers):
    """REMOTE retrieval (a search per layer and forward) and a subset of retrieving layers (fewer
    records per forward), started solo from the prompt: the tokens a batch makes, every forward
    counted once."""
    mid, _ = memory
    top_k, n = 3, 16
    opts = MemoryOptions((mid,), top_k=top_k, mode=mode, layers=layers, return_citations=True, citation_min_weight=0.0)
    steps = counted_steps(monkeypatch)
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=n), opts)
    alone = await run(engine, req)
    assert seen["fresh"] == 1 and seen["solo"] == 0
    monkeypatch.setattr(sched.Scheduler, "SOLO_FROM_PROMPT", False)
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 10_000)
    batched = await run(engine, req)
    assert seen["fresh"] == 1 and seen["solo"] == 0
    assert alone[0] == batched[0] and len(alone[0]) == n
    per_token = len(layers or range(engine.num_layers)) * engine.num_heads * top_k
    for fin in alone[3], batched[3]:
        assert int(fin.row_counts.sum()) == per_token * n
    np.testing.assert_array_equal(alone[3].row_counts, batched[3].row_counts)
    assert steps == [n, n]


async def test_a_first_step_whose_forwards_cannot_be_counted_ends_that_request(engine, memory, seen, monkeypatch):
    """The last prompt token's forward is counted right after the first solo step: when that
    count fails, the request ends with the error (no token of it is sent) and the engine serves
    the next request."""
    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=3, return_citations=True)
    real, broken = decode_group.decode_forwards, {"on": True}

    def forwards(*a, **kw):
        if broken["on"]:
            raise errors.Internal("the counts could not be read")
        return real(*a, **kw)

    monkeypatch.setattr(decode_group, "decode_forwards", forwards)
    # one token: its first step would also end it, which must not end it a second time
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=1), opts)
    events = []
    with pytest.raises(errors.Internal, match="the counts could not be read"):
        async for ev in engine.generate(req):
            events.append(ev)
    assert events == [] and seen["fresh"] == 1
    # ended once: its slot of --max-queue freed once (a second end would free another's)
    assert engine.stats()["active"] == 0 and engine.mlx.call(lambda: engine._scheduler._flight.active) == 0
    broken["on"] = False
    req = replace(req, sampling=Sampling(max_tokens=6))
    got = await run(engine, req)
    assert len(got[0]) == 6 and got[3].citations and seen["fresh"] == 2
    assert engine.stats()["active"] == 0


async def test_requests_admitted_while_its_first_step_is_queued_share_the_batch_prefill(
    plain_engine, seen, monkeypatch
):
    """A request started solo whose first step comes before the admits of requests that arrived
    with it (the scheduler's run of steps was queued between them) puts that step off once: the
    others join before its prefill and all are prefilled as one batch (no started solo to resume,
    and no prompt chunk of it run solo only to be computed again in the batch)."""
    engine = plain_engine
    chunks, prefill = [], solo.Solo.prefill
    monkeypatch.setattr(solo.Solo, "prefill", lambda self: chunks.append(1) or prefill(self))
    a_req = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=12))
    a, hold = await first_steps_queued(engine, lambda: asyncio.create_task(run(engine, a_req)))
    b = asyncio.create_task(run(engine, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=12))))
    await queued(engine, 2)  # and b's admit behind them
    hold.release()
    await hold.done()
    got_a, got_b = await a, await b
    assert len(got_a[0]) == len(got_b[0]) == 12
    assert seen["fresh"] == 1 and seen["unstarted"] == 1 and seen["resume"] == 0 and chunks == []


@pytest.mark.parametrize("length", [1, 2, 4, 5, 7])
@pytest.mark.parametrize("kind", ["greedy", "seeded_penalty"])
async def test_solo_from_prompt_is_stock_generate_step_at_every_prompt_length(
    plain_engine, seen, monkeypatch, length, kind
):
    """Prompts of 1 token (no prefill), of one chunk + 1 (the whole head one async-evaluated
    chunk), of several chunks and between: the first token by the last prompt token's forward
    alone and generate_step from it are stock generate_step over the whole prompt (same sampler,
    same repetition penalty), tokens and logprobs to the bit."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from services.generator.sampling import logits_processors_for, sampler_for

    engine, step = plain_engine, 3
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    if kind == "greedy":
        s = Sampling(max_tokens=7)
    else:
        s = Sampling(temperature=1.0, top_p=0.95, seed=3, repetition_penalty=1.3, max_tokens=7)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")[-length:]
    assert len(prompt) == length
    tokens, lps, *_ = await run(engine, GenerationRequest(prompt, s, None, True))
    assert seen["fresh"] == 1

    def stock():
        out = []
        steps = generate_step(
            mx.array(prompt),
            engine.model,
            max_tokens=s.max_tokens,
            prefill_step_size=step,
            sampler=sampler_for(s, engine.vocab_size),
            logits_processors=logits_processors_for(s),
        )
        for t, lp in steps:
            if t in engine.eos_ids:
                break
            out.append((t, float(np.array(lp)[t])))
        return out

    want = engine.mlx.call(stock)
    assert len(tokens) >= 2
    assert tokens == [t for t, _ in want] and lps == [lp for _, lp in want]
