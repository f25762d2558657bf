"""The guesses of the lookup ahead (memory_lookup.LastResolutions) are bounded in what they hold,
not only in how many: each resolution keeps a position per memory row (and with citations a
token id per row), so 1024 resolutions of large memories would keep the generator's process
holding billions of Python ints after their requests ended."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.generator.memory_lookup import LastResolutions
from services.generator.memory_resolution import ResolvedMemory


def _memory(mid: str, rows: int, tokens: bool = False) -> ResolvedMemory:
    return ResolvedMemory(mid, Timestamp(seconds=1), rows, list(range(rows)) if tokens else [], list(range(rows)))


def _held(last: LastResolutions) -> int:
    """Per-row entries (positions, token ids) the guesses hold."""
    return sum(len(i.positions) + len(i.token_ids) for key in list(last._last) for i in last.get(key))


def test_the_guesses_hold_a_bounded_number_of_rows_whatever_the_memories():
    last = LastResolutions()
    big = _memory("big", 1 << 20, tokens=True)  # one object: the test itself stays small
    for n in range(last.size):
        last.put(((f"m{n}",), True), [big])
    assert _held(last) <= 1 << 22  # ~150 MB of Python ints at most
    assert last.get(((f"m{last.size - 1}",), True)) == [big], "the newest guess is kept"


def test_a_resolution_larger_than_the_bound_is_no_guess_and_drops_none():
    last = LastResolutions()
    small = _memory("small", 16)
    last.put((("small",), False), [small])
    last.put((("huge",), False), [_memory("huge", (1 << 22) + 1)])
    assert last.get((("huge",), False)) is None
    assert last.get((("small",), False)) == [small]


def test_the_least_recently_used_go_first():
    last = LastResolutions()
    a, b, c = (_memory(x, 3 << 19) for x in "abc")  # two fit (3 M positions), not three
    last.put((("a",), False), [a])
    last.put((("b",), False), [b])
    assert last.get((("a",), False)) == [a]  # a used: b is the least recent
    last.put((("c",), False), [c])
    assert last.get((("b",), False)) is None
    assert last.get((("a",), False)) == [a] and last.get((("c",), False)) == [c]
