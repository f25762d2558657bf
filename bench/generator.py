"""Generator benchmark: extended mind vs stock mlx-lm, side by side in one run.

    python -m bench.generator [--shape tiny|50m|1b|both] [--dtype float32|float16|bfloat16] [--tokens 128]
                              [--rows 4096] [--big-rows 65536] [--quick] [--record]

A random Llama built with extmind.tiny_models (``--shape tiny``: hidden 64, 2 layers, where the
arithmetic is negligible and the per-token host work shows as it would on a GPU; ``50m``: ~50M parameters, hidden 512,
8 layers, 8 heads, 2 KV heads, float32; ``1b``: ~1B, hidden 2048, 16 layers, 32 heads, 8 KV
heads, float16), a real memory service (real Redis) and the generator engine in-process. Prints
one markdown table per shape of ratios to stock mlx-lm (``generate_step`` on an unmodified load,
and mlx-lm's ``BatchGenerator`` for 8 streams).
"""

from services.common.blas import ensure_openblas

ensure_openblas()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import BatchGenerator, generate_step  # noqa: E402
from mlx_lm.utils import load  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from bench.common import (  # noqa: E402
    add_record_flag,
    describe,
    machine,
    median_ratio,
    memory_searches,
    ratio,
    record,
    table,
)
from extmind import tensor  # noqa: E402
from extmind.procs import free_port  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from extmind.tiny_models import build_llama  # noqa: E402
from services.common.blas import blas_in_use  # noqa: E402
from services.generator.bank_cache import LocalRetriever, fetch_bank  # noqa: E402
from services.generator.engine import EngineConfig, GeneratorEngine  # noqa: E402
from services.generator.extended_attention import MemoryContext  # noqa: E402
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling  # noqa: E402
from services.generator.warmup import wanted, warm_up  # noqa: E402

# Model shapes (extmind.tiny_models.build_llama arguments); vocabulary: the tiny tokenizer's.
SHAPES = {
    # Arithmetic negligible next to the per-token host work: shows the overheads a GPU would.
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, dtype="float32"),
    "50m": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=3584, dtype="float32"),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, dtype="float16"),
}
# Requests with and without citations measured in pairs (at least this many, when --repeat > 1).
CITATION_PAIRS = 8
# --quick per shape. MLX's CPU build has no fast float16 matmul (~4 GFLOP/s on 2 cores): the 1B
# model there takes ~15 s per 32 prompt tokens and ~2 s per new token, so its smoke run is tiny.
QUICK = {
    "tiny": dict(tokens=64, rows=1024, prompt=32, prefill=512),
    "50m": dict(tokens=16, rows=1024, prompt=32, prefill=512),
    "1b": dict(tokens=4, rows=64, prompt=8, prefill=16),
}


def stock_decode(model, prompt, n):
    """mlx-lm's own generate_step on an unmodified load, after a warm-up call on the same prompt:
    (prefill seconds, decode tok/s)."""
    for _ in generate_step(mx.array(prompt), model, max_tokens=2):
        pass
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (count - 1) / (end - first) if count > 1 else float("nan")


def bare_local_decode(model, state, bank, top_k, prompt, n):
    """mlx-lm's generate_step on the generator's own wrapped model with ``bank`` attended LOCAL,
    no engine around it (no scheduler, tallies or hand-over), after a warm-up call: decode tok/s.
    What the model and its kernels cost, apart from what the engine adds per step."""
    state.memory = MemoryContext(LocalRetriever([bank]), top_k=top_k)
    try:
        return stock_decode(model, prompt, n)[1]
    finally:
        state.memory = None


