"""Where a prefill with memories goes: one forward of a prompt with and without a LOCAL memory,
and (on MLX's CUDA backend) the memory path's parts, in one process.

    python -m bench.prefill_memory [--shape 1b|50m|tiny] [--rows 4096] [--tokens 511] [--rounds 15] [--kernels]
                                   [--record]

bench.generator's random Llama of ``--shape`` (its checkpoint written to a temporary folder and
loaded) with extended mind installed, and a random bank of ``--rows`` rows per layer in the
model's dtype, top_k 10. Prints:

1. the forward of a ``--tokens``-token prompt (what a request's prefill runs; its last position's
   logits read back): no memory and LOCAL, interleaved over ``--rounds`` rounds, the medians and
   the median of the rounds' ratios (issue 14's goal: a 512-token prefill with a 4 096-row memory
   <= 1.3x the prefill without; ``bench.generator`` measures it through the engine);
   on CUDA with a 16-bit model also LOCAL with the merge reading float32 logits, as every dtype did
   before the tensor-core merge (``prefill_merge_kernels.MERGE_MMA``): its before and after in one run;
   on CUDA also LOCAL with the bank's prefill keys made per forward, as before cached banks kept
   them (``bank_cache.Bank.prefill_keys``), and LOCAL with the prefill top-k reading each row's
   scores twice, as before it held them in shared memory (``prefill_top_k.HOLD_SCORES``), testing
   float16 scores one by one (``PACK_SCORES``), with the merge loading one memory's values at a
   time (``prefill_merge_kernels.MERGE_GROUP``);
2. on CUDA, the fused prefill path of one layer (``fused_attention.top_k_rows`` and
   ``prefill_attention.attend``, docs/architecture.md "Prefill with memories") against MLX's
   fused attention alone, each evaluated alone (so each includes a launch and a sync), and all
   layers of each chained in one evaluation as a forward runs them, with the time it took the
   host to build those graphs. A memory path whose chained time is well above the forward's extra
   time is not what the forward waits on: the host is;
3. with ``--kernels`` (CUDA and PyTorch with CUDA), the GPU kernel time and launches per forward
   without and with the memory (CUPTI, as ``bench.gpu_kernel_times``) and the memory forward's
   kernels, most time first.

Default shape: 1b on CUDA, tiny elsewhere (MLX's CPU build has no fast float16 attention).
"""

from services.common.blas import ensure_openblas

ensure_openblas()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from bench.common import add_record_flag, describe, machine, median_ratio, record, table, timed_rounds  # noqa: E402
from bench.generator import SHAPES  # noqa: E402
from extmind.tiny_models import build_llama  # noqa: E402
from services.common.config import positive_int  # noqa: E402
from services.generator import (  # noqa: E402
    extended_attention,
    fused_attention,
    prefill_attention,
    prefill_merge_kernels,
    prefill_top_k,
)
from services.generator.bank_cache import LocalRetriever, bank_from_numpy  # noqa: E402
from services.generator.extended_attention import MemoryContext  # noqa: E402

TOP_K = 10


def random_llama(dims: dict, tmp: Path):
    """bench.generator's random Llama of shape ``dims`` (``extmind.tiny_models.build_llama``, seed
    0, llama3 RoPE), written under ``tmp`` and loaded through mlx-lm as a real checkpoint is."""
    path = build_llama(tmp / "m", **dims, rope_scaling="llama3", max_position=8192, seed=0)
    return load(str(path))[0]


# The CUDA prefill path's switches (module, attribute) -> what a variant sets them to.
FLAGS = {
    "mma": (prefill_attention, "MMA_DTYPES"),
    "hold": (prefill_top_k, "HOLD_SCORES"),
    "pack": (prefill_top_k, "PACK_SCORES"),
    "group": (prefill_merge_kernels, "MERGE_GROUP"),
}


