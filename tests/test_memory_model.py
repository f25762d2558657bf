"""The committed fact model answers from its extended mind, through the real services.

20 held-out people (seed 2; training used seed 0): each document is memorized through the
generator (Memorize -> memory service), then the question alone is asked with and without that
memory, and with all 20 memories at once. With memory (its own, or all 20) the model must know at
least 17 answers; without, at most 4 (guessing).
"""

from __future__ import annotations

import pytest

from bench.memory_qa import DEFAULT_MODEL, Cluster, answer_of
from extmind.v1 import generator_pb2
from training import facts

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the committed checkpoint is missing"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(DEFAULT_MODEL, tmp_path_factory.mktemp("memqa"))
    yield c
    c.close()


def test_answers_come_from_memory(cluster):
    pairs = facts.eval_set(2, 20)
    ids = [cluster.memorize(doc) for doc, _ in pairs]
    with_memory = among_all = without = 0
    for mid, (_, qa) in zip(ids, pairs):
        want = qa.answer.strip()
        with_memory += answer_of(cluster.ask(qa.question, [mid], top_k=10).text) == want
        # All 20 people's memories at once (~800 rows per layer): the right person's fact must be
        # found among the others'.
        among_all += answer_of(cluster.ask(qa.question, ids, top_k=10).text) == want
        without += answer_of(cluster.ask(qa.question).text) == want
    assert with_memory >= 17, f"{with_memory}/20 answered from memory"
    assert among_all >= 17, f"{among_all}/20 answered with all 20 memories attached"
    assert without <= 4, f"{without}/20 answered without memory"


def test_memorized_rows_are_the_document_without_bos(cluster):
    doc, _ = facts.eval_set(3, 1)[0]
    reply = cluster.generator.Memorize(generator_pb2.MemorizeRequest(text=doc), timeout=60)
    assert reply.num_rows == reply.num_tokens - 1  # BOS dropped, every text token kept


def test_newlines_are_memorized_and_cited_as_text(cluster):
    # The model stops generating at a newline (an end token of its config), but a newline in a
    # memorized text is text: its rows are kept and cited spans read as the document does.
    doc, qa = facts.eval_set(4, 1)[0]
    text = doc.replace(". ", ".\n")
    reply = cluster.generator.Memorize(generator_pb2.MemorizeRequest(text=text), timeout=60)
    assert "\n" in text and reply.num_rows == reply.num_tokens - 1
    answer = cluster.ask(qa.question, [reply.memory_id], top_k=10, citations=True)
    assert answer.citations
    for c in answer.citations:
        assert c.text in text, c.text  # newlines included, no words run together
