"""Flags and wiring of the generator service (``python -m services.generator``)."""

from __future__ import annotations

import asyncio
import logging

from extmind.v1 import generator_pb2, generator_pb2_grpc
from services.common.blas import blas_in_use
from services.common.config import (
    FlagParser,
    add_server_flags,
    grpc_target,
    http_port,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from services.common.server import Service
from services.generator import fused_attention, fused_projections, weights_dtype
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.http_face import GeneratorHttpFace
from services.generator.servicer import GeneratorServicer
from services.generator.warmup import WARMUP_MODES, wanted, warm_up

log = logging.getLogger("extmind.generator")

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def parse_args(argv=None):
    # Defaults come from EngineConfig (and through it from request_types): defined once.
    p = FlagParser(
        prog="python -m services.generator", description="Text generation with extended mind attention on mlx-lm."
    )
    add_server_flags(p, prefix="GENERATOR", port=50053)
    p.flag(
        "--model",
        env="GENERATOR_MODEL",
        default="",
        help='mlx-lm model (llama, mistral, qwen2, qwen3 and their MoE types; README, "Model types"): a local '
        "directory (HF or MLX layout) or a hub id",
    )
    p.flag(
        "--memory-url", env="MEMORY_URL", default="127.0.0.1:50052", type=grpc_target, help="memory service host:port"
    )
    p.flag(
        "--bank-cache-mb",
        env="GENERATOR_BANK_CACHE_MB",
        default=EngineConfig.bank_cache_bytes >> 20,
        type=int,
        help="LOCAL retrieval: MiB of memory banks kept on the device (LRU)",
    )
    p.flag(
        "--max-batch-size",
        env="GENERATOR_MAX_BATCH_SIZE",
        default=EngineConfig.max_batch_size,
        type=int,
        help="most sequences decoded together in one batch",
    )
    p.flag(
        "--prefill-batch-size",
        env="GENERATOR_PREFILL_BATCH_SIZE",
        default=EngineConfig.prefill_batch_size,
        type=int,
        help="most prompts prefilled together",
    )
    p.flag(
        "--prefill-step-size",
        env="GENERATOR_PREFILL_STEP_SIZE",
        default=EngineConfig.prefill_step_size,
        type=int,
        help="prompt tokens per prefill chunk",
    )
    p.flag(
        "--max-queue",
        env="GENERATOR_MAX_QUEUE",
        default=EngineConfig.max_queue,
        type=int,
        help="most requests in flight; more are RESOURCE_EXHAUSTED",
    )
    p.flag(
        "--stream-interval-ms",
        env="GENERATOR_STREAM_INTERVAL_MS",
        default=EngineConfig.stream_interval_ms,
        type=non_negative_float,
        help="ms between hand-overs of streamed tokens (first token, end and errors at once); 0 = every step",
    )
    p.flag(
        "--attention-mass-every",
        env="GENERATOR_ATTENTION_MASS_EVERY",
        default=EngineConfig.attention_mass_every,
        type=non_negative_int,
        help="measure the attention-mass metric (share of attention on the memories) on one decode step in "
        "this many: 1 = every step, 0 = never (each measured step costs the host a little)",
    )
    p.flag(
        "--window",
        env="GENERATOR_WINDOW",
        default=EngineConfig.window,
        type=positive_int,
        help="memory-building window in tokens (capped at the model's context)",
    )
    p.flag(
        "--stride",
        env="GENERATOR_STRIDE",
        default=EngineConfig.stride,
        type=positive_int,
        help="memory-building stride in tokens",
    )
    p.flag(
        "--memory-timeout",
        env="GENERATOR_MEMORY_TIMEOUT",
        default=EngineConfig.memory_timeout,
        type=float,
        help="seconds allowed for one memory-service call",
    )
    p.flag(
        "--http-port",
        env="GENERATOR_HTTP_PORT",
        default=8001,
        type=http_port,
        help="port of the OpenAI-compatible HTTP face (/v1/chat/completions, /v1/completions, /v1/memories, "
        "/health); 0 = a free one, -1 = off",
    )
    p.flag(
        "--dtype",
        env="GENERATOR_DTYPE",
        default=EngineConfig.dtype,
        choices=weights_dtype.CHOICES,
        help="dtype the model computes in (and its memories are stored in): auto = the checkpoint's, "
        "widened to float32 for a float16/bfloat16 checkpoint on MLX's CPU build (no fast half-precision "
        "matmul there) unless it is quantized or its float32 weights would exceed 8 GiB; model = always the "
        "checkpoint's",
    )
    p.flag(
        "--warmup",
        env="GENERATOR_WARMUP",
        default="auto",
        choices=WARMUP_MODES,
        help="before reporting SERVING, run a generation, a Memorize and LOCAL/REMOTE requests so that the first "
        "requests do not pay MLX's first-use kernel compiles (auto: on when MLX computes on a GPU)",
    )
    p.flag(
        "--fused-attention",
        env="GENERATOR_FUSED_ATTENTION",
        default=EngineConfig.fused_attention,
        choices=fused_attention.MODES,
        help="LOCAL retrieval and extended attention in fused custom kernels, CUDA only (auto: on when MLX "
        "computes on CUDA, the portable path elsewhere; off: the portable path everywhere)",
    )
    p.flag(
        "--merge-projections",
        env="GENERATOR_MERGE_PROJECTIONS",
        default=EngineConfig.merge_projections,
        choices=fused_projections.MODES,
        help="each layer's query/key/value projections as one matmul, and its MLP's gate/up as one: fewer "
        "operations per token, for a decode step bound by the host (auto: on when MLX computes on a GPU; "
        "off: the stock modules, bit for bit). A layer whose merged form does not compute what the stock "
        "one does at load keeps its own",
    )
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or GENERATOR_MODEL) is required")
    return args


