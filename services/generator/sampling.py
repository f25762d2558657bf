"""A request's Sampling as mlx-lm's per-sequence sampler and logits processors.

Both run on the MLX thread inside ``BatchGenerator.next()`` (a sampler shared by the whole batch in
one call, else one call per sequence; logits processors per sequence), or inside a solo
sequence's ``generate_step`` (solo.py).
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from services.generator.request_types import Sampling


def sampler_for(s: Sampling, vocab_size: int | None = None):
    """-> ``sampler(logprobs [B, V]) -> tokens [B]`` for ``BatchGenerator.insert(samplers=...)``.
    Greedy and unseeded sampling keep no state, so requests with the same settings get the same
    object: the BatchGenerator samples a decode batch that shares one sampler in one call, and
    gives each row its own call (a slice and an op per row, then a concatenation) otherwise.
    ``vocab_size`` (the logits' width V): a top_k of V or more keeps every token, so it is off
    (mlx-lm's apply_top_k raises for it, inside the step of the whole batch)."""
    top_k = 0 if vocab_size is not None and s.top_k >= vocab_size else s.top_k
    if s.temperature == 0:
        return _shared_sampler(0.0, 0.0, 0.0, 0)
    if s.seed is None:
        return _shared_sampler(s.temperature, s.top_p, s.min_p, top_k)
    return SeededSampler(s, top_k)


@functools.lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int):
    return make_sampler(temperature, top_p, min_p, 1, top_k)


class SeededSampler:
    """``sampler(logprobs [1, V]) -> token [1]`` drawing from a per-request key, so a seeded
    request samples the same tokens whatever it is batched with (mlx-lm's own sampler draws from
    the global key, shared by the batch). The key advances one split per draw."""

    def __init__(self, s: Sampling, top_k: int | None = None):
        top_k = s.top_k if top_k is None else top_k  # sampler_for's: 0 for one of the whole vocabulary
        self._key = mx.random.key(s.seed)
        self._before = self._key  # the key of the last draw (``rewind``)
        self._temperature = s.temperature
        self._methods = []
        if 0 < s.top_p < 1:
            self._methods.append(lambda x: apply_top_p(x, s.top_p))
        if s.min_p:
            self._methods.append(lambda x: apply_min_p(x, s.min_p, 1))
        if top_k:
            self._methods.append(lambda x: apply_top_k(x, top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._before = self._key
        self._key, sub = mx.random.split(self._key)
        for f in self._methods:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1 / self._temperature), key=sub)

    def rewind(self) -> None:
        """Undoes the last draw: the scheduler throws away a forward computed ahead (its draw was
        never shown) and runs it again elsewhere (solo.py), which must draw the same token."""
        self._key = self._before


def logits_processors_for(s: Sampling) -> list:
    """-> mlx-lm logits processors (only the repetition penalty; 0 and 1 mean none)."""
    if s.repetition_penalty in (0, 1):
        return []
    return make_logits_processors(repetition_penalty=s.repetition_penalty)
