"""The embedder's Prometheus metrics, per model, after real embed calls through the engine
(in-process, read from prometheus_client's REGISTRY): queue depth, batch sizes, tokens embedded."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import REGISTRY

from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.batcher import Limits
from services.embedder.engine import EmbedderEngine


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_queue_batches_and_tokens_per_model(tiny_qwen3):
    mlx = MLXThread("embedder-metrics-test")
    m = mlx.call(registry.load, registry.resolve(str(tiny_qwen3)))
    engine = EmbedderEngine([m], mlx, Limits(max_batch_size=64, max_added_padding=-1))
    await engine.start()
    name = m.name
    try:
        names = ["extmind_embedder_tokens_total"] + [f"extmind_embedder_batch_size_{x}" for x in ("count", "sum")]
        before = {k: sample(k, model=name) for k in names}
        delta = lambda k: sample(k, model=name) - before[k]  # noqa: E731
        gate = threading.Event()
        mlx.submit(gate.wait)  # holds the MLX thread: what arrives meanwhile waits in the queue
        first = asyncio.ensure_future(engine.embed(["held by the gate"], model=name))
        await asyncio.sleep(0.1)  # the first text is taken into a batch that waits for the thread
        queued = [asyncio.ensure_future(engine.embed([f"text {i}", f"and {i} more words"])) for i in range(3)]
        await asyncio.sleep(0.1)
        assert sample("extmind_embedder_queued_sequences", model=name) == 6
        gate.set()
        results = [await first, *[await q for q in queued]]
        assert sample("extmind_embedder_queued_sequences", model=name) == 0
        tokens = sum(sum(r.token_counts) for r in results)
        assert delta("extmind_embedder_tokens_total") == tokens
        # one forward for the held text, one for the six that waited together
        assert delta("extmind_embedder_batch_size_count") == 2
        assert delta("extmind_embedder_batch_size_sum") == 7
        assert engine.batcher.batches_run == 2
    finally:
        await engine.stop()
        mlx.shutdown()
