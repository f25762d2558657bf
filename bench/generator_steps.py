"""Host cost per decode step: the generator without memory against stock mlx-lm, in µs per token.

    python -m bench.generator_steps [--shape tiny|50m|1b] [--tokens 256] [--repeat 5] [--streams 8]
                                    [--profile PATH] [--record]

On a tiny random Llama (hidden 64, 2 layers, vocabulary 512: ``bench.generator``'s ``tiny``
shape) the model's arithmetic is negligible, so what a step costs here is host work: Python per
token, host syncs, the hop to the caller's event loop, per-token bookkeeping. On a fast GPU that
work is what separates the generator from ``generate_step``; this CPU run is its proxy (on a GPU,
``--shape 50m`` / ``1b`` give the same rows for ``bench.generator``'s models). Rows,
interleaved ``--repeat`` times; each cell is the fastest run (the one least disturbed by other
work on the machine: a shared 2-core CPU moves medians by 2x between runs) and the median:

* one stream: mlx-lm ``generate_step``; mlx-lm ``BatchGenerator`` driven directly; the generator
  engine (no memory service) through ``GeneratorEngine.generate``, the events a gRPC handler gets;
* ``--streams`` streams at once: ``BatchGenerator`` driven directly vs the engine.

One stream is timed from its first token to its last (prefill excluded) over prompts whose greedy
continuation runs ``--tokens`` tokens without an end token; several streams from the first
request to the last token, per decode step of the batch. ``--profile PATH`` also writes a cProfile
of the engine's MLX thread (the scheduler's steps) over one single-stream request to PATH and
prints its top entries.
"""

from __future__ import annotations

from services.common.blas import ensure_openblas

ensure_openblas()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import BatchGenerator, generate_step  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from bench.common import add_record_flag, describe, machine, ratio, record, table  # noqa: E402
from bench.generator import SHAPES  # noqa: E402
from extmind.tiny_models import build_llama  # noqa: E402
from services.common.blas import blas_in_use  # noqa: E402
from services.generator.engine import EngineConfig, GeneratorEngine  # noqa: E402
from services.generator.request_types import Chunk, GenerationRequest, Sampling  # noqa: E402


class Clock:
    """Wall time, the process's CPU time and one thread's CPU time (``time.thread_time`` on the
    thread that reads it: the MLX thread's, or the event loop's)."""

    def __init__(self):
        self.wall, self.cpu, self.thread = time.perf_counter(), time.process_time(), time.thread_time()

    def since(self, start: Clock) -> tuple[float, float, float]:
        return self.wall - start.wall, self.cpu - start.cpu, self.thread - start.thread


def per_step(stamps, run_cpu, mlx_cpu, loop_cpu=0.0) -> dict:
    """µs per decode step: wall from the first token to the last; CPU (the process's, the MLX
    thread's, the event loop's) over the whole run, prefill included, divided by the steps."""
    steps = len(stamps)
    return dict(
        wall=(stamps[-1] - stamps[0]) / (steps - 1) * 1e6,
        cpu=run_cpu / steps * 1e6,
        mlx=mlx_cpu / steps * 1e6,
        loop=loop_cpu / steps * 1e6,
    )


def stock_steps(model, prompt, n) -> dict:
    """``generate_step`` (on the MLX thread)."""
    start = Clock()
    stamps = [time.perf_counter() for _ in generate_step(mx.array(prompt), model, max_tokens=n)]
    _, cpu, thread = Clock().since(start)
    return per_step(stamps, cpu, thread)


def batch_steps(model, eos_ids, prompts, n) -> dict:
    """``BatchGenerator`` driven directly (on the MLX thread), greedy, stopping at the end tokens
    like the generator."""
    start = Clock()
    gen = BatchGenerator(model, max_tokens=n, stop_tokens=[[t] for t in eos_ids])
    gen.insert(prompts)
    stamps = []
    while gen.next_generated():
        stamps.append(time.perf_counter())
    gen.close()
    _, cpu, thread = Clock().since(start)
    return per_step(stamps, cpu, thread)


async def engine_stream(engine, prompt, n) -> list[float]:
    """One request through the engine: the arrival time of each token at the caller."""
    stamps = []
    async for ev in engine.generate(GenerationRequest(prompt, Sampling(max_tokens=n))):
        if isinstance(ev, Chunk):
            now = time.perf_counter()
            stamps += [now] * len(ev.token_ids)
    return stamps


async def engine_steps(engine, prompts, n) -> dict:
    """All ``prompts`` at once through ``GeneratorEngine.generate`` (steps: the longest stream's
    tokens; wall from the first token of any stream to the last of all)."""
    mlx_start = await engine.mlx.run(time.thread_time)
    start = Clock()
    outs = await asyncio.gather(*(engine_stream(engine, p, n) for p in prompts))
    _, cpu, loop = Clock().since(start)
    mlx = await engine.mlx.run(time.thread_time) - mlx_start
    steps = max(len(o) for o in outs)
    first, last = min(o[0] for o in outs), max(o[-1] for o in outs)
    stamps = [first] + [0.0] * (steps - 2) + [last]
    return per_step(stamps, cpu, mlx, loop)