@contextlib.contextmanager
def kernel_flags(**values):
    """While inside, the CUDA prefill path with some of its switches set (``FLAGS``' names):
    ``mma=False``, a 16-bit model's merge reads a float32 matmul's local logits
    (``prefill_merge_kernels.MERGE_LOGITS``, what every dtype took before ``MERGE_MMA``);
    ``hold=False``, the prefill top-k reads each row's scores twice from global memory;
    ``pack=False``, it tests float16 scores one by one; ``group=1``, the merge loads one memory's
    values at a time."""
    kept = {name: getattr(*FLAGS[name]) for name in values}
    for name, value in values.items():
        module, attr = FLAGS[name]
        setattr(module, attr, (kept[name] if value else ()) if name == "mma" else value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(*FLAGS[name], value)


def forward(model, state, tokens: mx.array, memory, flags: dict | None = None) -> None:
    """One forward of ``tokens`` with ``memory`` (a MemoryContext or None), its last position's
    logits evaluated, under ``kernel_flags(**flags)``."""
    state.memory = memory
    try:
        with kernel_flags(**(flags or {})):
            out = model(tokens, cache=make_prompt_cache(model))
            mx.eval(out[:, -1])
    finally:
        state.memory = None


def forwards(model, state, tokens: mx.array, rounds: int, variants: dict) -> dict[str, list[float]]:
    """Seconds of the prompt's forward for each of ``variants`` (name -> (a MemoryContext or None,
    ``forward``'s flags)), ``rounds`` interleaved rounds -> name -> seconds per round."""
    runs = [functools.partial(forward, model, state, tokens, *variant) for variant in variants.values()]
    return dict(zip(variants, timed_rounds(runs, rounds, warmup=3)))


def kernels(model, state, ctx, tokens: mx.array, runs: int = 10) -> tuple[dict, str]:
    """CUDA, with PyTorch's profiler (CUPTI; bench.gpu_kernel_times): GPU kernel time and launches
    per forward without and with the memory -> ({row: result}, the memory forward's kernel table)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_kernel_times import kernel_table, kernel_times

    torch.zeros(1, device="cuda")  # CUPTI and the CUDA context up before the first profile
    rows, listing = {}, ""
    for name, memory in (("no memory", None), ("LOCAL", ctx)):
        forward(model, state, tokens, memory)
        mx.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                forward(model, state, tokens, memory)
            mx.synchronize()
        times = kernel_times(prof)
        total, launches = sum(t for t, _, _ in times) / runs, sum(c for _, c, _ in times) / runs
        rows[f"GPU kernel time per forward, {name} (CUPTI, {runs} forwards)"] = (
            f"{total / 1e3:.2f} ms in {launches:.0f} launches"
        )
        if memory is not None:
            listing = kernel_table(times, runs, 12)
    return rows, listing


def parts(state, bank, layers: int, tokens: int, dtype, rounds: int) -> dict:
    """CUDA: one layer's fused prefill path, its parts, and all layers chained -> {row: result}."""
    shape = state.shape
    H, KVH, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    mx.random.seed(0)
    q = mx.random.normal((1, H, tokens, d)).astype(dtype)
    k = mx.random.normal((1, KVH, tokens, d)).astype(dtype)
    v = mx.random.normal((1, KVH, tokens, d)).astype(dtype)
    mx.eval(q, k, v)
    keys_t, inv_norms, values = bank.keys[0], bank.inv_norms[0], bank.values[0]
    scale = d**-0.5
    kept = functools.partial(bank.prefill_keys, 0)  # the bank's, as a cached bank keeps them
    rows, dots = fused_attention.top_k_rows(q, keys_t, inv_norms, TOP_K, None, kept)
    mx.eval(rows, dots)

    def sdpa():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    def top_k():
        return fused_attention.top_k_rows(q, keys_t, inv_norms, TOP_K, None, kept)

    def top_k_with(**flags):  # the kernel is chosen when the graph is built
        def run():
            with kernel_flags(**flags):
                return fused_attention.top_k_rows(q, keys_t, inv_norms, TOP_K, None, kept)

        return run

    def attend_one_by_one():
        with kernel_flags(group=1):
            return attend()

    def attend():
        return prefill_attention.attend(q, k, v, "causal", rows, dots, values, scale, dtype)

    def memory_layer():
        r, dd = fused_attention.top_k_rows(q, keys_t, inv_norms, TOP_K, None, kept)
        return prefill_attention.attend(q, k, v, "causal", r, dd, values, scale, dtype)

    def evaluated(fn):
        return lambda: mx.eval(fn())

    def chained(fn):
        return lambda: mx.eval([fn() for _ in range(layers)])

    out = {}
    fns = {
        "MLX's fused attention, causal (the stock layer's attention)": sdpa,
        "`fused_attention.top_k_rows` (scores' matmul + top-k kernel)": top_k,
        "the same, the top-k kernel reading each row's scores twice": top_k_with(hold=False),
        "the same, the top-k kernel testing float16 scores one by one": top_k_with(pack=False),
        "`prefill_attention.attend` (fused attention + local logits + merge)": attend,
        "the same, the merge loading one memory's values at a time": attend_one_by_one,
        "the memory path of one layer (top_k_rows + attend)": memory_layer,
    }
    one = timed_rounds([evaluated(f) for f in fns.values()], rounds, warmup=3)
    names = list(fns)
    for name, ts in zip(names, one):
        out[f"one layer, evaluated alone: {name}"] = f"{statistics.median(ts) * 1e3:.3f} ms"
    many = timed_rounds([chained(sdpa), chained(memory_layer)], rounds, warmup=2)
    builds = []
    for fn in (sdpa, memory_layer):  # the host's part: building the graphs, no evaluation
        t0 = time.perf_counter()
        graphs = [fn() for _ in range(layers)]
        builds.append(time.perf_counter() - t0)
        mx.eval(graphs)
    for name, ts, b in zip(("MLX's fused attention alone", "the memory path"), many, builds):
        out[f"{layers} layers chained: {name}"] = (
            f"{statistics.median(ts) * 1e3:.3f} ms (building the graphs: {b * 1e3:.2f} ms)"
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1b on CUDA, tiny elsewhere")
    p.add_argument("--rows", type=positive_int, default=4096, help="bank rows per layer")
    p.add_argument("--tokens", type=positive_int, default=511, help="prompt tokens of the forward")
    p.add_argument("--rounds", type=positive_int, default=15, help="interleaved rounds (medians)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also the GPU kernel time and launches per forward (CUDA, needs PyTorch with CUDA: CUPTI)",
    )
    add_record_flag(p)
    args = p.parse_args()
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    if args.kernels and not cuda:
        p.error("--kernels profiles CUDA kernels: it needs MLX computing on its CUDA backend")
    shape = args.shape or ("1b" if cuda else "tiny")
    dims = SHAPES[shape]
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefill-"))
    try:
        model = random_llama(dims, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # loaded: the 1 B checkpoint's 2 GB are not needed
    state = extended_attention.install(model)
    rng = np.random.default_rng(0)
    n_kv, d = state.shape.num_kv_heads, state.shape.head_dim
    np_dtype = np.float16 if dims["dtype"] == "float16" else np.float32
    keys = [rng.standard_normal((n_kv, args.rows, d)).astype(np_dtype) for _ in range(dims["layers"])]
    values = [rng.standard_normal((n_kv, args.rows, d)).astype(np_dtype) for _ in range(dims["layers"])]
    bank = bank_from_numpy("bench", "1", keys, values)
    ctx = MemoryContext(LocalRetriever([bank]), top_k=TOP_K)
    tokens = mx.array([rng.integers(0, model.args.vocab_size, args.tokens).tolist()])

    dtype = getattr(mx, dims["dtype"])
    variants = {"plain": (None, {}), "local": (ctx, {})}
    if state.fused and dtype in prefill_attention.MMA_DTYPES:  # the merge from float32 logits
        variants["logits"] = (ctx, {"mma": False})
    if state.fused:  # the same bank in a cache with no room for its prefill keys: made per forward
        per_call = replace(bank, prefill={}, may_grow=lambda *_: False)
        variants["per_call"] = (MemoryContext(LocalRetriever([per_call]), top_k=TOP_K), {})
        variants["twice"] = (ctx, {"hold": False})
        variants["unpacked"] = (ctx, {"pack": False})
        variants["one_by_one"] = (ctx, {"group": 1})
    timed = forwards(model, state, tokens, args.rounds, variants)
    plain, local = timed["plain"], timed["local"]
    memory = f"{args.rows}-row memory LOCAL (top_k {TOP_K})"
    rows = {
        f"forward of {args.tokens} tokens, no memory": f"{statistics.median(plain) * 1e3:.2f} ms",
        f"forward of {args.tokens} tokens, {memory}": (
            f"{statistics.median(local) * 1e3:.2f} ms (rounds' ratios, median: {median_ratio(local, plain)}; "
            "the goal, 1 B shape on a GPU: <= 1.3x)"
        ),
    }
    before = {
        "logits": ("merged from float32 logits (as before the tensor-core merge)", "the tensor-core merge's"),
        "per_call": ("the bank's prefill keys made per forward (as before banks kept them)", "kept keys'"),
        "twice": ("the top-k reading each row's scores twice (as before it held them)", "held scores'"),
        "unpacked": ("the top-k testing float16 scores one by one (as before packed maxima)", "packed screen's"),
        "one_by_one": ("the merge loading one memory's values at a time (as before groups)", "grouped loads'"),
    }
    for name, (what, after) in before.items():
        if name in timed:
            t = timed[name]
            rows[f"forward of {args.tokens} tokens, {memory}, {what}"] = (
                f"{statistics.median(t) * 1e3:.2f} ms (rounds' ratios, median: {median_ratio(t, plain)}; "
                f"{after}: {median_ratio(local, t)} of it)"
            )
    if state.fused:
        rows.update(parts(state, bank, dims["layers"], args.tokens, dtype, args.rounds))
    listing = ""
    if args.kernels:
        more, listing = kernels(model, state, ctx, tokens)
        rows.update(more)
    head = (
        f"{describe(machine(mlx=mx.__version__, device=str(mx.default_device())))}\n\n"
        f"Random Llama (bench.generator's), "
        f"shape {shape} ({dims['layers']} layers, {dims['heads']} heads, {dims['kv_heads']} KV heads, "
        f"{dims['dtype']}); a random bank of {args.rows} rows; fused kernels: {'on' if state.fused else 'off'}; "
        f"medians of {args.rounds} interleaved rounds; `python -m bench.prefill_memory --shape {shape} "
        f"--rows {args.rows} --tokens {args.tokens} --rounds {args.rounds}`."
    )
    body = table(["measurement", "result"], rows.items())
    if listing:
        body += f"\n\nThe LOCAL forward's kernels (GPU us per forward, launches per forward):\n\n```\n{listing}\n```"
    record("prefill_memory", head + "\n\n" + body, write=args.record)


if __name__ == "__main__":
    main()
