"""Where the time of Memorize and of a cold fetch + cache goes, on the 1B model's KV shape.

    python -m bench.kv_path [--tokens 4096] [--layers 16] [--kv-heads 8] [--head-dim 64]
                            [--dtype float16] [--repeat 3] [--record]

The host side of the KV path is measured with real parts: ``MemoryBuilder`` (windows, capture,
readback, encoding), the gRPC AppendMemory stream, a real memory service on a real Redis
(``appendfsync always``), its background load (Redis reads + FAISS index build), FetchMemory
and ``bank_from_stored`` into MLX arrays. Only the model is a stand-in (``KVShapeProxy``): its
"forward" slices each layer's keys and values out of one random block and writes them to an mlx-lm KV
cache, so every byte of the 1B model's KV (16 layers x 8 KV heads x head_dim 64, float16:
128 MiB for 4 096 tokens) flows through the path while the arithmetic, which a GPU does in
well under 0.1 s, stays out of it (a real random Llama of that KV shape takes ~200 s per 2 048
tokens here: MLX's CPU build has no fast float16 attention).

Prints one table: the whole Memorize and the cold fetch + cache, and per stage where their time
went (generator side timed around the calls; memory-service side from its log lines).
"""

from services.common.blas import ensure_openblas

ensure_openblas()

import argparse  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from bench.common import add_record_flag, describe, machine, record, table  # noqa: E402
from extmind import tensor  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from services.common.mlx_thread import MLXThread  # noqa: E402
from services.generator import bank_cache, memory_builder, memory_client  # noqa: E402
from services.generator.extended_attention import ExtendedMindState  # noqa: E402
from services.generator.kv_dtypes import MX_DTYPES  # noqa: E402
from services.generator.memory_builder import MemoryBuilder  # noqa: E402
from services.generator.memory_client import MemoryClient  # noqa: E402
from services.generator.memory_resolution import MemoryResolver, ModelShape  # noqa: E402
from services.generator.request_types import DEFAULT_WINDOW  # noqa: E402

VOCAB = 512


class KVShapeProxy:
    """A model with a real model's KV shape and next to no arithmetic: a forward over L tokens
    "computes" each layer's raw keys and values [1, KVH, L, d] as slices of one random block made
    up front (the values do not depend on the tokens: only the bytes moved matter here), captures
    them into ``state.capture`` as the extended-attention modules do, and writes them to the
    mlx-lm cache. ``layers`` exists for ``make_prompt_cache``."""

    def __init__(self, state: ExtendedMindState, layers: int, kv_heads: int, head_dim: int, dtype, max_len: int):
        self.em_state = state
        self.layers = [None] * layers
        rng = np.random.default_rng(0)
        block = rng.standard_normal((layers, 2, 1, kv_heads, max_len, head_dim), dtype=np.float32)
        self.block = mx.array(block).astype(dtype)
        mx.eval(self.block)

    def __call__(self, tokens: mx.array, cache):
        L = tokens.shape[1]
        for layer, c in enumerate(cache):
            k, v = self.block[layer, 0, :, :, :L], self.block[layer, 1, :, :, :L]
            if self.em_state.capture is not None:
                self.em_state.capture.append((layer, k, v))
            c.update_and_fetch(k, v)
        return tokens  # the "logits", never used


def stand_in_forward_seconds(model, tokens: list[int], windows, chunk: int) -> float:
    """Seconds of the stand-in's forwards alone over every window and chunk (cache writes
    included, nothing captured): the part of "forward + readback" a GPU's model would replace."""
    t0 = time.perf_counter()
    for w in windows:
        cache = make_prompt_cache(model)
        for lo in range(w.start, w.end, chunk):
            model(mx.array(tokens[lo : min(lo + chunk, w.end)], dtype=mx.int32)[None], cache=cache)
            mx.eval([c.state for c in cache])
    return time.perf_counter() - t0


class Stages:
    """Seconds per named stage, summed over the calls wrapped by ``timed``."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextmanager
    def span(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, owner, attr: str, name: str):
        """Times every call of ``owner.attr`` (a function of a module or a class) as ``name``."""
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            with self.span(name):
                return fn(*a, **kw)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, fn)


def service_log_seconds(log: Path, since: int) -> dict:
    """The memory service's own timings of the last Memorize and fetch, from its log lines after
    byte ``since``: the append stream (seconds, of which waiting for Redis) and the background
    load of the memory into RAM (Redis read, index build)."""
    text = log.read_bytes()[since:].decode(errors="replace")
    out = {}
    for key, pattern in (
        ("append stream (service)", r"rows appended.*?seconds=([0-9.]+)"),
        ("  of which waiting for Redis", r"rows appended.*?redis_wait_seconds=([0-9.]+)"),
        ("background load (service)", r"memory loaded.*?seconds=([0-9.]+)"),
        ("  of which getting the rows", r"memory loaded.*?read_seconds=([0-9.]+)"),
        ("  of which index build", r"memory loaded.*?index_seconds=([0-9.]+)"),
        ("  paused while FetchMemory sent the rows", r"memory loaded.*?paused_for_fetch_seconds=([0-9.]+)"),
    ):
        found = re.findall(pattern, text)
        if found:
            out[key] = float(found[-1])
    sources = re.findall(r"memory loaded.*?source=([a-z]+)", text)
    if sources:
        out["source: " + sources[-1]] = 0.0
    return out


def wait_for_line(log: Path, since: int, text: str, timeout: float = 60.0) -> None:
    """Waits until the service's log holds ``text`` after byte ``since``."""
    deadline = time.monotonic() + timeout
    while text.encode() not in log.read_bytes()[since:] and time.monotonic() < deadline:
        time.sleep(0.02)


