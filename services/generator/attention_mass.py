"""How much attention goes to the memories: per request, the share of the softmax weight that
falls on the retrieved memories rather than on the local context (docs/extended-mind.md).

While a group has memories, every layer that retrieves appends the share of each query head
[B, H, L] to ``MemoryContext.mass`` (services/generator/extended_attention.py); the record is
split into decode forwards exactly as citations are (``citations.split_forwards``: the forward of
the last prompt token and of each generated token but the last), evaluated with the step, and the
group's ``batch_tally.BatchTally`` adds every few steps each batch row's shares, summed over heads
and forwards, to its request's per-layer sum on the device, for the whole batch in one graph. The host
reads the sum once, when the request ends, and observes two histograms: the request's mean share
over its layers, heads and measured steps, and the mean share of each layer.

Sampled steps: a group measures one decode step in ``--attention-mass-every`` (8 by default; 1 =
every step, 0 = never, nothing recorded), the first step after its requests changed and then every
N-th, so a request that joins is measured early, even a short one. Every measured step costs the
host a few small ops and its share of the flushes; on a GPU, where a decode step is a few
milliseconds of host work, measuring every step cost LOCAL decode ~5 % of its speed (1 B shape,
H200; bench/RESULTS.md, 2026-12-04). The metric is a mean, so a sample of the steps estimates it;
a request whose steps all fell between samples (shorter than N tokens in a busy batch) observes
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from prometheus_client import Histogram

from extmind import errors
from services.generator import device_stack
from services.generator.citations import split_forwards

SHARE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

MEMORY_SHARE = Histogram(
    "extmind_generator_memory_attention_share",
    "per request with memories: mean fraction (0..1) of attention weight on the memories vs the "
    "local context, over its retrieving layers, query heads and measured decode steps (--attention-mass-every)",
    buckets=SHARE_BUCKETS,
)
MEMORY_SHARE_BY_LAYER = Histogram(
    "extmind_generator_memory_attention_share_by_layer",
    "per request with memories and per retrieving layer: mean fraction (0..1) of that layer's "
    "attention weight on the memories, over query heads and measured decode steps",
    ["layer"],
    buckets=SHARE_BUCKETS,
)


class MassSum:
    """One request's per-layer sums of its memory share, on the device, and the steps summed.
    Its group's ``batch_tally.BatchTally`` hands it many forwards' sums at once (``add_row``)."""

    def __init__(self, layers: Sequence[int], num_heads: int):
        self.layers = list(layers)  # the retrieving layers, in forward order
        self.num_heads = num_heads
        self.total = mx.zeros(len(self.layers), dtype=mx.float32)  # sums over steps and query heads
        self.steps = 0

    def add_row(self, sums: mx.array, steps: int) -> None:
        """sums [layers]: this request's shares summed over ``steps`` forwards and the query heads."""
        self.total = self.total + sums
        self.steps += steps

    def means(self) -> dict[int, float]:
        """layer -> the mean share over the steps and query heads (reads the device once); {}
        before any step."""
        if not self.steps:
            return {}
        per_layer = np.array(self.total) / (self.steps * self.num_heads)
        return {layer: float(v) for layer, v in zip(self.layers, per_layer)}


def summed_shares(forwards: list[list[mx.array]]) -> mx.array:
    """The ``BatchTally`` combine of the attention mass: forwards of one batch, each its per-layer
    shares [B, H, 1] (one per query head) -> [B, layers] float32, summed over forwards and heads."""
    flat = [a for fwd in forwards for a in fwd]
    layers = len(forwards[0])
    if layers > 1 and flat[0].ndim == 3 and all(len(f) == layers for f in forwards) and device_stack.uniform(flat):
        # Forwards kept layer by layer (not compacted, BatchTally.add): all of them in one stack.
        B, H = flat[0].shape[:2]
        stacked = device_stack.stack(flat, axis=-1, checked=True)  # [B, H, 1, forwards * layers]
        return mx.sum(stacked.reshape(B, H, len(forwards), layers).astype(mx.float32), axis=(1, 2))
    steps = [fwd[0] if len(fwd) == 1 else mx.concatenate(fwd, axis=-1) for fwd in forwards]  # [B, H, layers]
    if device_stack.uniform(steps):
        stacked = device_stack.stack(steps, axis=1, checked=True)  # [B, forwards, H, layers]: one launch on CUDA
    else:
        stacked = mx.stack(steps, axis=1)
    return mx.sum(stacked.astype(mx.float32), axis=(1, 2))


def stack_shares(shares: list[mx.array]) -> list[mx.array]:
    """``BatchTally``'s compact for the attention mass: one forward's per-layer shares [B, H, 1]
    -> [[B, H, layers]], what ``summed_shares`` concatenates them to, in one kernel launch on CUDA
    (``device_stack``); shares of different shapes or dtypes stay as they are."""
    if len(shares) < 2 or not device_stack.uniform(shares):
        return shares
    return [device_stack.stack([a.reshape(a.shape[0], -1) for a in shares], axis=-1, checked=True)]


def forward_shares(
    record: list, layers_per_forward: int, generated: Sequence[int], started: Sequence[int]
) -> list[tuple[list[int], list[mx.array]]]:
    """The mass record of one ``next()`` call ((layer, per-head shares [B, H, L])) -> (uids,
    per-layer [B, H, 1]) per decode forward. Raises Internal when the layout is not the one
    citations assume."""
    out = split_forwards(record, layers_per_forward, generated, started, "attention mass")
    for _, fwd in out:
        if any(a.ndim != 3 or a.shape[2] != 1 for a in fwd):
            raise errors.Internal(f"attention mass: a decode forward recorded shapes {[tuple(a.shape) for a in fwd]}")
    return out


def observe(means: dict[int, float]) -> None:
    """Observes one ended request's per-layer means (nothing when it had no step)."""
    if not means:
        return
    MEMORY_SHARE.observe(sum(means.values()) / len(means))
    for layer, v in means.items():
        MEMORY_SHARE_BY_LAYER.labels(str(layer)).observe(v)
