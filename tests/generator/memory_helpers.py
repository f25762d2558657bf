"""Shared pieces of the memory tests (tests/generator/test_memories.py, test_citations.py): the
memorized text, the numpy model's memory, the tie-aware comparisons of discrete outcomes, and a
memory deleted and created again under its id (test_memory_incarnation.py, test_remote_stream.py),
memory lookups held in their worker thread (test_coalesce.py, test_lookup_ahead.py)."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from extmind import tensor
from extmind.v1 import memory_pb2
from services.generator.memory_client import MemoryClient
from services.generator.request_types import Chunk

from .np_reference import Retrievals

TEXT = (
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy. "
    "Alice met Bob at the station at noon. They talked about music, books, weather and trains. "
    "Water boils at one hundred degrees Celsius at sea level."
)
SHORT_TEXT = "Alice met Bob at the station at noon. They talked about music and trains."


def ref_memory(ref, tokens, special):
    cap = []
    ref.forward(tokens, capture=cap)
    keep = [p for p, t in enumerate(tokens) if t not in special]
    return [(k[:, keep], v[:, keep]) for k, v in cap], keep


# float32 vs float64 logits differ by ~1e-5 here; a greedy token is compared only where the
# reference's best logit beats the second by far more than that.
LOGIT_MARGIN = 1e-3


def assert_decidable(margins):
    worst = min(margins)
    assert worst > LOGIT_MARGIN, (
        f"the reference's two best logits are {worst:.2e} apart at step "
        f"{margins.index(worst)}: too close to compare greedy tokens; pick another prompt"
    )


def assert_counts_match(got: dict, want: Retrievals):
    """Per-row counts equal the reference's, except rows inside the tie slack (see Retrievals)."""
    bad = want.mismatches(got)
    assert not bad, "retrieval counts differ from the numpy model:\n" + "\n".join(bad)
    assert want.ambiguous <= want.events // 4, f"{want.ambiguous} of {want.events} retrievals were ties"


def row_hits(final, tokens, tokenizer) -> dict[int, int]:
    """The request's per-row retrieval counts (rows are the non-BOS tokens: row = position - 1),
    after checking that its citation spans are made of them: each span's hits are the sum of its
    rows' counts, its text decodes its tokens, spans do not overlap, every hot row (>= 2x the mean
    count) and the most retrieved row are cited, and spans come most retrieved first."""
    counts = final.row_counts
    assert counts is not None and len(counts) == len(tokens) - 1
    covered = set()
    for c in final.citations:
        assert 1 <= c.token_start < c.token_end <= len(tokens)
        rows = range(c.token_start - 1, c.token_end - 1)
        assert c.row_hits == [int(counts[r]) for r in rows] and c.hits == sum(c.row_hits)
        assert c.text == tokenizer.decode(tokens[c.token_start : c.token_end])
        assert covered.isdisjoint(rows)
        covered.update(rows)
    hot = {int(r) for r in np.flatnonzero(counts >= max(2 * counts.mean(), 1))} or {int(np.argmax(counts))}
    assert hot <= covered and int(np.argmax(counts)) in covered
    hits = [c.hits for c in final.citations]
    assert hits == sorted(hits, reverse=True)
    return {int(r): int(n) for r, n in enumerate(counts) if n}


async def timed(engine, req):
    """run() plus the times of the first chunk and of the end (to prove two requests overlapped)."""
    chunks, final, first = [], None, None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            first = first or time.monotonic()
            chunks.append(ev)
        else:
            final = ev
    return [t for c in chunks for t in c.token_ids], final, first, time.monotonic()


def recreate_memory(
    client: MemoryClient, src: str, dst: str, *, reverse: bool = False, fingerprint: str | None = None
) -> None:
    """Deletes memory ``dst`` and creates it again under its id with ``src``'s token ids, layout
    and rows (as a client that rebuilds a memory under its old name), through the memory service
    alone; ``reverse``: each layer's rows in reverse order (another memory of the same size);
    ``fingerprint``: another model's (default: ``src``'s)."""
    m = client.get_memory(src, include_tokens=True)
    rows = client.fetch_stored(src, m.layout.num_layers)
    client.delete_memory(dst)
    client.create_memory(
        memory_id=dst,
        layout=m.layout,
        fingerprint=fingerprint or m.model_fingerprint,
        token_ids=m.token_ids,
        positions=m.positions,
        labels={},
    )
    order = slice(None, None, -1 if reverse else 1)
    client.append(
        memory_pb2.AppendMemoryRequest(
            memory_id=dst,
            layer=layer,
            keys=tensor.encode(np.ascontiguousarray(rows.keys[layer][:, order]), dtype=rows.dtype),
            values=tensor.encode(np.ascontiguousarray(rows.values[layer][:, order]), dtype=rows.dtype),
        )
        for layer in range(m.layout.num_layers)
    )


@contextlib.contextmanager
def held_lookups(engine, monkeypatch, *, first_only: bool = False):
    """The engine's memory lookups (every one, or only the first) pause right after their
    GetMemory answered, until the block ends or ``release`` is set. Yields (release, begun,
    answered): that event, and lists with an item per lookup begun / answered."""
    resolve = engine.resolver.resolve
    release, begun, answered = threading.Event(), [], []

    def slow(*a, **kw):
        begun.append(1)
        try:
            return resolve(*a, **kw)
        finally:
            answered.append(1)
            if not first_only or len(answered) == 1:
                release.wait(20)

    monkeypatch.setattr(engine.resolver, "resolve", slow)
    try:
        yield release, begun, answered
    finally:
        release.set()