def run(args) -> list[tuple[str, str]]:
    dtype = {"float16": tensor.FLOAT16, "bfloat16": tensor.BFLOAT16, "float32": tensor.FLOAT32}[args.dtype]
    rng = np.random.default_rng(1)
    token_ids = [int(t) for t in rng.integers(1, VOCAB, args.tokens)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-kvpath-"))
    results: dict[str, list[float]] = {}
    try:
        with memory_stack(tmp) as mem:
            log = mem.log_path
            mlx = MLXThread("bench-mlx")
            state = ExtendedMindState()
            model = mlx.call(
                KVShapeProxy, state, args.layers, args.kv_heads, args.head_dim, MX_DTYPES[dtype], DEFAULT_WINDOW
            )
            client = MemoryClient(mem.address)
            shape = ModelShape("bench-kv-proxy", args.layers, args.kv_heads, args.head_dim, VOCAB, dtype)
            st = Stages()

            def on_mlx_thread(fn, *a):  # the builder's forwards and readbacks, timed
                with st.span("forward + readback (MLX thread)"):
                    return mlx.call(fn, *a)

            builder = MemoryBuilder(model, state, client, shape, dtype, {0}, chunk=2048, run=on_mlx_thread)
            resolver = MemoryResolver(client, shape)
            for i in range(args.repeat + 1):  # the first round is a warm-up
                st.s = {}
                undo = [
                    st.wrap(memory_builder, "append_request", "encode messages"),
                    st.wrap(memory_client.MemoryClient, "fetch_stored", "FetchMemory (gRPC, decode, join)"),
                ]
                since = log.stat().st_size
                try:
                    with st.span("Memorize (to READY)"):
                        mid = builder.build(token_ids)["memory_id"]
                    info = resolver.resolve((mid,))[0]
                    with st.span("fetch + cache (cold, right after Memorize)"):
                        bank = bank_cache.fetch_bank(resolver, info, mlx)
                finally:
                    for u in undo:
                        u()
                wait_for_line(log, since, "memory loaded")  # the rows below do not share the CPU with it
                with st.span("fetch again (loaded: no load to wait for)"):
                    stored = resolver.fetch(info)
                with st.span("cache on the device alone (bank_from_stored)"):
                    mlx.call(bank_cache.bank_from_stored, mid, info.version, stored)
                st.s.update(service_log_seconds(log, since))
                assert bank.rows == len(token_ids) - token_ids.count(0)
                del bank, stored
                client.delete_memory(mid)
                st.s["  stand-in forward alone (not on a GPU)"] = mlx.call(
                    stand_in_forward_seconds, model, token_ids, memory_builder.plan_windows(len(token_ids)), 2048
                )
                if i:
                    for k, v in st.s.items():
                        results.setdefault(k, []).append(v)
            client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    order = [
        "Memorize (to READY)",
        "forward + readback (MLX thread)",
        "  stand-in forward alone (not on a GPU)",
        "encode messages",
        "append stream (service)",
        "  of which waiting for Redis",
        "fetch + cache (cold, right after Memorize)",
        "FetchMemory (gRPC, decode, join)",
        "background load (service)",
        "  of which getting the rows",
        "  of which index build",
        "  paused while FetchMemory sent the rows",
        "fetch again (loaded: no load to wait for)",
        "cache on the device alone (bank_from_stored)",
    ]
    rows = []
    for k in order + [k for k in results if k not in order]:
        if k in results:
            v = results[k]
            rows.append((k, f"{statistics.median(v) * 1e3:.0f} ms (" + ", ".join(f"{x * 1e3:.0f}" for x in v) + ")"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--repeat", type=int, default=3, help="measured rounds after one warm-up round (median)")
    add_record_flag(p)
    args = p.parse_args()
    rows = run(args)
    mib = (
        args.tokens
        * args.layers
        * args.kv_heads
        * args.head_dim
        * 2
        * tensor.ITEMSIZE[
            {"float16": tensor.FLOAT16, "bfloat16": tensor.BFLOAT16, "float32": tensor.FLOAT32}[args.dtype]
        ]
        / 2**20
    )
    head = (
        f"{describe(machine())}.\n"
        f"KV-shape proxy of the 1B model (stand-in forward, see the module docstring): {args.tokens} tokens, "
        f"{args.layers} layers x {args.kv_heads} KV heads x head_dim {args.head_dim}, {args.dtype} "
        f"({mib:.0f} MiB of keys + values); real memory service + Redis (appendfsync always) on loopback; "
        f"median of {args.repeat} (each run in brackets); `python -m bench.kv_path --tokens {args.tokens}`."
    )
    record("kv_path", head + "\n\n" + table(["stage", "time"], rows), write=args.record)


if __name__ == "__main__":
    main()
