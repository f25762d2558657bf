"""Citation spans from per-row retrieval counts (docs/extended-mind.md): hot rows only, merged
across small gaps, most retrieved first, mapped back to token positions and text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.generator.citations import spans


@dataclass
class Mem:
    memory_id: str
    rows: int
    token_ids: list
    positions: list


def _mem(mid, rows, first_position=1):
    return Mem(mid, rows, list(range(100, 100 + rows)), list(range(first_position, first_position + rows)))


def _decode(ids):
    return " ".join(str(i) for i in ids)


def test_hot_rows_merge_across_small_gaps_and_rank_by_hits():
    c = np.ones(20, np.int64)  # background: every row retrieved once (mean ~2.6)
    c[3], c[4], c[6] = 9, 7, 8  # one span 3..6 (row 5 is a cold gap of one row)
    c[15] = 20  # a single very hot row
    out = spans(c, [_mem("m", 20)], _decode, limit=10)
    assert [(s.token_start, s.token_end) for s in out] == [(4, 8), (16, 17)]  # positions = row + 1
    assert [s.hits for s in out] == [9 + 7 + 1 + 8, 20]
    assert out[0].row_hits == [9, 7, 1, 8] and out[0].text == "103 104 105 106"


def test_gaps_wider_than_two_rows_split_spans_and_limit_keeps_the_best():
    c = np.zeros(30, np.int64)
    c[[2, 6, 20]] = [5, 6, 4]  # rows 2 and 6 are 3 cold rows apart: two spans
    out = spans(c, [_mem("m", 30)], _decode, limit=2)
    assert [(s.token_start, s.hits) for s in out] == [(7, 6), (3, 5)]


def test_only_the_spans_returned_are_decoded():
    c = np.zeros(400, np.int64)
    c[::4] = np.arange(100) + 1  # 100 single-row spans, 3 cold rows apart, hits 1..100
    decoded = []
    out = spans(c, [_mem("m", 400)], lambda ids: decoded.append(list(ids)) or _decode(ids), limit=3)
    assert [s.hits for s in out] == [100, 99, 98] and [s.text for s in out] == ["496", "492", "488"]
    assert decoded == [[496], [492], [488]]


def test_uniform_counts_cite_the_most_retrieved_rows_only():
    c = np.full(10, 3, np.int64)
    c[7] = 4  # no row reaches 2x the mean: fall back to the maximum
    out = spans(c, [_mem("m", 10)], _decode, limit=5)
    assert [(s.token_start, s.token_end, s.hits) for s in out] == [(8, 9, 4)]


def test_several_memories_are_cited_separately_and_unretrieved_ones_not_at_all():
    a, b, z = _mem("a", 5), _mem("b", 4, first_position=10), _mem("z", 3)
    counts = np.array([0, 0, 6, 0, 0] + [1, 1, 1, 12] + [0, 0, 0])
    out = spans(counts, [a, b, z], _decode, limit=5)
    assert [(s.memory_id, s.token_start, s.token_end, s.hits) for s in out] == [("b", 13, 14, 12), ("a", 3, 4, 6)]


def test_a_span_cut_inside_a_character_leaves_out_its_half():
    """Byte-level tokens split a multi-byte character; a span that starts or ends between its bytes
    decodes to U+FFFD at that edge: the citation's text leaves the half character out."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from extmind.cluster_config import FACTS_MODEL

    tok = load_tokenizer(FACTS_MODEL)
    ids = tok.encode("🦄💥 日本語のテキスト and more", add_special_tokens=False)
    cut = [
        (a, b)
        for a in range(len(ids))
        for b in range(a + 1, len(ids))
        if tok.decode(ids[a : b + 1]).startswith("\ufffd") and tok.decode(ids[a : b + 1]).strip("\ufffd")
    ]
    assert cut, "no span of these tokens starts inside a character: the test needs byte-level tokens"
    a, b = cut[0]
    c = np.zeros(len(ids), np.int64)
    c[a : b + 1] = 10
    mem = Mem("m", len(ids), ids, list(range(len(ids))))
    (s,) = spans(c, [mem], tok.decode, limit=5)
    assert (s.token_start, s.token_end) == (a, b + 1)
    assert s.text == tok.decode(ids[a : b + 1]).strip("\ufffd") and "\ufffd" not in s.text
