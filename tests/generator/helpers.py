"""Helpers shared by the generator tests."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
import time

from extmind.service_procs import ServiceProcess
from services.generator.request_types import Chunk, Final

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of",
    "Alice met Bob at the",
    "In 1969 people walked",
    "Water boils at",
    "def add(a, b):",
    "The river flows to",
    "Machine learning models turn text",
]


async def events(engine, req) -> tuple[list[Chunk], Final]:
    """-> (the Chunks, the Final) of one request run to its end."""
    chunks, final = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
        else:
            final = ev
    return chunks, final


async def run(engine, req):
    """-> (token ids, logprobs, text, Final) of one request run to its end."""
    chunks, final = await events(engine, req)
    tokens = [t for c in chunks for t in c.token_ids]
    lps = [x for c in chunks for x in c.logprobs]
    text = "".join(c.text for c in chunks) + final.remaining_text
    return tokens, lps, text, final


def start_generator(log_dir, model, memory_address: str, *args: str) -> ServiceProcess:
    """``python -m services.generator --model MODEL ARGS`` on a real memory service, SERVING (its
    HTTP face off unless ARGS give ``--http-port``: the default port may be taken)."""
    return ServiceProcess(
        "services.generator",
        ["--model", str(model), "--log-format", "text", "--http-port", "-1", *args],
        env={"EXTMIND_AUTH_TOKEN": "", "MEMORY_URL": memory_address},
        log_dir=log_dir,
        health_service="extmind.v1.GeneratorService",
    ).start()


# ---- ordering work on an engine's MLX thread (admits, scheduler steps, commands)


class MlxHold:
    """A call that occupies an engine's MLX thread from when it starts until ``release()``: work
    submitted after it queues behind it, in order."""

    def __init__(self, engine, seconds: float = 30):
        self._started, self._release = threading.Event(), threading.Event()
        self.future = engine.mlx.submit(lambda: self._started.set() or self._release.wait(seconds))

    async def started(self) -> None:
        """Returns once the thread runs the hold (from then on it no longer counts as waiting)."""
        assert await asyncio.to_thread(self._started.wait, 30)

    def release(self) -> None:
        self._release.set()

    async def done(self) -> None:
        await asyncio.wrap_future(self.future)


async def queued(engine, n: int, seconds: float = 3) -> None:
    """Returns once ``n`` calls wait for the engine's MLX thread (submitted, not started)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if engine.mlx._waiting >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"fewer than {n} calls ever waited for the MLX thread")


async def first_steps_queued(engine, start):
    """Calls ``start()`` (which makes a request submit its admit) with the MLX thread held, lets
    the admit run, and holds the thread again once the scheduler has queued its run of steps
    behind: work submitted now comes after those steps. -> (what ``start()`` returned, the hold;
    release it and await its ``done()``)."""
    first = MlxHold(engine)
    await first.started()
    out = start()
    await queued(engine, 1)  # the admit, behind the first hold
    second = MlxHold(engine)
    first.release()  # the admit runs, then the second hold; the scheduler queues its run of steps
    await second.started()
    await first.done()
    await queued(engine, 1)  # the scheduler's steps, behind the second hold
    return out, second


def on_two_loops(call, items) -> list[list]:
    """``call(item)`` (a coroutine function) for every item at once on each of two threads, each
    with its own event loop, both threads at the same time: -> each thread's results, in item order."""
    results: dict = {}

    def in_thread(i):
        async def all_of_them():
            return await asyncio.gather(*(call(x) for x in items))

        results[i] = asyncio.run(all_of_them())

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1]
    return [results[0], results[1]]


async def until(condition, what: str, seconds: float = 20) -> None:
    """Waits until ``condition()`` (a bool, or an awaitable of one) holds, polling every ms; fails
    naming ``what`` after ``seconds`` (a bound only, so that a fault fails instead of hanging)."""
    for _ in range(int(seconds * 1000)):
        ok = condition()
        if await ok if inspect.isawaitable(ok) else ok:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


def until_work_waits(mlx, seconds: float = 30) -> None:
    """On the MLX thread: blocks until other work is submitted to it (or ``seconds`` pass)."""
    deadline = time.monotonic() + seconds
    while not mlx.has_waiting() and time.monotonic() < deadline:
        time.sleep(0.001)


