"""Generate keeps its answer within --max-response-mb (what stock gRPC clients receive): a request
that could pass it is refused up front with INVALID_ARGUMENT naming the limit and GenerateStream."""

from __future__ import annotations

import pytest

from extmind.errors import InvalidArgument
from extmind.v1 import generator_pb2 as g
from services.generator.servicer import GeneratorServicer


async def test_generate_over_the_response_budget_is_refused_up_front(plain_engine):
    servicer = GeneratorServicer(plain_engine, max_response_bytes=1000)  # 58 tokens with logprobs (17 bytes each)
    with pytest.raises(InvalidArgument) as info:
        await servicer.Generate(
            g.GenerateRequest(
                prompt="The river flows to", return_logprobs=True, sampling=g.SamplingParams(max_tokens=100)
            ),
            None,
        )
    for needle in ("0.000954 MiB", "--max-response-mb", "GenerateStream", "at most 58 tokens"):
        assert needle in info.value.message, info.value.message
    with pytest.raises(InvalidArgument):  # the default max_tokens (256) does not fit either
        await servicer.Generate(g.GenerateRequest(prompt="The river flows to"), None)
    r = await servicer.Generate(
        g.GenerateRequest(prompt="The river flows to", return_logprobs=True, sampling=g.SamplingParams(max_tokens=40)),
        None,
    )
    assert 0 < len(r.logprobs) == len(r.token_ids) <= 40 and r.ByteSize() <= 1000
    # GenerateStream is the way out: each message carries one step.
    parts = [
        p
        async for p in servicer.GenerateStream(
            g.GenerateStreamRequest(
                prompt="The river flows to", return_logprobs=True, sampling=g.SamplingParams(max_tokens=100)
            ),
            None,
        )
    ]
    assert all(p.ByteSize() <= 1000 for p in parts) and sum(len(p.token_ids) for p in parts) > 40


async def test_the_default_budget_is_what_stock_clients_receive(plain_engine):
    servicer = GeneratorServicer(plain_engine)
    assert servicer.max_response_bytes == 4 << 20
    r = await servicer.Generate(
        g.GenerateRequest(prompt="The river flows to", return_logprobs=True, sampling=g.SamplingParams(max_tokens=8)),
        None,
    )
    assert len(r.token_ids) == len(r.logprobs) > 0
