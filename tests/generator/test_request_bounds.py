"""Counts without an upper bound of their own and lists of layers, as both faces read them: a huge
max_tokens / max_citations is capped (the engine caps it by the context, as the gRPC fields), a
count below its floor is refused with its real bound, and a layer listed twice is refused."""

from __future__ import annotations

import pytest

from extmind import errors
from services.common.http_common import BadField
from services.generator.openai_protocol import parse_chat, parse_completion
from services.generator.request_types import MemoryOptions

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("value", [2**31 - 1, 2**31, 2**32 - 1, 10**30])
def test_a_huge_max_tokens_is_capped_not_refused(value):
    assert parse_completion({"prompt": "x", "max_tokens": value}).sampling.max_tokens == 2**31 - 1
    chat = parse_chat({"messages": MESSAGES, "max_completion_tokens": value})
    assert chat.sampling.max_tokens == 2**31 - 1


@pytest.mark.parametrize("value", [0, -1, -(2**40)])
def test_max_tokens_below_one_names_its_real_bound(value):
    with pytest.raises(BadField, match=f"'max_tokens' is {value}; it must be >= 1$"):
        parse_completion({"prompt": "x", "max_tokens": value})


def test_max_citations_is_capped_and_never_negative():
    body = {"prompt": "x", "extmind": {"memory_ids": ["m"], "max_citations": 2**32}}
    assert parse_completion(body).memory.max_citations == 2**31 - 1
    body["extmind"]["max_citations"] = -1
    with pytest.raises(BadField, match="must be >= 0$"):
        parse_completion(body)


def test_a_layer_listed_twice_is_invalid_argument():
    MemoryOptions(("m",), layers=(0, 2)).validate(4)
    with pytest.raises(errors.InvalidArgument, match=r"layers lists \[0\] more than once"):
        MemoryOptions(("m",), layers=(0, 2, 0)).validate(4)
