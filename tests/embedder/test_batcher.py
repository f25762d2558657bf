"""The batcher's packing on a real tiny model: oldest first, neighbours by length, token budget,
size cap, padding limit; results land with the right request whatever the packing."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from extmind.errors import InvalidArgument, ResourceExhausted
from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.batcher import Batcher, Limits


@pytest.fixture
def model(tiny_qwen3):
    mlx = MLXThread("batcher-test")
    m = mlx.call(registry.load, registry.resolve(str(tiny_qwen3)))
    seen = []
    forward = m.forward

    def recording(batch):
        seen.append([len(s) for s in batch])
        return forward(batch)

    m.forward = recording
    yield mlx, m, seen
    mlx.shutdown()


def seq(n: int, start: int = 5) -> list[int]:
    return [(start + i) % 300 + 3 for i in range(n)]


async def packed(model, limits: Limits, lengths: list[int]):
    mlx, m, seen = model
    b = Batcher(mlx, limits)
    b.start()
    gate = threading.Event()
    mlx.submit(gate.wait)
    first = asyncio.ensure_future(b.run(m, [seq(10)]))  # taken at once, waits for the MLX thread
    await asyncio.sleep(0.05)
    calls = [asyncio.ensure_future(b.run(m, [seq(n, start=n)])) for n in lengths]
    await asyncio.sleep(0.05)
    seen.clear()
    gate.set()
    await first
    rows = await asyncio.gather(*calls)
    await b.stop()
    alone = [mlx.call(m.forward, [seq(n, start=n)])[0] for n in lengths]
    assert np.abs(np.stack([r[0] for r in rows]) - np.stack(alone)).max() < 1e-4  # each row went home
    assert seen[0] == [10]
    return seen[1 : -len(lengths)]


async def test_packs_by_length_within_padding_limit(model):
    batches = await packed(model, Limits(max_added_padding=4), [3, 40, 4, 41, 5, 42])
    assert batches == [[3, 4, 5], [40, 41, 42]]


async def test_unlimited_padding_packs_everything_sorted(model):
    batches = await packed(model, Limits(max_added_padding=-1), [3, 40, 4, 41, 5, 42])
    assert batches == [[3, 4, 5, 40, 41, 42]]


async def test_token_budget_and_size_cap(model):
    assert await packed(model, Limits(max_added_padding=-1, max_batch_tokens=90), [3, 40, 4, 41, 5, 42]) == [
        [3, 4, 5],
        [40, 41],
        [42],
    ]
    # After [3, 4] the oldest waiting text is 40: it goes next, with its closest neighbour.
    assert await packed(model, Limits(max_added_padding=-1, max_batch_size=2), [3, 40, 4, 41, 5, 42]) == [
        [3, 4],
        [40, 41],
        [5, 42],
    ]


async def test_queue_bound(model):
    mlx, m, _ = model
    b = Batcher(mlx, Limits(max_queue=3))
    b.start()
    gate = threading.Event()
    mlx.submit(gate.wait)
    first = asyncio.ensure_future(b.run(m, [seq(5)]))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(b.run(m, [seq(5), seq(6)]))
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhausted):
        await b.run(m, [seq(5), seq(6)])
    # More than the whole queue can never fit: not retryable, so not ResourceExhausted.
    with pytest.raises(InvalidArgument, match="at most 3"):
        await b.run(m, [seq(5)] * 4)
    gate.set()
    await asyncio.gather(first, waiting)
    assert (await b.run(m, [seq(5), seq(6), seq(7)])).shape == (3, 64)
    await b.stop()
