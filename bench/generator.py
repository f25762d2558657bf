"""Generator benchmark: extended mind vs stock mlx-lm, side by side in one run.

    python -m bench.generator [--tokens 128] [--rows 4096] [--dtype float32] [--quick] [--record]

A ~50M-parameter random Llama (hidden 512, 8 layers, 8 heads, 2 KV heads) built with
extmind.tiny_models, a real memory service (real Redis) and the generator engine in-process.
Prints one markdown table of ratios to stock mlx-lm (``generate_step`` on an unmodified load).
``--dtype float16`` / ``bfloat16`` builds the model in that dtype: its memory is stored, fetched and
cached in it (half the bytes of float32; the bank rows say how much a float32 bank would take).
"""

from services.common.blas import ensure_openblas

ensure_openblas()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from bench.common import add_record_flag, describe, machine, ratio, record, table  # noqa: E402
from extmind import tensor  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from extmind.tiny_models import build_llama  # noqa: E402
from services.common.blas import blas_in_use  # noqa: E402
from services.generator.bank_cache import bank_from_stored  # noqa: E402
from services.generator.engine import EngineConfig, GeneratorEngine  # noqa: E402
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling  # noqa: E402


def stock_decode(path, prompt, n):
    """mlx-lm's own generate_step: (prefill seconds, decode tok/s)."""
    model, _ = load(str(path))
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (count - 1) / (end - first)


async def engine_run(engine, prompt, n, memory=None, total=False):
    """-> (time to first token, decode tok/s after the first token[, seconds until the Final, tokens])."""
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async for ev in engine.generate(GenerationRequest(prompt, Sampling(max_tokens=n), memory)):
        if isinstance(ev, Chunk):
            count += 1
            last = time.perf_counter()
            if first is None:
                first = last
    rate = (count - 1) / (last - first) if count > 1 else float("nan")
    if total:
        return first - t0, rate, time.perf_counter() - t0, count
    return first - t0, rate


async def aggregate(engine, prompts, n, memory=None):
    """Aggregate tokens/s of concurrent streams, counting the tokens each really produced (a
    stream may stop early at an end-of-sequence token)."""
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine_run(engine, p, n, memory, total=True) for p in prompts))
    return sum(o[3] for o in outs) / (time.perf_counter() - t0), outs


async def main_async(args):
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    path = build_llama(
        tmp / "llama50m",
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=2,
        intermediate=3584,
        rope_scaling="llama3",
        max_position=8192,
        seed=0,
        dtype=args.dtype,
    )
    with memory_stack(tmp) as mem:
        engine = GeneratorEngine(EngineConfig(model=str(path), memory_url=mem.address))
        engine.start()
        try:
            n_params, rows = await measure(engine, path, args)
        finally:
            engine.stop()

    head = (
        f"{describe(machine(blas=blas_in_use()))}.\nModel: random Llama, {n_params / 1e6:.1f}M parameters "
        f"(hidden 512, 8 layers, 8 heads, 2 KV heads, llama3 RoPE), {args.dtype}; {args.tokens} new tokens after a "
        f"32-token prompt; memory of {args.rows} rows; real memory service + Redis on loopback; "
        f"`python -m bench.generator --tokens {args.tokens} --rows {args.rows} --dtype {args.dtype}`."
    )
    record("generator", head + "\n\n" + table(["measurement", "result"], rows.items()), write=args.record)


