"""Where a decode step's GPU time goes, kernel by kernel, on MLX's CUDA backend.

    python -m bench.gpu_kernel_times [--shape 1b] [--rows 4096 65536] [--streams 1 8] [--steps 30] [--top-k 10]

MLX has no kernel timer; PyTorch's profiler reads CUPTI, which records every kernel the process
launches, MLX's included. For a random Llama of ``--shape`` (bench.generator's shapes) driven by
mlx-lm's ``BatchGenerator``, with no memory and with a LOCAL bank of each ``--rows``,
it prints the wall time per decode step, the GPU kernel time per step (wall well above it: the
host is the bottleneck) and the kernels that took it, for each ``--streams`` (sequences decoding
together, the same prompt: an unpadded batch); first, the fused extended-attention kernels
of one layer against MLX's fused attention (``sdpa``). Needs MLX computing on CUDA and PyTorch
with CUDA in the same environment (the device machine has both); refuses otherwise.
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def kernel_times(prof) -> list[tuple[float, int, str]]:
    """(GPU us in total, launches, name) of every kernel the profile saw, most time first."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t, e.count, e.key))
    return sorted(rows, reverse=True)


def kernel_table(times: list, per: int, n: int) -> str:
    """The first ``n`` of ``kernel_times`` as lines: us per ``per`` calls, launches, name."""
    return "\n".join(f"  {t / per:9.1f} us  x{c / per:5.1f}  {key[:100]}" for t, c, key in times[:n])


def one_layer(fa, q, k, v, bank, top_k: int) -> None:
    """Layer 0's fused retrieval + attention over ``bank`` as a decode step runs it (the scan,
    then the attend kernel that merges its candidates), then MLX's fused attention, each
    evaluated."""
    d = q.shape[-1]
    mask = fa.mask_mode(None, q.shape[0], 1, k.shape[2])
    keys_t, inv_norms, values = bank.keys[0], bank.inv_norms[0], bank.values[0]
    mx.eval(fa.attend_top_k(q, k, v, mask, keys_t, inv_norms, values, top_k, None, d**-0.5, q.dtype))
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=None))


def decode_step(gen, state, ctx) -> None:
    """One ``BatchGenerator`` step with ``ctx`` (a MemoryContext or None) set around it."""
    state.memory = ctx
    try:
        gen.next()
    finally:
        state.memory = None


def main() -> int:
    from bench.generator import SHAPES
    from services.common.config import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[4096, 65536], help="LOCAL bank sizes")
    parser.add_argument("--steps", type=positive_int, default=30, help="decode steps timed and profiled")
    parser.add_argument(
        "--streams", type=positive_int, nargs="+", default=[1], help="sequences decoding together (each a run)"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=10, help="memories per query head (the fused kernels take <= 32)"
    )
    args = parser.parse_args()
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("needs PyTorch (its profiler reads the kernels' times through CUPTI)", file=sys.stderr)
        return 2
    if not (mx.default_device() == mx.gpu and mx.cuda.is_available() and torch.cuda.is_available()):
        print("needs MLX computing on CUDA and PyTorch with CUDA (run it on the device machine)", file=sys.stderr)
        return 2
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load

    from extmind.tiny_models import build_llama
    from services.generator import fused_attention as fa
    from services.generator.bank_cache import LocalRetriever, bank_from_numpy
    from services.generator.decode_group import unpadded_caches
    from services.generator.extended_attention import MemoryContext, install

    dims = SHAPES[args.shape]
    H, KVH, nl = dims["heads"], dims["kv_heads"], dims["layers"]
    D = dims["hidden"] // H
    dt = getattr(mx, dims["dtype"])
    np_dt = np.float16 if dt == mx.float16 else np.float32
    torch.zeros(1, device="cuda")  # CUPTI and the CUDA context up before the first profile
    rng = np.random.default_rng(0)
    banks = {
        n: bank_from_numpy(
            "m",
            "v",
            [rng.standard_normal((KVH, n, D)).astype(np_dt) for _ in range(nl)],
            [rng.standard_normal((KVH, n, D)).astype(np_dt) for _ in range(nl)],
        )
        for n in args.rows
    }

    q = mx.random.normal((1, H, 1, D)).astype(dt)
    k = mx.random.normal((1, KVH, 96, D)).astype(dt)
    v = mx.random.normal((1, KVH, 96, D)).astype(dt)
    mx.eval(q, k, v)
    for n, bank in banks.items():
        layer = functools.partial(one_layer, fa, q, k, v, bank, args.top_k)
        for _ in range(3):
            layer()
        mx.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                layer()
            mx.synchronize()
        print(f"== one layer, {n}-row bank, 1 query token, 96 local positions (per call)")
        print(kernel_table(kernel_times(prof), 20, 6))

    path = build_llama(Path(tempfile.mkdtemp()) / "m", **dims, rope_scaling="llama3", max_position=8192, seed=0)
    model, _ = load(str(path))
    state = install(model)
    prompt = [int(t) for t in rng.integers(50, 500, 32)]
    for streams, n in [(b, n) for b in args.streams for n in [None, *args.rows]]:
        ctx = MemoryContext(LocalRetriever([banks[n]]), top_k=args.top_k) if n else None
        gen = BatchGenerator(model, max_tokens=3 * args.steps + 20, stop_tokens=[], completion_batch_size=streams)
        gen.insert([prompt] * streams)
        step = functools.partial(decode_step, gen, state, ctx)
        for _ in range(3):
            step()
        state.unpadded_caches = unpadded_caches(gen)  # as the scheduler does after the prompt
        for _ in range(10):
            step()
        mx.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        mx.synchronize()
        wall = (time.perf_counter() - t) / args.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            mx.synchronize()
        times = kernel_times(prof)
        gpu = sum(t for t, _, _ in times) / args.steps / 1e3
        name = f"{streams} stream(s), " + ("no memory" if n is None else f"LOCAL {n}-row bank")
        print(f"== decode step, {name}: wall {wall * 1e3:.2f} ms, GPU kernels {gpu:.2f} ms (per step)")
        print(kernel_table(times, args.steps, 14))
        gen.close()
        state.unpadded_caches = {}
    return 0


if __name__ == "__main__":
    sys.exit(main())