def no_eos_prompts(model, eos_ids, rng, ok, count, length, n) -> list[list[int]]:
    """``count`` random prompts whose greedy continuation runs ``n`` tokens without an end token,
    so that every row decodes the same number of steps. Raises SystemExit after 50 tries per prompt."""
    found = []
    for _ in range(50 * count):
        prompt = [int(t) for t in rng.choice(ok, length)]
        if not any(tok in eos_ids for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n)):
            found.append(prompt)
            if len(found) == count:
                return found
    raise SystemExit(f"only {len(found)} of {count} prompts run {n} tokens without an end token; try fewer --tokens")


ROWS = {
    "stock": "1 stream, mlx-lm `generate_step`",
    "batch1": "1 stream, mlx-lm `BatchGenerator` directly",
    "ours1": "1 stream, generator engine (no memory)",
    "batchN": "{n} streams, mlx-lm `BatchGenerator` directly (per step of {n})",
    "oursN": "{n} streams, generator engine (per step of {n})",
}


async def measure(engine, path, args) -> list[tuple]:
    stock, _ = engine.mlx.call(load, str(path))
    eos = set(engine.eos_ids)
    rng = np.random.default_rng(0)
    ok = [t for t in range(engine.vocab_size) if t not in engine.special_ids]
    prompts = engine.mlx.call(no_eos_prompts, stock, eos, rng, ok, args.streams, 16, args.tokens)
    one = prompts[:1]

    async def run(key, n):
        if key == "stock":
            return engine.mlx.call(stock_steps, stock, one[0], n)
        if key.startswith("batch"):
            return engine.mlx.call(batch_steps, stock, eos, one if key == "batch1" else prompts, n)
        return await engine_steps(engine, one if key == "ours1" else prompts, n)

    for key in ROWS:  # warm-up: first-use costs of every path and batch size
        await run(key, 8)
    runs = {key: [] for key in ROWS}
    for _ in range(args.repeat):  # interleaved, so that a change of load hits every row alike
        for key in ROWS:
            runs[key].append(await run(key, args.tokens))
    best = {key: {m: min(r[m] for r in rs) for m in rs[0]} for key, rs in runs.items()}
    med = {key: {m: float(np.median([r[m] for r in rs])) for m in rs[0]} for key, rs in runs.items()}

    if args.profile:
        prof = cProfile.Profile()
        engine.mlx.call(prof.enable)  # cProfile sees the thread it is enabled on: the MLX thread
        await engine_steps(engine, one, args.tokens)
        engine.mlx.call(prof.disable)
        prof.dump_stats(args.profile)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())

    def cell(key, m):
        return f"{best[key][m]:.0f} / {med[key][m]:.0f}"

    def row(key, vs_stock, vs_batch):
        return (
            ROWS[key].format(n=args.streams),
            cell(key, "wall"),
            ratio(best[key]["wall"], best[vs_stock]["wall"]) if vs_stock else "",
            ratio(best[key]["wall"], best[vs_batch]["wall"]),
            cell(key, "cpu"),
            cell(key, "mlx"),
            cell(key, "loop") if key.startswith("ours") else "",
        )

    return [
        row("stock", "stock", "batch1"),
        row("batch1", "stock", "batch1"),
        row("ours1", "stock", "batch1"),
        row("batchN", None, "batchN"),
        row("oursN", None, "batchN"),
    ]


async def main_async(args):
    dims = SHAPES[args.shape]
    tmp = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    try:
        path = build_llama(tmp / args.shape, **dims, rope_scaling="llama3", max_position=8192, seed=0)
        engine = GeneratorEngine(EngineConfig(model=str(path), dtype="model"))
        engine.start()
        try:
            rows = await measure(engine, path, args)
        finally:
            engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (
        f"{describe(machine(blas=blas_in_use(), mlx_device=str(mx.default_device())))}.\n"
        f"{'Host-overhead proxy: ' if args.shape == 'tiny' else ''}random Llama, hidden {dims['hidden']}, "
        f"{dims['layers']} layers, {dims['dtype']}; {args.tokens} greedy tokens after a 16-token prompt, no end "
        "token; µs per decode step, "
        f"fastest / median of {args.repeat} interleaved runs, ratios of the fastest; "
        f"`python -m bench.generator_steps --shape {args.shape} --tokens {args.tokens} "
        f"--repeat {args.repeat} --streams {args.streams}`."
    )
    body = table(
        [
            "measurement",
            "wall",
            "vs generate_step",
            "vs BatchGenerator",
            "process CPU",
            "MLX thread CPU",
            "event loop CPU",
        ],
        rows,
    )
    record("generator_steps", head + "\n\n" + body, write=args.record)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shape", choices=tuple(SHAPES), default="tiny", help="model (bench.generator's shapes; tiny: host costs)"
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    p.add_argument("--repeat", type=int, default=5, help="interleaved runs of every row (fastest and median)")
    p.add_argument("--streams", type=int, default=8, help="streams of the batched rows")
    p.add_argument("--profile", default="", help="write a cProfile of the engine's MLX thread here")
    add_record_flag(p)
    args = p.parse_args()
    if args.tokens < 2 or args.repeat < 1 or args.streams < 1:
        p.error("--tokens must be >= 2, --repeat and --streams >= 1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