def stock_batch(model, eos_ids, prompts, n):
    """mlx-lm's own BatchGenerator (continuous batching) decoding all ``prompts`` at once, greedy,
    stopping at the end tokens like the generator: aggregate tokens/s over the whole run (prefill
    included, as ``aggregate`` counts it), after a warm-up run."""

    def run(max_tokens):
        gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in eos_ids])
        gen.insert(prompts)
        count = 0
        while responses := gen.next_generated():
            count += sum(r.finish_reason != "stop" for r in responses)
        gen.close()
        return count

    run(2)
    t0 = time.perf_counter()
    count = run(n)
    return count / (time.perf_counter() - t0)


async def engine_run(engine, prompt, n, memory=None, total=False, at_first=None):
    """-> (time to first token, decode tok/s after the first token[, seconds until the Final, tokens]).
    A Chunk may carry the tokens of several steps (handed over together, --stream-interval-ms);
    the first token always comes alone. ``at_first``: called when it comes."""
    t0 = time.perf_counter()
    first = last = None
    count = after_first = 0
    async for ev in engine.generate(GenerationRequest(prompt, Sampling(max_tokens=n), memory)):
        if isinstance(ev, Chunk) and ev.token_ids:
            count += len(ev.token_ids)
            last = time.perf_counter()
            if first is None:
                first = last
                if at_first is not None:
                    at_first()
            else:
                after_first += len(ev.token_ids)
    rate = after_first / (last - first) if after_first else float("nan")
    ttft = first - t0 if first is not None else float("nan")  # none: an end token first
    if total:
        return ttft, rate, time.perf_counter() - t0, count
    return ttft, rate


def remote_waited() -> tuple[float, float]:
    """(seconds, layers) REMOTE retrieval has waited on the memory service so far, in this process
    (``remote_retrieval.SEARCH_SECONDS``)."""
    name = "extmind_generator_remote_search_seconds"
    return REGISTRY.get_sample_value(f"{name}_sum") or 0.0, REGISTRY.get_sample_value(f"{name}_count") or 0.0


def remote_budget(marks, rate: float, stock_rate: float, layers: int) -> str:
    """A REMOTE decode token split into its layers' waits on the memory service (the memory
    service's own search inside them) and the rest, from ``marks`` (``remote_waited`` and
    ``memory_searches`` at the first token and at the end: decode only), and what each layer's wait
    would have to be for 0.2x stock (docs/architecture.md, "REMOTE's per-layer budget").
    ``layers``: the layers that retrieve (here all of them: the request names none)."""
    (w0, n0, s0, c0), (w1, n1, s1, c1) = marks
    if n1 <= n0 or c1 <= c0 or not math.isfinite(rate) or rate <= 0:
        return "no decode step to split (fewer than two tokens)"
    forwards = (n1 - n0) / layers
    waited, per_layer, searched = (w1 - w0) / forwards, (w1 - w0) / (n1 - n0), (s1 - s0) / (c1 - c0)
    token = 1 / rate
    rest = token - waited
    room = (1 / (0.2 * stock_rate) - rest) / layers
    need = f"<= {room * 1e3:.2f} ms a layer" if room > 0 else "out of reach even with instant searches"
    return (
        f"{token * 1e3:.1f} ms: {layers} layers waiting on the memory service {waited * 1e3:.1f} ms "
        f"({per_layer * 1e3:.2f} ms a layer, its search {searched * 1e3:.2f} ms of it), the rest "
        f"{rest * 1e3:.1f} ms; for 0.2x stock the wait would have to be {need}"
    )


async def whole_budget_prompts(engine, rng, ok, args, memory, n=8, tries=64) -> list[list[int]]:
    """``n`` random prompts of ``args.prompt`` tokens whose greedy runs make all ``args.tokens``
    tokens (no end token) with and without ``memory``, each alone and the ``n`` together (a batch
    computes in other shapes than one sequence does, so a random model may end a prompt early in
    one and not in the other); raises after ``tries`` prompts."""
    drawn = 0

    async def runs_whole() -> list[int]:
        nonlocal drawn
        while drawn < tries:
            drawn += 1
            p = [int(t) for t in rng.choice(ok, args.prompt)]
            runs = [await engine_run(engine, p, args.tokens, m, total=True) for m in (None, memory)]
            if all(r[3] == args.tokens for r in runs):
                return p
        raise RuntimeError(f"{tries} random prompts did not give {n} that run {args.tokens} tokens without an end")

    found = [await runs_whole() for _ in range(n)]
    while True:  # together: a prompt ended early in the batch is replaced, the others kept
        short = set()
        for m in (None, memory):
            _, outs = await aggregate(engine, found, args.tokens, m)
            short.update(i for i, o in enumerate(outs) if o[3] != args.tokens)
        if not short:
            return found
        for i in short:
            found[i] = await runs_whole()


