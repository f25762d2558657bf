"""A solo prefill leaves the freed buffers of its forward in MLX's cache up to
solo.KEEP_CACHED_BYTES (the next prefill reuses them), and empties the cache past it, as
mlx-lm's generate_step does after every chunk."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

from services.generator import solo
from services.generator.solo import Solo


def _prefill_then_cached(engine, keep: int) -> int:
    """MLX's cache after a prompt chunk's prefill, with ``keep`` bytes allowed (on the MLX thread)."""

    def go():
        mx.clear_cache()
        prompt = engine.tokenizer.encode("The river ran past the old mill and the bridge near the town " * 4)
        s = Solo.from_prompt(engine.model, None, prompt, make_sampler(0.0), [], 4, step_size=len(prompt))
        s.prefill()
        assert not s.prefilling
        return mx.get_cache_memory()

    old = solo.KEEP_CACHED_BYTES
    solo.KEEP_CACHED_BYTES = keep
    try:
        return engine.mlx.call(go)
    finally:
        solo.KEEP_CACHED_BYTES = old


@pytest.mark.parametrize("keep", [1 << 30, 0], ids=["kept", "emptied"])
def test_a_solo_prefill_keeps_its_freed_buffers_up_to_the_bound(plain_engine, keep):
    cached = _prefill_then_cached(plain_engine, keep)
    if keep:
        assert 0 < cached <= keep  # the forward's temporaries, for the next prefill
    else:
        assert cached == 0
