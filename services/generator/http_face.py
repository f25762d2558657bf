"""The generator's OpenAI-compatible HTTP face (``--http-port``), on the same engine as gRPC.

    POST   /v1/chat/completions   OpenAI chat completions (stream: server-sent events)
    POST   /v1/completions        OpenAI text completions (stream: server-sent events)
    GET    /v1/models             the served model, with its fingerprint
    POST   /v1/memories           memorize {"text", "memory_id"?, "metadata"?, "stream"?}
    GET    /v1/memories           this model's memories, a page at a time (?limit=&after=)
    GET    /v1/memories/{id}      one memory
    DELETE /v1/memories/{id}      deletes it
    GET    /health                200 when the model is loaded, 503 while loading or draining
    GET    /metrics               Prometheus

Requests are read by services/generator/openai_protocol.py and answered by
openai_responses.py; memories ride in the ``extmind`` field (docs/contract.md, "HTTP faces").
Errors, auth, body limits, the access line, /health and /metrics: services/common/http_common.py.
Streams: ``data: {json}\\n\\n`` events, ``data: [DONE]\\n\\n`` last; an error after the first event
is one ``data: {"error": ...}`` event (the status line is gone by then).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from extmind.errors import ExtmindError, InvalidArgument, NotFound
from extmind.v1 import memory_pb2
from services.common.http_common import BadField, JsonFace, error_body, read_json_object, unless_disconnected
from services.generator.engine import GeneratorEngine
from services.generator.memory_builder import MemorizeProgress
from services.generator.openai_protocol import parse_chat, parse_completion
from services.generator.openai_responses import Answer
from services.generator.request_types import Chunk

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # the memory service's ListMemories limits


def sse(data) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def memory_object(m: memory_pb2.Memory) -> dict:
    """A stored memory as the HTTP face shows it. ``num_tokens`` and ``num_rows`` are both the
    rows stored (the memory service's ``num_tokens``): every memory object carries ``num_rows``, so
    a client reading it from ``POST`` also finds it in ``GET``."""
    return {
        "id": m.memory_id,
        "object": "memory",
        "model_fingerprint": m.model_fingerprint,
        "num_tokens": m.num_tokens,
        "num_rows": m.num_tokens,
        "bytes": m.bytes,
        "state": "ready" if m.state == memory_pb2.MEMORY_STATE_READY else "building",
        "metadata": dict(m.labels),
        "created_at": m.create_time.seconds,
    }


_HTTP_TERMS = {"ListMemories": "GET /v1/memories", "page_token": "'after'"}
_RPC_TERM = re.compile(r"\b(" + "|".join(_HTTP_TERMS) + r")\b")


class ModelNotFound(NotFound):
    """A request for a model this generator does not serve: OpenAI's ``model_not_found``, which
    clients match on (a missing memory stays ``not_found``)."""


class GeneratorHttpFace(JsonFace):
    label = "generator-http"
    loading_message = "the generator is still loading its model; retry when GET /health is 200"

    def __init__(self, engine: GeneratorEngine, *, auth_token: str = "", max_body_bytes: int = 64 * 1024 * 1024):
        super().__init__(auth_token=auth_token, max_body_bytes=max_body_bytes)
        self.engine = engine
        self.loaded = False  # set by the app once the engine has started

    def ready(self) -> bool:
        return self.loaded

    @property
    def model_id(self) -> str:
        """The served model's name: its directory's name, or the hub id it was loaded from."""
        name = self.engine.model_name
        return Path(name).name if Path(name).expanduser().is_dir() else name

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "model_fingerprint": self.engine.fingerprint}

    def unrouted(self, method: str, path: str) -> str:
        return (
            f"{method} {path} is not served; endpoints: POST /v1/chat/completions, POST /v1/completions, "
            "GET /v1/models, POST|GET /v1/memories, GET|DELETE /v1/memories/{id}, GET /health, GET /metrics"
        )

    def routes(self) -> list[Route]:
        e = self.endpoint
        return [
            Route("/v1/chat/completions", e(lambda r: self._complete(r, parse_chat)), methods=["POST"]),
            Route("/v1/completions", e(lambda r: self._complete(r, parse_completion)), methods=["POST"]),
            Route("/v1/models", e(self._models), methods=["GET"]),
            Route("/v1/memories", e(self._memorize), methods=["POST"]),
            Route("/v1/memories", e(self._list_memories), methods=["GET"]),
            Route("/v1/memories/{memory_id:path}", e(self._get_memory), methods=["GET"]),
            Route("/v1/memories/{memory_id:path}", e(self._delete_memory), methods=["DELETE"]),
        ]

    # --- completions --------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model and model not in (self.model_id, self.engine.model_name):
            raise ModelNotFound(
                f"model {model!r} is not served here; this generator serves {self.model_id!r} (GET /v1/models)"
            )

    def error_code(self, exc: ExtmindError) -> str:
        return "model_not_found" if isinstance(exc, ModelNotFound) else exc.code

    def error_message(self, exc: ExtmindError) -> str:
        # The memory service's messages name its RPCs and fields; an HTTP caller has endpoints.
        return _RPC_TERM.sub(lambda m: _HTTP_TERMS[m.group(1)], exc.message)

    async def _complete(self, request: Request, parse) -> Response | dict:
        req = parse(await read_json_object(request, self.max_body))
        self._check_model(req.model)
        gen = req.to_generation(self.engine)
        answer = Answer(req, self.model_id, self.engine.fingerprint, lambda t: self.engine.tokenizer.decode([t]))
        events = self.engine.generate(gen)
        # Request errors (bad fields, memories) answer with their status. A client that hangs up
        # while the request waits for its first token (queued, prefilling) cancels it there.
        first = await unless_disconnected(request, anext(events))
        if not req.stream:

            async def whole():
                try:
                    ev = first
                    while True:
                        if isinstance(ev, Chunk):
                            answer.add(ev)
                        else:
                            answer.end(ev)
                            return
                        ev = await anext(events)
                finally:
                    await events.aclose()  # a client gone before the end frees its batch slot

            await unless_disconnected(request, whole())
            self._note(request, answer)
            return answer.body()
        return self._stream(request, self._completion_events(request, answer, first, events))

    def _note(self, request: Request, answer: Answer) -> None:
        f = answer.final
        request.state.access.update(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens)

    async def _completion_events(self, request: Request, answer: Answer, first, events) -> AsyncIterator[bytes]:
        try:
            if (opening := answer.first_chunk()) is not None:
                yield sse(opening)
            ev = first
            while True:
                if isinstance(ev, Chunk):
                    if (obj := answer.stream_chunk(ev)) is not None:
                        yield sse(obj)
                else:
                    for obj in answer.last_chunks(ev):
                        yield sse(obj)
                    self._note(request, answer)
                    return
                ev = await anext(events)
        finally:
            await events.aclose()  # a client gone mid-stream frees its batch slot now

    def _stream(self, request: Request, events: AsyncIterator[bytes]) -> StreamingResponse:
        async def framed():
            try:
                async for data in events:
                    yield data
                yield sse("[DONE]")
            except ExtmindError as exc:  # after the status line: the error is the stream's last event
                request.state.access["error"] = exc.message
                param = getattr(exc, "param", None)
                yield sse(error_body(exc.http_status, self.error_code(exc), self.error_message(exc), param))
            finally:
                await events.aclose()

        return StreamingResponse(framed(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def _models(self, request: Request) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "extmind",
                    "model_fingerprint": self.engine.fingerprint,
                    "max_context": self.engine.max_context,
                }
            ],
        }

    # --- memories -----------------------------------------------------------------------------------
    async def _memorize(self, request: Request) -> Response | dict:
        body = await read_json_object(request, self.max_body)
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise BadField("text", "'text' must be a non-empty string: the text to memorize")
        memory_id = body.get("memory_id")
        memory_id = "" if memory_id is None else memory_id
        if not isinstance(memory_id, str):
            raise BadField("memory_id", "'memory_id' must be a string (empty = the server picks one)")
        metadata = body.get("metadata")
        metadata = {} if metadata is None else metadata
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise BadField("metadata", "'metadata' must be an object of string values")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadField("stream", "'stream' must be a boolean")
        tokens = self.engine.memorize_input(text=text)
        events = self.engine.memorize_stream(tokens, memory_id=memory_id, labels=metadata)
        first = await anext(events)  # a bad request or an unreachable memory service answers with its status
        if not stream:

            async def whole() -> dict:
                try:
                    ev = first
                    while not isinstance(ev, dict):
                        ev = await anext(events)
                    return ev
                finally:
                    await events.aclose()  # a client gone stops the build and deletes the half-built memory

            ev = await unless_disconnected(request, whole())
            request.state.access.update(tokens=ev["num_tokens"])
            return await self._memory_of(ev)
        return self._stream(request, self._memorize_events(request, first, events))

    async def _memory_of(self, done: dict) -> dict:
        # num_tokens and num_rows, as in every memory object, count what is stored (the rows);
        # input_tokens is what gRPC Memorize calls num_tokens: the tokens of the text, special ones included.
        memory = memory_object(await self.engine.get_memory(done["memory_id"]))
        return {**memory, "input_tokens": done["num_tokens"]}

    async def _memorize_events(self, request: Request, first, events) -> AsyncIterator[bytes]:
        try:
            async for data in self._memorize_progress(request, first, events):
                yield data
        finally:
            await events.aclose()  # a client gone mid-stream stops the build and deletes the half-built memory

    async def _memorize_progress(self, request: Request, first, events) -> AsyncIterator[bytes]:
        ev = first
        while True:
            if isinstance(ev, MemorizeProgress):
                yield sse(
                    {
                        "object": "memory.progress",
                        "tokens_done": ev.tokens_done,
                        "tokens_total": ev.tokens_total,
                        "windows_done": ev.windows_done,
                        "windows_total": ev.windows_total,
                        "elapsed_seconds": ev.elapsed_seconds,
                        "eta_seconds": ev.eta_seconds,
                    }
                )
            else:
                request.state.access.update(tokens=ev["num_tokens"])
                yield sse(await self._memory_of(ev))
                return
            ev = await anext(events)

    async def _list_memories(self, request: Request) -> dict:
        q = request.query_params
        limit = q.get("limit", str(DEFAULT_PAGE_SIZE))
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            raise BadField("limit", f"'limit' is {limit!r}; it must be an integer in [1, {MAX_PAGE_SIZE}]")
        after = q.get("after") or q.get("page_token", "")  # the gRPC name is understood too
        memories, next_token = await self.engine.list_memories(page_size=int(limit), page_token=after)
        return {
            "object": "list",
            "data": [memory_object(m) for m in memories],
            "has_more": bool(next_token),
            "next_page_token": next_token or None,  # pass it as ?after= for the next page
        }

    async def _get_memory(self, request: Request) -> dict:
        return memory_object(await self.engine.get_memory(request.path_params["memory_id"]))

    async def _delete_memory(self, request: Request) -> dict:
        memory_id = request.path_params["memory_id"]
        if not memory_id:
            raise InvalidArgument("the memory id is empty: DELETE /v1/memories/{id}")
        await self.engine.delete_memory(memory_id)
        return {"id": memory_id, "object": "memory.deleted", "deleted": True}