class GeneratorApp:
    label = "the generator"
    loading = "its model"

    def __init__(self, args):
        self.args = args
        self.engine = GeneratorEngine(
            EngineConfig(
                model=args.model,
                memory_url=args.memory_url,
                bank_cache_bytes=args.bank_cache_mb << 20,
                max_batch_size=args.max_batch_size,
                prefill_batch_size=args.prefill_batch_size,
                prefill_step_size=args.prefill_step_size,
                window=args.window,
                stride=args.stride,
                max_queue=args.max_queue,
                stream_interval_ms=args.stream_interval_ms,
                attention_mass_every=args.attention_mass_every,
                memory_timeout=args.memory_timeout,
                dtype=args.dtype,
                fused_attention=args.fused_attention,
                merge_projections=args.merge_projections,
            )
        )
        servicer = GeneratorServicer(self.engine, max_response_bytes=int(args.max_response_mb * (1 << 20)))
        self.services = [
            Service(SERVICE_NAME, lambda s: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, s))
        ]
        self.http = GeneratorHttpFace(
            self.engine, auth_token=args.auth_token, max_body_bytes=args.max_message_mb * 1024 * 1024
        )

    def describe(self) -> dict:
        a = self.args
        return {"blas": blas_in_use(), "model": a.model, "memory_url": a.memory_url, "http_port": a.http_port}

    async def on_start(self) -> None:
        if self.args.http_port >= 0:
            await self.http.start(self.args.host, self.args.http_port)  # /health says 503 while loading
        await asyncio.to_thread(self.engine.start)
        if wanted(self.args.warmup):
            took = await warm_up(self.engine, batch=min(8, self.args.max_batch_size))
            log.info("warmed up", extra={"seconds": took})
        self.http.loaded = True

    def on_drain(self) -> None:
        self.http.draining = True  # GET /health answers 503 while in-flight calls finish

    async def on_stop(self) -> None:
        await self.http.stop()
        await asyncio.to_thread(self.engine.stop)
