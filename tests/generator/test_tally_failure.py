"""A group whose step's retrievals cannot be counted (``decode_forwards`` raises, or a tally's flush
fails) ends its citing requests with that error and nothing else: the group's other requests go on to their end, and the
engine keeps serving citing requests once counting works again (DecodeGroup.tally)."""

from __future__ import annotations

import pytest

from extmind import errors
from services.generator import decode_group
from services.generator.request_types import Chunk, Final, GenerationRequest, MemoryOptions, Sampling

from .helpers import run


async def test_a_failed_count_ends_only_the_citing_requests(engine, memory, monkeypatch):
    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=4, return_citations=True, max_citations=1000)
    plain = MemoryOptions((mid,), top_k=4)  # the same group: the default floor, no citations
    broken = {"on": False}
    real = decode_group.decode_forwards

    def forwards(*a, **kw):
        if broken["on"]:
            raise errors.Internal("the counts could not be read")
        return real(*a, **kw)

    monkeypatch.setattr(decode_group, "decode_forwards", forwards)
    citing = engine.generate(
        GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=100_000), opts)
    )
    assert isinstance(await citing.__anext__(), Chunk)
    other = engine.generate(
        GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=30), plain)
    )
    assert isinstance(await other.__anext__(), Chunk)  # both in the group's batch
    broken["on"] = True
    with pytest.raises(errors.Internal, match="the counts could not be read"):
        async for _ in citing:
            pass
    rest = [ev async for ev in other]
    assert isinstance(rest[-1], Final) and rest[-1].completion_tokens >= 2
    broken["on"] = False
    tokens, _, _, final = await run(
        engine, GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=6), opts)
    )
    assert len(tokens) == 6 and final.citations
    assert engine.stats()["active"] == 0


async def test_an_unmeasurable_attention_mass_fails_no_request(engine, memory, monkeypatch):
    """Attention mass is a metric: when a step's shares cannot be split per request
    (``forward_shares`` raises), the group's requests stop being measured (no observation) and
    finish with their citations as if nothing happened."""
    from services.generator import attention_mass

    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=4, return_citations=True, max_citations=1000)
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=6), opts)
    observed = lambda: attention_mass.MEMORY_SHARE._sum.get()  # noqa: E731
    start = observed()
    want = await run(engine, req)
    assert observed() > start  # measured while the shares split

    def forward_shares(*a, **kw):
        raise errors.Internal("the shares could not be split")

    monkeypatch.setattr(attention_mass, "forward_shares", forward_shares)
    before = observed()
    got = await run(engine, req)
    assert got[0] == want[0] and got[3].finish_reason == want[3].finish_reason
    assert got[3].citations == want[3].citations and want[3].citations
    assert observed() == before  # not observed
    assert engine.stats()["active"] == 0


@pytest.mark.parametrize("tally", ["counts", "mass"])
async def test_a_flush_that_keeps_failing_ends_only_what_needs_it(engine, memory, monkeypatch, tally):
    """A tally's flush whose graph fails (a device error, say) keeps its pending forwards, and every
    later flush of the group would fail the same way. A citation-count flush ends the group's
    citing requests with INTERNAL and nothing else; an attention-mass flush stops measuring the
    mass; either way the group's other requests and another group's run to their end, and the
    engine serves citing requests again once flushes work (not every running request failed by
    the step's error)."""
    from services.generator import attention_mass, batch_tally

    mid, _ = memory
    monkeypatch.setattr(batch_tally.BatchTally, "FLUSH_STEPS", 3)
    broken = {"on": False}
    real = {"counts": decode_group.picked_rows, "mass": attention_mass.summed_shares}[tally]

    def combine(*a, **kw):
        if broken["on"]:
            raise RuntimeError("device lost")
        return real(*a, **kw)

    if tally == "counts":
        monkeypatch.setattr(decode_group, "picked_rows", combine)
    else:
        monkeypatch.setattr(attention_mass, "summed_shares", combine)
    opts = MemoryOptions((mid,), top_k=4, return_citations=True, max_citations=1000)
    plain = MemoryOptions((mid,), top_k=4)  # the same group: no citations
    citing = engine.generate(
        GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=100_000), opts)
    )
    assert isinstance(await citing.__anext__(), Chunk)
    other = engine.generate(
        GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=40), plain)
    )
    elsewhere = engine.generate(GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=40)))
    assert isinstance(await other.__anext__(), Chunk) and isinstance(await elsewhere.__anext__(), Chunk)
    broken["on"] = True
    if tally == "counts":
        with pytest.raises(errors.Internal, match="device lost"):
            async for _ in citing:
                pass
    for stream in (other, elsewhere):
        rest = [ev async for ev in stream]
        assert isinstance(rest[-1], Final) and rest[-1].completion_tokens == 40
    if tally == "mass":  # the citing request was never touched: it is still running
        await citing.aclose()
    broken["on"] = False
    tokens, _, _, final = await run(
        engine, GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=6), opts)
    )
    assert len(tokens) == 6 and final.citations
    assert engine.stats()["active"] == 0 and engine.mlx.call(lambda: engine._scheduler._flight.active) == 0


@pytest.mark.parametrize("cite", [False, True])
async def test_an_attention_mass_that_cannot_be_read_at_a_request_end_fails_no_request(
    engine, memory, monkeypatch, cite
):
    """The attention mass of a short request is first combined at its end (its one flush, before
    the read): should that fail, the request still ends with its tokens and citations, unmeasured,
    and the requests running beside it (another group) go on; nothing fails the engine's step."""
    from services.generator import attention_mass

    mid, _ = memory
    from prometheus_client import REGISTRY

    observed = lambda: REGISTRY.get_sample_value("extmind_generator_memory_attention_share_count") or 0.0  # noqa: E731
    opts = MemoryOptions((mid,), top_k=4, return_citations=cite, max_citations=1000)
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=4), opts)
    want = await run(engine, req)
    elsewhere = engine.generate(GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=60)))
    assert isinstance(await elsewhere.__anext__(), Chunk)

    def summed_shares(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(attention_mass, "summed_shares", summed_shares)
    before = observed()
    got = await run(engine, req)
    assert got[0] == want[0] and got[3].finish_reason == want[3].finish_reason == "length"
    assert got[3].citations == want[3].citations and bool(want[3].citations) == cite
    assert observed() == before  # not measured
    rest = [ev async for ev in elsewhere]
    assert isinstance(rest[-1], Final) and rest[-1].completion_tokens == 60
    monkeypatch.undo()
    d = observed()
    await run(engine, req)
    assert observed() == d + 1  # measured again once the flush works
    assert engine.stats()["active"] == 0
