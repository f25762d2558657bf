"""The HTTP face (``--http-port``) for clients that speak HTTP, sharing the engine's queue.

    POST /embed           {"texts"|"input": [...], "model", "input_type", "instruction", "dimensions",
                           "normalize", "truncate"} -> {"embeddings", "model", "dimensions", "token_counts"}
                           (plain /embed is the document path)
    POST /v1/embeddings   OpenAI-compatible (input: a string, a list of strings, a list of token ids or a
                          list of such lists; model, dimensions, encoding_format float|base64)
    GET  /v1/models       OpenAI-compatible model list
    GET  /health          200 when ready, 503 while loading or draining
    GET  /info            the served models and batching limits

Starlette routes served by uvicorn (services/common/http_server.py), sharing the engine's queue;
errors, auth, body limits, the access line, /health and /metrics come from
services/common/http_common.py.

Errors have OpenAI's shape on every endpoint (``{"error": {"message", "type", "param", "code"}}``);
``code`` is the gRPC status name in lower case, except an unknown model, which is OpenAI's
``model_not_found``.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from starlette.requests import Request
from starlette.routing import Route

from extmind.errors import ExtmindError, NotFound
from services.common.http_common import BadField, JsonFace, read_json_object
from services.embedder.engine import DOCUMENT, QUERY, EmbedderEngine


def _model(body: dict) -> str:
    value = body.get("model")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadField("model", "'model' must be a string (a served model's name or alias)")
    return value


def _string(body: dict, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadField(key, f"'{key}' must be a string")
    return value


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadField(key, f"'{key}' must be true or false, not {json.dumps(value)}")
    return value


def _openai_input(body: dict) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's ``input``: a string, strings, token ids, or lists of token ids -> (texts, token lists)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(isinstance(t, str) for t in value):
            return value, None
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return None, [value]
        if all(isinstance(t, list) for t in value):
            for i, ids in enumerate(value):
                bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
                if bad is not None or not ids:
                    raise BadField(
                        "input",
                        f"'input'[{i}] must be a non-empty list of integer token ids"
                        + (f" ({bad!r} is not one)" if bad is not None else ""),
                    )
            return None, value
    raise BadField(
        "input",
        "'input' must be a non-empty string, a list of strings, a list of token ids or a list of lists of token ids",
    )


def _texts(body: dict, *keys: str) -> list[str]:
    for key in keys:
        value = body.get(key)
        if value is None or value == []:
            continue
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return value
        raise BadField(key, f"'{key}' must be a string or a list of strings (token ids: POST /v1/embeddings)")
    raise BadField(keys[0], f"send the texts in {' or '.join(repr(k) for k in keys)} as a non-empty list of strings")


def _int(body: dict, key: str) -> int:
    value = body.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadField(key, f"'{key}' must be a non-negative integer")
    return value


def _input_type(body: dict) -> str:
    value = (_string(body, "input_type") or DOCUMENT).lower()
    if value not in (DOCUMENT, QUERY):
        raise BadField("input_type", "'input_type' is 'document' (default) or 'query'")
    return value


class HttpFace(JsonFace):
    """The embedder's routes on the shared face (services/common/http_common.py); ``engine`` is
    None while loading (/health answers 503, every endpoint 503 unavailable)."""

    label = "embedder-http"
    loading_message = "the embedder is still loading its models; retry when GET /health is 200"

    def __init__(self, *, auth_token: str = "", max_body_bytes: int = 64 * 1024 * 1024):
        super().__init__(auth_token=auth_token, max_body_bytes=max_body_bytes)
        self.engine: EmbedderEngine | None = None

    def ready(self) -> bool:
        return self.engine is not None

    def health(self) -> dict:
        return {"status": "ok", "models": [m.name for m in self.engine.models]}

    def error_code(self, exc: ExtmindError) -> str:
        # The engine's only NotFound is an unknown model: OpenAI's own code, which clients match on.
        return "model_not_found" if isinstance(exc, NotFound) else exc.code

    def unrouted(self, method: str, path: str) -> str:
        return (
            f"{method} {path} is not served; endpoints: POST /embed, POST /v1/embeddings, "
            "GET /v1/models, GET /info, GET /health, GET /metrics"
        )

    def routes(self) -> list[Route]:
        def post(handler):
            async def run(request: Request):
                return await handler(await read_json_object(request, self.max_body))

            return self.endpoint(run)

        def get(handler):
            return self.endpoint(lambda request: handler({}))

        return [
            Route("/embed", post(self._embed), methods=["POST"]),
            Route("/v1/embeddings", post(self._openai), methods=["POST"]),
            Route("/v1/models", get(self._models), methods=["GET"]),
            Route("/info", get(self._info), methods=["GET"]),
        ]

    # --- endpoints ------------------------------------------------------------------------------
    async def _embed(self, body: dict) -> dict:
        r = await self.engine.embed(
            _texts(body, "texts", "input"),
            model=_model(body),
            input_type=_input_type(body),
            instruction=_string(body, "instruction"),
            dimensions=_int(body, "dimensions"),
            normalize=_bool(body, "normalize", True),
            truncate=_bool(body, "truncate", True),
        )
        return {
            "embeddings": r.vectors.tolist(),
            "model": r.model,
            "dimensions": r.dimensions,
            "token_counts": r.token_counts,
        }

    async def _openai(self, body: dict) -> dict:
        fmt = _string(body, "encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadField("encoding_format", "'encoding_format' is 'float' or 'base64'")
        texts, token_inputs = _openai_input(body)
        r = await self.engine.embed(
            texts,
            token_inputs=token_inputs,
            model=_model(body),
            input_type=_input_type(body),
            instruction=_string(body, "instruction"),
            dimensions=_int(body, "dimensions"),
        )

        def encode(v: np.ndarray):
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()

        tokens = sum(r.token_counts)
        return {
            "object": "list",
            "model": r.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(r.vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _models(self, body: dict) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": m["name"], "object": "model", "owned_by": "extmind", "kind": m["kind"], "loaded": m["loaded"]}
                for m in self.engine.model_list()
            ],
        }

    async def _info(self, body: dict) -> dict:
        return self.engine.info()