async def measure(engine, path, args) -> tuple[int, dict]:
    """-> (parameters of the model, {measurement: result with its ratio to stock mlx-lm})."""
    rows = {}
    n_params = engine.mlx.call(
        lambda: sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(engine.model.parameters()))
    )
    rng = np.random.default_rng(0)
    ok = [t for t in range(engine.vocab_size) if t not in engine.special_ids]
    mem_tokens = [int(t) for t in rng.choice(ok, args.rows)]
    t0 = time.perf_counter()
    memory_id = engine.memorize_blocking(mem_tokens)["memory_id"]
    rows[f"memorize {args.rows} tokens (windows of <= 3072, to Redis)"] = f"{time.perf_counter() - t0:.2f} s"

    # fetch + cache a bank, timed on its own (cold), then the bytes it takes on the device
    info = engine.resolver.resolve((memory_id,))[0]
    t0 = time.perf_counter()
    stored = engine.resolver.fetch(info)
    t_fetch = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = engine.mlx.call(bank_from_stored, memory_id, info.version, stored)
    t_cache = time.perf_counter() - t0
    dtype = tensor.dtype_name(stored.dtype).removeprefix("DTYPE_").lower()
    as_float32 = stored.nbytes * 4 // tensor.ITEMSIZE[stored.dtype]
    rows[f"fetch {args.rows}-row bank (FetchMemory, all 8 layers, {dtype})"] = (
        f"{t_fetch * 1e3:.0f} ms, {stored.nbytes / 2**20:.1f} MiB of keys + values "
        f"(float32: {as_float32 / 2**20:.1f} MiB)"
    )
    norms = sum(a.nbytes for a in bank.inv_norms)
    rows["cache it on the device (MLX arrays + float32 key norms)"] = (
        f"{t_cache * 1e3:.0f} ms, {bank.nbytes / 2**20:.1f} MiB (float32: {(as_float32 + norms) / 2**20:.1f} MiB)"
    )
    del bank, stored

    prompt = [int(t) for t in rng.choice(ok, 32)]
    long_prompt = [int(t) for t in rng.choice(ok, 512)]
    local = MemoryOptions((memory_id,), top_k=10)
    remote = MemoryOptions((memory_id,), top_k=10, mode="remote")
    await engine_run(engine, prompt, 8, local)  # warm-up (+ bank into the cache)
    await engine_run(engine, prompt, 8)

    stock_prefill, stock_rate = engine.mlx.call(stock_decode, path, prompt, args.tokens)
    _, plain_rate = await engine_run(engine, prompt, args.tokens)
    _, local_rate = await engine_run(engine, prompt, args.tokens, local)
    _, remote_rate = await engine_run(engine, prompt, min(args.tokens, 64), remote)
    rows["decode, stock mlx-lm generate_step"] = f"{stock_rate:.1f} tok/s (1.00x)"
    rows["decode, generator, no memory"] = f"{plain_rate:.1f} tok/s ({ratio(plain_rate, stock_rate)})"
    rows[f"decode, {args.rows}-row memory, LOCAL (top_k 10)"] = (
        f"{local_rate:.1f} tok/s ({ratio(local_rate, stock_rate)}; target >= 0.6x)"
    )
    # citations are counted live during decoding: no extra pass at the end of the request
    cited = MemoryOptions((memory_id,), top_k=10, return_citations=True)
    _, _, t_plain_req, n_plain = await engine_run(engine, prompt, args.tokens, local, total=True)
    _, cite_rate, t_cite_req, n_cite = await engine_run(engine, prompt, args.tokens, cited, total=True)
    rows[f"decode, {args.rows}-row memory, LOCAL + return_citations"] = (
        f"{cite_rate:.1f} tok/s ({ratio(cite_rate, stock_rate)} stock)"
    )
    rows["whole request until Final, LOCAL, with vs without citations"] = (
        f"{t_cite_req:.2f} vs {t_plain_req:.2f} s ({ratio(t_cite_req, t_plain_req)}; {n_cite} vs {n_plain} tokens)"
    )
    rows[f"decode, {args.rows}-row memory, REMOTE (top_k 10)"] = (
        f"{remote_rate:.1f} tok/s ({ratio(remote_rate, stock_rate)}; target >= 0.25x)"
    )

    stock_p512, _ = engine.mlx.call(stock_decode, path, long_prompt, 2)
    p_plain, _ = await engine_run(engine, long_prompt, 1)
    p_local, _ = await engine_run(engine, long_prompt, 1, local)
    rows["prefill 512 tokens, stock mlx-lm"] = f"{stock_p512 * 1e3:.0f} ms"
    rows["prefill 512 tokens, generator, no memory"] = f"{p_plain * 1e3:.0f} ms"
    rows[f"prefill 512 tokens, {args.rows}-row memory LOCAL"] = (
        f"{p_local * 1e3:.0f} ms ({ratio(p_local, p_plain)} no-memory time)"
    )

    prompts = [[int(t) for t in rng.choice(ok, 32)] for _ in range(8)]
    one, _ = await aggregate(engine, prompts[:1], args.tokens)
    eight, _ = await aggregate(engine, prompts, args.tokens)
    rows["8 concurrent streams vs 1, no memory (aggregate)"] = (
        f"{eight:.1f} vs {one:.1f} tok/s ({ratio(eight, one)}; target >= 3.5x)"
    )
    one_m, _ = await aggregate(engine, prompts[:1], args.tokens, local)
    eight_m, _ = await aggregate(engine, prompts, args.tokens, local)
    rows["8 concurrent streams vs 1, LOCAL memory (aggregate)"] = (
        f"{eight_m:.1f} vs {one_m:.1f} tok/s ({ratio(eight_m, one_m)})"
    )
    return n_params, rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="the model's dtype, hence its memory's (default float32)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, a 1024-row memory")
    add_record_flag(p)
    args = p.parse_args()
    if args.quick:
        args.tokens, args.rows = 16, 1024
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
