"""Citations (docs/extended-mind.md), counted live from the retrievals a request's own forwards made.

A request's citations count, per memory row, the retrievals of every layer and head at every
generated step: the forward of the last prompt token (it produces the first token) and the
forward of each generated token but the last (whose output is never used). Nothing is replayed:
while a group has a request that wants citations, every layer with memories appends its top-k
rows ``[B, H, L, k]`` (-1 = masked by the threshold)
to ``MemoryContext.record``, and after each ``BatchGenerator.next()`` the scheduler evaluates them
with the step (they are tiny) and hands them to its group's ``batch_tally.BatchTally``, which
every few steps scatter-adds each batch row's picks, on the device, into its request's ``Counts``
(``[rows + 1]``, the last slot takes masked picks), for the whole batch in one graph. Requests that did not
ask for citations are never tallied; the host sees one counts vector per request, at its end.

Which forward is which comes from the order in which mlx-lm 0.32's ``BatchGenerator._next``
runs them and from the responses it returns:

1. the decode forward of the generation batch (if it had rows): one query per row, rows in the
   order of the generation responses, which hold one response per row;
2. the first decode forward of the sequences whose prompt has just been prefilled (if any): rows
   in the order of the prompt responses with ``end_of_prompt``;
3. prefill chunks of other prompts (never counted: they produce no token).

Each forward must match its expected batch size and have one query per row; otherwise the layout
is not the one assumed here and ``decode_forwards`` raises instead of counting approximately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from extmind import errors
from services.generator import device_stack


@dataclass
class Picks:
    """One layer's retrievals in one forward, as recorded for citations: rows [B, H, L, k] int32
    (-1 = masked by the threshold; from the fused decode kernel, also by the citation floor,
    which it applies itself). With a citation floor otherwise, also the picks' raw q . k ``dots``
    [B, H, L, k] float32, each head's total softmax ``mass`` on its memories [B, H, L] float32 and
    the layer's ``scale``: the picks' weights are computed from them only when counted
    (``memory_weights``), in one graph for many steps, so a step launches nothing for them."""

    rows: mx.array
    dots: mx.array | None = None
    mass: mx.array | None = None
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape)

    @property
    def size(self) -> int:
        """Picks of the whole batch (``BatchTally`` bounds what its pending forwards hold)."""
        return self.rows.size

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.rows, self.dots, self.mass) if a is not None]


def stack_picks(picks: list[Picks]) -> list[Picks]:
    """``BatchTally``'s compact for citations: one forward's per-layer Picks [B, H, 1, k] -> [one
    Picks [B, layers, H, 1, k]] (mass [B, layers, H, 1]), which ``picked_rows`` takes as it takes
    the layers one by one; stacked in one kernel launch per array on CUDA (``device_stack``).
    Layers of different scales, some with and some without weights, or arrays of different dtypes
    (which ``device_stack`` does not promote) stay as they are."""
    fields = list(zip(*(p.arrays() for p in picks)))  # rows[, dots, mass], each over the layers
    if (
        len(picks) < 2
        or len({(p.scale, p.dots is None) for p in picks}) != 1
        or not all(map(device_stack.uniform, fields))
    ):
        return picks
    stacked = [device_stack.stack(list(arrays), axis=1, checked=True) for arrays in fields]
    return [Picks(*stacked, scale=picks[0].scale) if len(stacked) == 3 else Picks(stacked[0])]


def memory_weights(rows: mx.array, dots: mx.array, mass: mx.array, scale: float) -> mx.array:
    """Each retrieved memory's softmax weight [..., k] float32 from rows / raw dots [..., k] (-1 =
    masked) and ``mass`` [...] (the head's total weight on its memories). One softmax covers
    memories and local positions, so a memory's weight is its share among the memories times
    their total: exp(s_i) / Z = softmax_memories(s)_i * mass (docs/extended-mind.md "Citations")."""
    logits = mx.where(rows >= 0, dots * scale, -mx.inf)
    top = mx.max(logits, axis=-1, keepdims=True)
    e = mx.where(rows >= 0, mx.exp(logits - mx.where(mx.isfinite(top), top, 0.0)), 0.0)
    return e / mx.maximum(mx.sum(e, axis=-1, keepdims=True), 1e-30) * mass[..., None]


@dataclass
class Citation:
    memory_id: str
    token_start: int
    token_end: int
    text: str
    hits: int
    row_hits: list[int] = field(default_factory=list)  # per memory row of the span (the proto sends the sum)


def split_forwards(
    record: list, layers_per_forward: int, generated: Sequence[int], started: Sequence[int], what: str = "citations"
) -> list[tuple[list[int], list[mx.array]]]:
    """Splits one ``next()`` call's per-layer record into its decode forwards.

    record: (layer, array or Picks [B, ...]) in call order; generated: the uids of the generation
    responses in order; started: the uids whose prompt ended in this call, in order.
    Returns (uids, the forward's arrays in layer order) per decode forward; raises Internal when
    the record is not a whole number of forwards or a forward's batch is not its uids."""
    if layers_per_forward <= 0 or len(record) % layers_per_forward:
        raise errors.Internal(
            f"{what}: {len(record)} recorded layers is not a whole number of forwards of {layers_per_forward} layers"
        )
    forwards = [record[i : i + layers_per_forward] for i in range(0, len(record), layers_per_forward)]
    plan = [list(u) for u in (generated, started) if u]
    if len(forwards) < len(plan):
        raise errors.Internal(f"{what}: expected {len(plan)} decode forwards, {len(forwards)} were recorded")
    out = []
    for uids, fwd in zip(plan, forwards):
        for _, a in fwd:
            if a.shape[0] != len(uids):
                raise errors.Internal(
                    f"{what}: a decode forward of {len(uids)} sequences recorded an array of shape {tuple(a.shape)}"
                )
        out.append((uids, [a for _, a in fwd]))
    return out


def decode_forwards(
    record: list, layers_per_forward: int, generated: Sequence[int], started: Sequence[int]
) -> list[tuple[list[int], list[mx.array]]]:
    """``split_forwards`` of the citations record (layer, Picks [B, H, L, k]), checking that
    every decode forward has one query per row. Returns (uids, the forward's per-layer Picks)."""
    out = split_forwards(record, layers_per_forward, generated, started)
    for uids, fwd in out:
        for a in fwd:
            if a.shape[2] != 1:
                raise errors.Internal(
                    f"citations: a decode forward of {len(uids)} sequences recorded indices of "
                    f"shape {tuple(a.shape)}; expected [{len(uids)}, H, 1, k]"
                )
    return out


class Counts:
    """One request's retrieval counts, kept on the device: one slot per memory row plus one for
    masked picks (the last). Its group's ``batch_tally.BatchTally`` hands it the picks of many
    forwards at once (``add_row``); the host reads the counts once (``read``)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.total = mx.zeros(rows + 1, dtype=mx.int32)

    def add_row(self, picked: mx.array, steps: int) -> None:
        """picked: this request's picks of ``steps`` forwards, flat int32 rows (-1 = not counted)."""
        self.total = self.total.at[mx.where(picked >= 0, picked, self.rows)].add(1)

    def read(self) -> np.ndarray:
        """The per-row counts [rows] int32 (reads the device once)."""
        return np.array(self.total[:-1])


def picked_rows(forwards: list[list[Picks]], min_weight: float = 0.0) -> mx.array:
    """The ``BatchTally`` combine of citations: forwards of one batch, each its per-layer Picks
    [B, H, 1, k] -> [B, M] int32 rows, the picks of every forward and layer, -1 where masked by
    the threshold or, with ``min_weight`` > 0, where the pick's softmax weight
    (``memory_weights``, from the recorded dots, memory mass and layer scale) is below it. Picks
    without dots count as recorded (with a floor: rows the fused decode kernel floored itself)."""
    picks = [p for fwd in forwards for p in fwd]
    B, k = picks[0].rows.shape[0], picks[0].rows.shape[-1]
    weigh = min_weight > 0
    final = [p.rows for p in picks if not (weigh and p.dots is not None)]
    picks = [p for p in picks if weigh and p.dots is not None]
    if not picks:
        return _joined(final, (B, -1))
    out = [_joined(final, (B, -1))] if final else []
    for scale in dict.fromkeys(p.scale for p in picks):  # layers of one scale in one graph
        same = [p for p in picks if p.scale == scale]
        rows = _joined([p.rows for p in same], (B, -1, k))
        dots = _joined([p.dots for p in same], (B, -1, k)).astype(mx.float32)
        mass = _joined([p.mass for p in same], (B, -1)).astype(mx.float32)
        w = memory_weights(rows, dots, mass, scale)
        out.append(mx.where(w >= min_weight, rows, -1).reshape(B, -1))
    return mx.concatenate(out, axis=1)


def _joined(arrays: list[mx.array], shape: tuple) -> mx.array:
    """The arrays [B, ...] reshaped to ``shape`` and joined along axis 1: stacked in one kernel
    launch (``device_stack``) when they have one shape and dtype, else concatenated (which
    promotes mixed dtypes)."""
    if device_stack.uniform(arrays):
        return device_stack.stack(arrays, axis=1, checked=True).reshape(shape)
    return mx.concatenate([a.reshape(shape) for a in arrays], axis=1)


# Retrieval spreads over the whole bank (every layer and head picks k rows at every step), so
# nearly every row is retrieved a few times; only rows retrieved clearly more often than the
# average row of their memory say where the model looked. Hot = at least HOT_FACTOR x the mean.
HOT_FACTOR = 2.0
# Hot rows at most this many cold rows apart belong to one span (words split into sub-tokens).
MAX_GAP = 2


def hot_rows(c: np.ndarray) -> np.ndarray:
    """Indices of the rows of one memory retrieved at least HOT_FACTOR x as often as its average
    row; when none is (near-uniform counts), the most retrieved rows."""
    if not c.any():
        return np.empty(0, np.int64)
    hot = np.flatnonzero(c >= max(HOT_FACTOR * c.mean(), 1.0))
    return hot if len(hot) else np.flatnonzero(c == c.max())


def _excerpt(decode: Callable[[list[int]], str], token_ids) -> str:
    """A span's text. A span of byte-level tokens may start or end inside a character (its other
    bytes in the tokens around it), which decodes to U+FFFD: those halves are left out."""
    return decode(token_ids).strip("\ufffd")


def spans(counts: np.ndarray, memories, decode: Callable[[list[int]], str], limit: int) -> list[Citation]:
    """Per-row counts over the request's concatenated memories -> the most retrieved spans:
    hot rows (``hot_rows``) merged into spans across gaps of at most MAX_GAP rows, ranked by
    their hits (the sum of their rows' counts).

    memories: objects with memory_id, rows, token_ids and positions (row -> token position).
    Only the ``limit`` spans returned are decoded (a long request over a large memory may have
    hundreds of spans, and a decode costs tens of microseconds)."""
    found, offset = [], 0  # (hits, memory id, token start, memory, its counts, first row, last row)
    for info in memories:
        c = counts[offset : offset + info.rows]
        offset += info.rows
        hit = hot_rows(c)
        if not len(hit):
            continue
        breaks = np.flatnonzero(np.diff(hit) > MAX_GAP + 1) + 1
        for run in np.split(hit, breaks):
            a, b = int(run[0]), int(run[-1])
            found.append((int(c[a : b + 1].sum()), info.memory_id, info.positions[a], info, c, a, b))
    found.sort(key=lambda f: (-f[0], f[1], f[2]))
    return [
        Citation(
            info.memory_id,
            start,
            info.positions[b] + 1,
            _excerpt(decode, info.token_ids[a : b + 1]) if info.token_ids else "",
            hits,
            [int(x) for x in c[a : b + 1]],
        )
        for hits, _, start, info, c, a, b in found[:limit]
    ]
