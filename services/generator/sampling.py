"""A request's Sampling as mlx-lm's per-sequence sampler and logits processors.

Both run on the MLX thread inside ``BatchGenerator.next()``, one per sequence of the batch, or
inside a solo sequence's ``generate_step`` (solo.py).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from services.generator.request_types import Sampling


def sampler_for(s: Sampling):
    """-> ``sampler(logprobs [1, V]) -> token [1]`` for ``BatchGenerator.insert(samplers=...)``."""
    if s.temperature == 0 or s.seed is None:
        return make_sampler(s.temperature, s.top_p, s.min_p, 1, s.top_k)
    return SeededSampler(s)


class SeededSampler:
    """``sampler(logprobs [1, V]) -> token [1]`` drawing from a per-request key, so a seeded
    request samples the same tokens whatever it is batched with (mlx-lm's own sampler draws from
    the global key, shared by the batch). The key advances one split per draw."""

    def __init__(self, s: Sampling):
        self._key = mx.random.key(s.seed)
        self._before = self._key  # the key of the last draw (``rewind``)
        self._temperature = s.temperature
        self._methods = []
        if 0 < s.top_p < 1:
            self._methods.append(lambda x: apply_top_p(x, s.top_p))
        if s.min_p:
            self._methods.append(lambda x: apply_min_p(x, s.min_p, 1))
        if s.top_k:
            self._methods.append(lambda x: apply_top_k(x, s.top_k))

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
