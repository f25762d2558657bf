"""The demo's flow through the public gRPC APIs, with its results checked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from extmind import demo
from extmind.channels import sync_channel
from extmind.cluster_config import FACTS_MODEL
from extmind.v1 import generator_pb2, memory_pb2, memory_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def result(cluster):
    lines: list[str] = []
    res = demo.run(cluster.settings(), out=lines.append, keep=True)
    res["lines"] = lines
    return res


def test_documents_are_found_in_the_right_order(result):
    assert sorted(result["upsert"].ids) == sorted(d[0] for d in demo.DOCUMENTS)
    info = result["embedder_info"]
    default = next(m for m in info.models if m.name == info.default_model)
    assert (result["upsert"].model, result["upsert"].dimensions) == (default.name, default.dimensions)
    for s in result["searches"]:
        ids = [h[0] for h in s.hits]
        scores = [h[1] for h in s.hits]
        assert len(ids) == 3, s
        assert ids[0] == s.expected, f"{s.query!r}: expected {s.expected} first, got {s.hits}"
        assert scores == sorted(scores, reverse=True)
        # the right document is clearly ahead, not a coin toss
        assert scores[0] - scores[1] > 0.05, s


def test_memory_is_ready_with_the_right_token_count(cluster, result):
    m, mem = result["memorize"], result["memory"]
    gi = result["generator_info"]
    assert m.memory_id == demo.MEMORY_ID == mem.memory_id
    assert mem.state == memory_pb2.MEMORY_STATE_READY
    # Independent count: the model directory's tokenizer loaded by transformers.
    model_dir = FACTS_MODEL
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(demo.STORY).input_ids
    assert m.num_tokens == len(ids)
    specials = sum(1 for i in ids if i in set(tok.all_special_ids))
    assert m.num_rows == mem.num_tokens == len(ids) - specials
    assert mem.layout.num_layers == gi.num_layers and mem.layout.num_kv_heads == gi.num_kv_heads
    assert mem.layout.head_dim == gi.head_dim
    assert mem.model_fingerprint == gi.model_fingerprint


def test_generation_with_and_without_memory(cluster, result):
    plain, mind, mem = result["plain"], result["with_memory"], result["memory"]
    for r in (plain, mind):
        assert r.usage.completion_tokens > 0
        # usage counts every token the model produced; an end token (STOP) is not returned
        ended = r.finish_reason == generator_pb2.FINISH_REASON_STOP
        assert len(r.token_ids) == r.usage.completion_tokens - (1 if ended else 0)
        assert r.usage.prompt_tokens > 0
    assert not plain.citations
    assert mind.citations, "generation with a memory and return_citations gave no citations"
    # Citations point into the memorized text: the span's tokens decode to its text, which is
    # part of the story.
    with sync_channel(cluster.url("memory")) as ch:
        full = (
            memory_pb2_grpc.MemoryServiceStub(ch)
            .GetMemory(memory_pb2.GetMemoryRequest(memory_id=mem.memory_id, include_tokens=True), timeout=30)
            .memory
        )
    tok = AutoTokenizer.from_pretrained(str(FACTS_MODEL))
    text_ids = tok(demo.STORY).input_ids  # the memorized text's tokens (BOS included)
    # Rows are the text's non-special tokens, each with its position in the text.
    assert [text_ids[p] for p in full.positions] == list(full.token_ids)
    assert len(full.token_ids) == mem.num_tokens
    hits = [c.hits for c in mind.citations]
    assert hits == sorted(hits, reverse=True) and hits[0] > 0
    for c in mind.citations:
        assert c.memory_id == mem.memory_id
        # [token_start, token_end) is a span of the memorized text's tokens, made of stored rows.
        assert 0 <= c.token_start < c.token_end <= result["memorize"].num_tokens, c
        assert set(range(c.token_start, c.token_end)) <= set(full.positions), c
        assert c.text == tok.decode(text_ids[c.token_start : c.token_end]), c
        assert c.text.strip() and c.text.strip() in demo.STORY, c


def test_demo_output_reads_at_a_glance(result):
    text = "\n".join(result["lines"])
    assert text.count("[ok]") == len(demo.QUERIES), text
    assert "READY" in text and "citations" in text and "meaningless" in text
    # Spans are half-open: printed as slices ("tokens [8:9]" is one token), never "8-9".
    spans = re.findall(r"tokens (\S+) +hits", text)
    assert spans and all(re.fullmatch(r"\[\d+:\d+\]", s) for s in spans), spans
    for line in result["lines"]:
        assert len(line) <= 140, line


def test_the_printed_total_counts_every_step(result):
    """ "done: N s in calls" sums every call the demo timed, step 4 (the facts) included: it used
    to stop at step 3 and print about half of what the calls took."""
    facts = result["facts"]
    assert facts and all(f["calls_seconds"] > f["seconds"] > 0 for f in facts)
    parts = (
        sum(r.seconds for r in result["searches"]) + sum(f["calls_seconds"] for f in facts),
        result["calls_seconds"],
    )
    assert parts[1] > parts[0] > 0
    assert f"extmind demo done: {result['calls_seconds']:.2f}s in calls" in "\n".join(result["lines"])


def test_the_facts_come_from_memory(result):
    """Step 4 attaches all three fact memories to every question: the trained default model must
    find the asked person's fact among the others, and must not know it without memory."""
    facts = result["facts"]
    right = sum(f["with"] == f["answer"] for f in facts)
    guessed = sum(f["without"] == f["answer"] for f in facts)
    assert right >= len(facts) - 1, facts
    assert guessed <= 1, facts
    for f in facts:
        assert f["citations"] and {c.memory_id for c in f["citations"]} <= {m for m, _, _ in demo.FACTS}


def test_each_question_cites_its_own_persons_memory_first(result):
    """Citations count only the memories the attention used (citation_min_weight): with all three
    fact memories attached, the most cited memory of each question is the asked person's (a
    memory only retrieved, not read, would not be cited)."""
    asked = [mid for mid, _, questions in demo.FACTS for _ in questions]
    facts = result["facts"]
    assert len(asked) == len(facts)
    for mid, f in zip(asked, facts):
        hits: dict[str, int] = {}
        for c in f["citations"]:
            hits[c.memory_id] = hits.get(c.memory_id, 0) + c.hits
        assert max(hits, key=hits.get) == mid, (f["question"], hits)


def test_demo_module_runs(cluster):
    r = subprocess.run(
        [sys.executable, "-m", "extmind.demo"], env=cluster.env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "extmind demo done" in r.stdout and "Traceback" not in r.stderr
    # `make up` runs the demo every time: it leaves none of its data in the user's store
    assert "removed its data again" in r.stdout
    with sync_channel(cluster.url("memory")) as ch:
        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        ids = [m.memory_id for m in stub.ListMemories(memory_pb2.ListMemoriesRequest(), timeout=30).memories]
        names = [c.name for c in stub.ListCollections(memory_pb2.ListCollectionsRequest(), timeout=30).collections]
    assert not [i for i in ids if i.startswith("extmind-demo")] and demo.COLLECTION not in names, (ids, names)