def stock_steps(engine, prompt: list[int], max_tokens: int, prefill_step_size: int) -> list[tuple[int, float]]:
    """mlx-lm's ``generate_step`` on the engine's own model, on its MLX thread: (token, its
    logprob) of each step until an end-of-sequence token."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    def steps():
        out = []
        for t, lp in generate_step(
            mx.array(prompt), engine.model, max_tokens=max_tokens, prefill_step_size=prefill_step_size
        ):
            if t in engine.eos_ids:
                break
            out.append((t, float(np.array(lp)[t])))
        return out

    return engine.mlx.call(steps)


def prefill_picks(rng, B: int, H: int, L: int, S: int, n: int, k: int, mask_kind: str):
    """A prefill merge's test inputs besides q, k, v: each query's k memories (rows [B, H, L, k]
    int32 into an n-row bank, -1 = masked by a threshold; query (1, 0, 0) with every memory masked)
    and raw dots [B, H, L, k] float32, and the local mask for ``mask_kind`` ("causal" over the last
    L of S positions, "none", or "padding": the causal mask with sequence 0's first 3 positions
    padding, as a boolean [B, 1, L, S] array) -> (rows, dots, the mask as ``attend`` takes it,
    allowed [B, L, S] bool)."""
    import mlx.core as mx
    import numpy as np

    rows = rng.integers(-1, n, (B, H, L, k)).astype(np.int32)
    rows[1, 0, 0] = -1
    dots = (rng.standard_normal((B, H, L, k)) * 4).astype(np.float32)
    causal = np.arange(S - L, S)[:, None] >= np.arange(S)[None]
    if mask_kind == "causal":
        return rows, dots, "causal", np.broadcast_to(causal, (B, L, S))
    if mask_kind == "none":
        return rows, dots, None, np.ones((B, L, S), bool)
    pad = np.ones((B, S), bool)
    pad[0, :3] = False
    allowed = causal[None] & pad[:, None, :]
    return rows, dots, mx.array(allowed[:, None]), allowed


LAST_AXIS_LAYOUTS = ("cache", "odd", "every_other")


def last_axis_layout(layout: str, d: int) -> tuple[int, slice]:
    """How a kernel input of head size ``d`` lies in its buffer's last axis, for the tensor-core
    merge's load paths: (the buffer's width, the slice taking the d elements). "cache": the whole
    axis, as a KV cache's rows (aligned pairs); "odd": one element in from a buffer one wider (odd
    offsets and row strides); "every_other": stride 2 in a buffer twice as wide."""
    return {"cache": (d, slice(0, d)), "odd": (d + 1, slice(1, d + 1)), "every_other": (2 * d, slice(0, None, 2))}[
        layout
    ]


# Sizes of the tiny checkpoints that the tests quantize (DECODER_BUILDERS keyword arguments):
# every quantized matmul's input width (hidden, heads x head_dim, each MLP's intermediate) at least
# 128, as in real models. On an H200, MLX 0.32.4 takes a kernel of its own for a width of one
# group (64), which is wrong for more than one row (errors ~30 against ~0.01; the CPU build is
# right) and needs CUDA headers the pip wheels lack; real checkpoints never take it (docs/platform.md).
_WIDE = dict(hidden=128)
QUANTIZED_SIZES = {
    "llama": _WIDE,  # head_dim 128 / 4, intermediate 2 x hidden
    "qwen2": _WIDE,  # intermediate 128
    "qwen3": dict(_WIDE, head_dim=32),
    "qwen3_moe": dict(_WIDE, head_dim=32, moe_intermediate=128),
    "qwen2_moe": dict(_WIDE, moe_intermediate=128),  # shared expert 128
    "mixtral": dict(_WIDE, intermediate=128),
}


# A small config any mlx-lm decoder type takes (from_dict ignores keys a type lacks).
RANDOM_MODEL_ARGS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
    rope_theta=10000.0,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def random_model(model_type: str, **extra):
    """A random-weight mlx-lm model of ``model_type`` built from RANDOM_MODEL_ARGS (no checkpoint)."""
    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(dict(RANDOM_MODEL_ARGS, model_type=model_type, **extra)))
    mx.eval(model.parameters())
    return model
