"""Warming the generator up before it reports SERVING (docs/platform.md, "CUDA notes").

On MLX's CUDA backend a kernel is compiled the first time an op / dtype / shape combination
runs, and each decode batch size traces the compiled top-k again: without a warm-up the first
Memorize, the first request with citations and the first batch of each size pay seconds. The
warm-up runs the paths requests take, through the engine's public API (nothing here is a second
implementation of them):

1. a short generation without memories;
2. when the memory service answers: Memorize of a short synthetic text, then generations with
   that memory - LOCAL with citations alone (long enough to flush its tallies once), a prompt
   long enough for the prefill top-k, and ``batch`` at once (the batch sizes up to it occur as
   they join), the tallies' stacking kernels of every size and dtype (``device_stack.compile_all``:
   which size a flush takes follows a request's length), and REMOTE - and the memory is deleted.

A failure is logged and ends the warm-up, as does its time budget (BUDGET_SECONDS): it never
keeps the service from serving. The requests count in the metrics like any other. A warm-up
memory left behind by an earlier start (the process killed mid-warm-up) is deleted once it is
STALE_SECONDS old; a younger one may be another generator's, warming up now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from extmind import errors
from services.generator import device_stack, fused_attention
from services.generator.batch_tally import BatchTally
from services.generator.request_types import REMOTE, GenerationRequest, MemoryOptions, Sampling

log = logging.getLogger("extmind.generator")

PROMPT_TOKENS = 16
MEMORY_TOKENS = 256
NEW_TOKENS = 4
WARMUP_MODES = ("auto", "on", "off")  # --warmup
LABELS = {"kind": "warm-up"}
STALE_SECONDS = 600
# The whole warm-up, at most (on an H200, 1 B shape: 49 s with MLX's kernel cache empty, 25 s with it
# kept; nearly all of it MLX compiling kernels: docs/platform.md, "CUDA notes").
BUDGET_SECONDS = 300.0


def wanted(mode: str) -> bool:
    """``--warmup``: "on", "off", or "auto" = on when MLX computes on a GPU (CUDA or Metal)."""
    if mode == "auto":
        import mlx.core as mx

        return mx.default_device() == mx.gpu
    return mode == "on"


async def _drain(engine, req: GenerationRequest) -> None:
    async for _ in engine.generate(req):
        pass


async def _delete_stale(engine) -> int:
    """Deletes this model's warm-up memories created over STALE_SECONDS ago. -> how many."""
    now, stale, token = time.time(), [], ""
    while True:
        page, token = await engine.list_memories(page_token=token)
        stale += [
            m.memory_id for m in page if dict(m.labels) == LABELS and now - m.create_time.ToSeconds() > STALE_SECONDS
        ]
        if not token:
            break
    for memory_id in stale:
        with contextlib.suppress(errors.NotFound):  # another generator's sweep got it first
            await engine.delete_memory(memory_id)
    return len(stale)


async def warm_up(engine, batch: int = 8, budget: float = BUDGET_SECONDS) -> dict:
    """Runs the warm-up on a started ``engine``, for at most ``budget`` seconds. -> seconds per
    stage ("plain", "memorize", "local", "remote"; a stage that did not run is missing) and
    "skipped": why the later stages did not run, or ""."""
    took: dict = {"skipped": ""}
    task = asyncio.ensure_future(_stages(engine, batch, took))
    done, _ = await asyncio.wait({task}, timeout=budget)
    if not done:  # e.g. a memory service that accepts calls and never answers
        task.cancel()  # not awaited: its clean-up may wait on that same service
        took["skipped"] = f"did not finish in {budget:g} s"
        log.warning("warm-up did not finish in time; serving without the rest of it", extra={"seconds": budget})
    return took


async def _stages(engine, batch: int, took: dict) -> None:
    ok = [t for t in range(engine.vocab_size) if t not in engine.special_ids][:512]
    prompt = ok[:PROMPT_TOKENS]
    sampling = Sampling(max_tokens=NEW_TOKENS)
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        took[stage] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    try:
        await _drain(engine, GenerationRequest(prompt, sampling))
        lap("plain")
        if engine.memory is None:
            took["skipped"] = "no memory service configured"
            return
        if await _delete_stale(engine):
            log.info("deleted warm-up memories left behind by an earlier start")
        text = [ok[i % len(ok)] for i in range(MEMORY_TOKENS)]
        memory_id = (await engine.memorize(text, labels=LABELS))["memory_id"]
        lap("memorize")
        try:
            cited = MemoryOptions((memory_id,), return_citations=True)
            # Long enough for a flush of the tallies by count; the sizes of their stacking kernels
            # these requests did not run are compiled after them (docs/architecture.md,
            # "Tallies of a decode batch").
            flushed = Sampling(max_tokens=BatchTally.FLUSH_STEPS + 1)
            await _drain(engine, GenerationRequest(prompt, flushed, cited))
            if engine.state.fused:  # a prefill long enough for the fused top-k's matmul path
                heads = engine.state.shape.num_heads
                long_prompt = ok[: max(PROMPT_TOKENS, -(-fused_attention.MATMUL_ROWS // heads))]
                await _drain(engine, GenerationRequest(long_prompt, sampling, cited))
            # No more at once than the queue admits (--max-queue below the batch failed the
            # warm-up with RESOURCE_EXHAUSTED), and every one ended before the memory is deleted.
            at_once = max(1, min(batch, engine.config.max_queue))
            ends = await asyncio.gather(
                *(
                    _drain(engine, GenerationRequest(ok[i : i + PROMPT_TOKENS], sampling, cited))
                    for i in range(at_once)
                ),
                return_exceptions=True,
            )
            for end in ends:
                if isinstance(end, BaseException):
                    raise end
            await engine.mlx.run(device_stack.compile_all)
            lap("local")
            await _drain(engine, GenerationRequest(prompt, sampling, MemoryOptions((memory_id,), mode=REMOTE)))
            lap("remote")
        finally:
            await engine.delete_memory(memory_id)
    except errors.Unavailable as e:  # the memory service is not up (yet): serve anyway
        took["skipped"] = f"memory service unavailable: {e.message}"
    except Exception as e:  # noqa: BLE001 - a warm-up never keeps the service from serving
        took["skipped"] = f"failed: {e}"
        log.warning("warm-up failed; serving without it", extra={"error": str(e)})