async def aggregate(engine, prompts, n, memory=None):
    """Aggregate tokens/s of concurrent streams, counting the tokens each really produced (a
    stream may stop early at an end-of-sequence token)."""
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine_run(engine, p, n, memory, total=True) for p in prompts))
    return sum(o[3] for o in outs) / (time.perf_counter() - t0), outs


def progress(msg: str) -> None:
    """A line on stderr while a long run goes on (stdout carries only the tables)."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Rows(dict):
    """The run's rows (measurement -> result), each also a progress line as it is measured: a run
    cut short (a lent GPU's time running out) keeps what it measured."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        progress(f"| {key} | {value} |")


async def main_async(args):
    for shape in ("50m", "1b") if args.shape == "both" else (args.shape,):
        await bench_shape(args, shape)


async def bench_shape(args, shape):
    if args.quick:
        vars(args).update(QUICK[shape])
    dims = dict(SHAPES[shape], dtype=args.dtype or SHAPES[shape]["dtype"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    t0 = time.perf_counter()
    path = build_llama(tmp / f"llama{shape}", **dims, rope_scaling="llama3", max_position=8192, seed=0)
    progress(f"[{shape}] random checkpoint written in {time.perf_counter() - t0:.0f} s")
    try:
        memory_http = free_port()  # its metrics: the search time of the REMOTE row
        with memory_stack(tmp, args=["--http-port", str(memory_http)]) as mem:
            # dtype "model": the stock baselines compute in the checkpoint's dtype too.
            engine = GeneratorEngine(
                EngineConfig(
                    model=str(path), memory_url=mem.address, dtype="model", fused_attention=args.fused_attention
                )
            )
            engine.start()
            try:
                if wanted("auto"):  # as the service does before it reports SERVING (on a GPU)
                    took = await warm_up(engine, batch=8)
                    progress(f"[{shape}] warmed up: {took}")
                n_params, rows = await measure(engine, path, args, memory_http)
                fused = "on" if engine.state.fused else "off"
            finally:
                engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the 1B checkpoint is 2 GB

    big = f" --big-rows {args.big_rows}" if args.big_rows else ""
    head = (
        f"{describe(machine(blas=blas_in_use(), mlx_device=str(mx.default_device())))}.\n"
        f"Model: random Llama, {n_params / 1e6:.1f}M parameters (hidden {dims['hidden']}, {dims['layers']} layers, "
        f"{dims['heads']} heads, {dims['kv_heads']} KV heads, intermediate {dims['intermediate']}, llama3 RoPE), "
        f"{dims['dtype']}; {args.tokens} new tokens after a {args.prompt}-token prompt; memory of {args.rows} "
        f"rows; real memory service + Redis on loopback; "
        f"`python -m bench.generator --shape {shape} --tokens {args.tokens} --rows {args.rows} "
        f"--prompt {args.prompt} --prefill {args.prefill}{big}{' --dtype ' + args.dtype if args.dtype else ''}"
        f"{' --fused-attention off' if args.fused_attention == 'off' else ''}`; fused LOCAL kernels: {fused}."
    )
    record("generator", head + "\n\n" + table(["measurement", "result"], rows.items()), write=args.record)


async def measure(engine, path, args, memory_http: int) -> tuple[int, dict]:
    """-> (parameters of the model, {measurement: result with its ratio to stock mlx-lm}).
    ``memory_http``: the memory service's HTTP port (its metrics)."""
    rows = Rows()
    n_params = engine.mlx.call(
        lambda: sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(engine.model.parameters()))
    )
    rng = np.random.default_rng(0)
    ok = [t for t in range(engine.vocab_size) if t not in engine.special_ids]
    mem_tokens = [int(t) for t in rng.choice(ok, args.rows)]
    # Warm-up: the first Memorize of a process pays one-time costs (MLX CUDA compiles its kernels
    # at first use, the first channel to the memory service); the row measures a steady one.
    warm_id = engine.memorize_blocking(mem_tokens[:64])["memory_id"]
    await engine.delete_memory(warm_id)
    t0 = time.perf_counter()
    memory_id = engine.memorize_blocking(mem_tokens)["memory_id"]
    rows[f"memorize {args.rows} tokens (windows of <= 3072, to Redis)"] = f"{time.perf_counter() - t0:.2f} s"

    # fetch + cache a bank right after the Memorize (cold): FetchMemory streamed into the device
    # layer by layer, as the engine does for a LOCAL request; then the bytes it takes there
    info = engine.resolver.resolve((memory_id,))[0]
    t0 = time.perf_counter()
    bank = fetch_bank(engine.resolver, info, engine.mlx)
    t_fetch = time.perf_counter() - t0
    dtype = tensor.dtype_name(bank.dtype).removeprefix("DTYPE_").lower()
    kv_bytes = sum(a.nbytes for a in (*bank.keys, *bank.values))
    as_float32 = kv_bytes * 4 // tensor.ITEMSIZE[bank.dtype]
    norms = sum(a.nbytes for a in bank.inv_norms)
    rows[f"fetch + cache {args.rows}-row bank (FetchMemory into the device layer by layer, all layers, {dtype})"] = (
        f"{t_fetch * 1e3:.0f} ms, {kv_bytes / 2**20:.1f} MiB of keys + values (float32: {as_float32 / 2**20:.1f} MiB)"
    )
    rows["cached on the device (MLX arrays + float32 key norms)"] = (
        f"{bank.nbytes / 2**20:.1f} MiB (float32: {(as_float32 + norms) / 2**20:.1f} MiB)"
    )

    prompt = [int(t) for t in rng.choice(ok, args.prompt)]
    long_prompt = [int(t) for t in rng.choice(ok, args.prefill)]
    local = MemoryOptions((memory_id,), top_k=10)
    remote = MemoryOptions((memory_id,), top_k=10, mode="remote")
    await engine_run(engine, prompt, 8, local)  # warm-up (+ bank into the cache)
    await engine_run(engine, prompt, 8)

    progress("memorized, bank fetched; decoding")
    stock_model, stock_tokenizer = engine.mlx.call(load, str(path))
    # Interleaved and repeated (median of each): a lent GPU host's speed drifts by 2x within
    # minutes, so rows measured one after the other would compare different machines.
    stock_rates, plain_rates, local_rates, bare_rates = [], [], [], []
    bare = (engine.model, engine.state, bank, local.top_k, prompt, args.tokens)
    for _ in range(args.repeat):
        stock_rates.append(engine.mlx.call(stock_decode, stock_model, prompt, args.tokens)[1])
        plain_rates.append((await engine_run(engine, prompt, args.tokens))[1])
        local_rates.append((await engine_run(engine, prompt, args.tokens, local))[1])
        bare_rates.append(engine.mlx.call(bare_local_decode, *bare))
    del bank, bare
    stock_rate, plain_rate, local_rate = (float(np.median(r)) for r in (stock_rates, plain_rates, local_rates))
    marks = []  # REMOTE's waits on the memory service, at the first token and at the end

    def mark():
        marks.append((*remote_waited(), *memory_searches(memory_http)))

    _, remote_rate = await engine_run(engine, prompt, min(args.tokens, 64), remote, at_first=mark)
    mark()
    rep = f"median of {args.repeat}, " if args.repeat > 1 else ""
    rows["decode, stock mlx-lm generate_step"] = (
        f"{stock_rate:.1f} tok/s (1.00x; {rep}interleaved with the next two rows)"
    )

    def vs_stock(rate: float, rates: list) -> str:
        # Also the median of each round's ratio to the stock run beside it (a host drifting over
        # the rounds weighs on both sides of a round alike) and the fastest runs' ratio (the
        # least disturbed).
        if args.repeat == 1:
            return f"{rate:.1f} tok/s ({ratio(rate, stock_rate)})"
        return (
            f"{rate:.1f} tok/s ({ratio(rate, stock_rate)}; "
            f"rounds' ratios, median: {median_ratio(rates, stock_rates)}; "
            f"fastest of {args.repeat}: {ratio(max(rates), max(stock_rates))})"
        )

    rows["decode, generator, no memory"] = vs_stock(plain_rate, plain_rates)
    rows[f"decode, {args.rows}-row memory, LOCAL (top_k 10)"] = vs_stock(local_rate, local_rates)
    # The same decode without the engine: the model's own cost with memories, so that the row
    # above's gap to stock splits into the model's (here) and the engine's per step.
    rows[f"decode, {args.rows}-row memory, LOCAL, bare generate_step on the wrapped model (no engine)"] = vs_stock(
        float(np.median(bare_rates)), bare_rates
    )
    # citations are counted live during decoding: no extra pass at the end of the request
    cited = MemoryOptions((memory_id,), top_k=10, return_citations=True)
    # Warm-up as long as the measured requests: the tallies' stacking kernels compile per number
    # of records a flush joins (a 32-forward flush only comes with a longer request).
    await engine_run(engine, prompt, args.tokens, cited)
    plain_reqs, cite_reqs, cite_rates = [], [], []
    # A request takes a fraction of a second, so this row takes more pairs than --repeat: the two
    # requests of a pair run back to back, in alternating order (a host drifting within the pair
    # weighs on both sides alike), and the row reports the median of the pairs' ratios.
    pairs = max(args.repeat, CITATION_PAIRS) if args.repeat > 1 else 1
    for i in range(pairs):
        for opts in (local, cited) if i % 2 == 0 else (cited, local):
            _, rate, t, n = await engine_run(engine, prompt, args.tokens, opts, total=True)
            if opts is cited:
                cite_reqs.append(t)
                cite_rates.append(rate)
                n_cite = n
            else:
                plain_reqs.append(t)
                n_plain = n
    t_plain_req, t_cite_req, cite_rate = (float(np.median(r)) for r in (plain_reqs, cite_reqs, cite_rates))
    rows[f"decode, {args.rows}-row memory, LOCAL + return_citations"] = (
        f"{cite_rate:.1f} tok/s ({ratio(cite_rate, stock_rate)} stock)"
    )
    rows["whole request until Final, LOCAL, with vs without citations"] = (
        f"{t_cite_req:.2f} vs {t_plain_req:.2f} s ({median_ratio(cite_reqs, plain_reqs)}, "
        f"median of {pairs} pairs' ratios; {n_cite} vs {n_plain} tokens)"
    )
    rows[f"decode, {args.rows}-row memory, REMOTE (top_k 10)"] = (
        f"{remote_rate:.1f} tok/s ({ratio(remote_rate, stock_rate)}; target >= 0.25x, 1 B on a GPU >= 0.2x)"
    )
    rows["REMOTE decode token, where the time goes"] = remote_budget(marks, remote_rate, stock_rate, engine.num_layers)

    progress("prefill")
    await engine_run(engine, long_prompt, 1)  # warm-up at this length, like the stock row
    await engine_run(engine, long_prompt, 1, local)  # and with the memory (CUDA: first-use kernel compiles)
    stock_ps, plain_ps, local_ps = [], [], []
    # Interleaved, median of each (a prefill is ~10-30 ms: more rounds), each round a stock run and
    # then the two engine requests, which take turns going first in an even number of rounds: which
    # one comes right after the stock run moved the ratio (1.49x against 1.26x on the H200;
    # bench/RESULTS.md, "2026-12-04 14:00-14:40"), and a fixed order counted that as the memory's.
    rounds = -(-3 * args.repeat // 2) * 2
    for i in range(rounds):  # even rounds: the no-memory request first; odd: the memory one
        stock_ps.append(engine.mlx.call(stock_decode, stock_model, long_prompt, 2)[0])
        for opts in (None, local) if i % 2 == 0 else (local, None):
            (plain_ps if opts is None else local_ps).append((await engine_run(engine, long_prompt, 1, opts))[0])
    stock_p512, p_plain, p_local = (float(np.median(r)) for r in (stock_ps, plain_ps, local_ps))

    def order_ratio(plain_first: bool) -> str:
        start = 0 if plain_first else 1
        return median_ratio(local_ps[start::2], plain_ps[start::2])

    rows[f"prefill {args.prefill} tokens, stock mlx-lm (warmed)"] = (
        f"{stock_p512 * 1e3:.0f} ms (median of {len(stock_ps)}, interleaved with the next two rows)"
    )
    rows[f"prefill {args.prefill} tokens, generator, no memory"] = (
        f"{p_plain * 1e3:.0f} ms ({ratio(p_plain, stock_p512)} stock time)"
    )
    rows[f"prefill {args.prefill} tokens, {args.rows}-row memory LOCAL"] = (
        f"{p_local * 1e3:.0f} ms ({ratio(p_local, p_plain)} no-memory time; "
        f"rounds' ratios, median: {median_ratio(local_ps, plain_ps)}; no memory first: {order_ratio(True)}, "
        f"memory first: {order_ratio(False)}, {rounds // 2} rounds each)"
    )

    progress("8 streams")
    # Streams that run their whole budget with and without the memory: a random model stops at an
    # end token now and then, and a stream cut after a few tokens weighs its time to first token
    # many times over in an aggregate rate (the one-stream rows compared two different works).
    prompts = await whole_budget_prompts(engine, rng, ok, args, local)
    await aggregate(engine, prompts, 8)  # warm-up: batch sizes up to 8 (first-use kernels)
    await aggregate(engine, prompts, 8, local)
    eos_ids = sorted(int(t) for t in stock_tokenizer.eos_token_ids)
    ones, eights, stock_eights = [], [], []
    for _ in range(args.repeat):  # interleaved, median of each (see above)
        ones.append((await aggregate(engine, prompts[:1], args.tokens))[0])
        eights.append((await aggregate(engine, prompts, args.tokens))[0])
        stock_eights.append(engine.mlx.call(stock_batch, stock_model, eos_ids, prompts, args.tokens))
    one, eight, stock_eight = (float(np.median(r)) for r in (ones, eights, stock_eights))

    # With --repeat > 1 also the median of the rounds' ratios: the two sides of a round ran
    # seconds apart, where a lent host's speed may move by 2x between rounds.
    def rounds(values: list, baselines: list) -> str:
        return f"; rounds' ratios, median: {median_ratio(values, baselines)}" if args.repeat > 1 else ""

    rows["8 concurrent streams vs 1, no memory (aggregate)"] = (
        f"{eight:.1f} vs {one:.1f} tok/s ({ratio(eight, one)}{rounds(eights, ones)}; target >= 3.5x)"
    )
    rows["8 streams, stock mlx-lm BatchGenerator (aggregate)"] = f"{stock_eight:.1f} tok/s (1.00x; {rep}interleaved)"
    rows["8 concurrent streams, generator, no memory vs stock BatchGenerator"] = (
        f"{eight:.1f} vs {stock_eight:.1f} tok/s ({ratio(eight, stock_eight)}{rounds(eights, stock_eights)})"
    )
    ones_m, eights_m, firsts, rates, eight_firsts, eight_rates = [], [], [], [], [], []
    for _ in range(args.repeat):  # interleaved, median of each
        rate, ((first, after, _, _),) = await aggregate(engine, prompts[:1], args.tokens, local)
        ones_m.append(rate)
        firsts.append(first)
        rates.append(after)
        rate, outs = await aggregate(engine, prompts, args.tokens, local)
        eights_m.append(rate)
        eight_firsts += [o[0] for o in outs]
        eight_rates += [o[1] for o in outs]
    one_m, eight_m = float(np.median(ones_m)), float(np.median(eights_m))
    # Each side's time to first token and per-stream decode rate after it: where the ratio goes.
    rows["8 concurrent streams vs 1, LOCAL memory (aggregate)"] = (
        f"{eight_m:.1f} vs {one_m:.1f} tok/s ({ratio(eight_m, one_m)}{rounds(eights_m, ones_m)}; "
        f"the one stream: first token after "
        f"{np.median(firsts) * 1e3:.1f} ms, then {np.median(rates):.1f} tok/s; the eight: first tokens after "
        f"{np.nanmedian(eight_firsts) * 1e3:.1f} ms, then {np.nanmedian(eight_rates):.1f} tok/s each)"
    )
    if args.big_rows:
        await big_memory_rows(engine, args, rng, ok, prompt, stock_model, rows)
    return n_params, rows


async def big_memory_rows(engine, args, rng, ok, prompt, stock_model, rows):
    """Memorize ``args.big_rows`` tokens and decode with them LOCAL (rows added to ``rows``),
    each run beside a stock run: minutes after the first decode rows, the host's speed may be
    another."""
    t0 = time.perf_counter()
    big_id = engine.memorize_blocking([int(t) for t in rng.choice(ok, args.big_rows)])["memory_id"]
    rows[f"memorize {args.big_rows} tokens (windows of <= 3072, to Redis)"] = f"{time.perf_counter() - t0:.1f} s"
    big = MemoryOptions((big_id,), top_k=10)
    await engine_run(engine, prompt, 8, big)  # warm-up (+ bank into the cache)
    rates, stock_rates = [], []
    for _ in range(args.repeat):
        stock_rates.append(engine.mlx.call(stock_decode, stock_model, prompt, args.tokens)[1])
        rates.append((await engine_run(engine, prompt, args.tokens, big))[1])
    big_rate, stock_rate = float(np.median(rates)), float(np.median(stock_rates))
    rows[f"decode, {args.big_rows}-row memory, LOCAL (top_k 10)"] = (
        f"{big_rate:.1f} tok/s ({ratio(big_rate, stock_rate)} the stock runs beside it, {stock_rate:.1f} tok/s; "
        f"rounds' ratios, median: {median_ratio(rates, stock_rates)}; median of {args.repeat})"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shape",
        choices=("tiny", "50m", "1b", "both"),
        default="50m",
        help="model shape(s) to measure (tiny: hidden 64, 2 layers: the per-token host overheads; both: 50m, 1b)",
    )
    p.add_argument(
        "--fused-attention",
        choices=("auto", "off"),
        default="auto",
        help="the generator's --fused-attention (auto: fused LOCAL kernels on MLX CUDA)",
    )
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="the model's dtype, hence its memory's (default: the shape's, float32 for 50m, float16 for 1b)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of each decode row, interleaved with its baseline (median)"
    )
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill rows")
    p.add_argument("--big-rows", type=int, default=0, help="also decode LOCAL with a memory of this many rows")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (QUICK): a 1024-row memory, 64 new tokens (tiny) or 16 (50m); 1b: 4 tokens, 64 rows, "
        "prompts of 8 and 16; no --big-rows",
    )
    add_record_flag(p)
    args = p.parse_args()
    if args.quick:
        args.big_rows = 0
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
