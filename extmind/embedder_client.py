"""Python client for text embeddings with a fallback chain that never mixes vector spaces.

    from extmind.embedder_client import EmbedderClient
    client = EmbedderClient("qwen3-0.6b")
    r = client.embed(["a document"])            # r.vectors float32 [n, d]; r.backend, r.model, r.dimensions
    q = client.embed(["a question"], input_type="query")

Backends, tried in order (each only if configured / available):

1. ``remote``: the embedder service at ``MLX_SERVICE_URL`` -- ``grpc://host:port`` or ``host:port``
   (gRPC), ``http(s)://...`` (its HTTP face).
2. ``local``: the embedder's MLX model code in this process, when the services are installed next
   to this package (``services.embedder.local_backend`` and ``mlx`` import; this package never
   needs them) and the model resolves locally (``MLX_MODEL_*_PATH``, ``MLX_MODELS_DIR``, a
   directory, the hub cache; never downloads).
3. ``ollama``: ``OLLAMA_URL`` (default http://localhost:11434), ``POST /api/embed``.
4. ``openai``: ``OPENAI_API_KEY`` (+ ``OPENAI_BASE_URL``), ``POST /v1/embeddings``.

Vectors of different models are not comparable, so the chain only moves to a backend that serves
the SAME model (known names per backend, or ``backend_models={"ollama": "..."}``, which asserts
the name is that same model). A different model is used only with ``allow_other_model=True``
together with ``other_models={"ollama": "nomic-embed-text"}``. A backend returning vectors of a
size the model does not have is refused. Once a client has produced vectors it stays pinned to
that model and size.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from extmind.embedding_models import BY_NAME, DEFAULT_TASK, canonical, query_text
from extmind.errors import (
    DeadlineExceeded,
    ExtmindError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)

BACKENDS = ("remote", "local", "ollama", "openai")
# Installed with the services (and mlx), the "local" backend runs the embedder's model code here.
_LOCAL_MODULE = "services.embedder.local_backend"


def _grpc_channel(url: str):
    """The channel to MLX_SERVICE_URL's gRPC target; a URL that is none skips the backend, saying why."""
    from extmind.channels import sync_channel  # grpc: only for the gRPC backend

    try:
        return sync_channel(url)
    except ValueError as exc:
        raise _Skip(f"MLX_SERVICE_URL: {exc}") from None


# Errors that say "this backend cannot serve it" (down, busy, model absent, another vector space):
# the chain tries the next backend. Any other error describes the request and reaches the caller.
_TRY_NEXT = (Unavailable, DeadlineExceeded, NotFound, ResourceExhausted, Unimplemented, FailedPrecondition)


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dimensions]
    backend: str  # remote-grpc | remote-http | local | ollama | openai
    model: str  # the model that produced them (canonical name when known)
    dimensions: int
    token_counts: list[int] = field(default_factory=list)


class _Skip(Exception):
    """This backend is not configured or answered unusably (no error of ours): try the next one."""


class EmbedderClient:
    def __init__(
        self,
        model: str = "",
        *,
        url: str | None = None,
        backends=BACKENDS,
        timeout: float = 30.0,
        ollama_url: str | None = None,
        openai_api_key: str | None = None,
        openai_base_url: str | None = None,
        backend_models: dict | None = None,
        allow_other_model: bool = False,
        other_models: dict | None = None,
        auth_token: str | None = None,
    ):
        self.model = model.strip()
        self.url = os.environ.get("MLX_SERVICE_URL", "") if url is None else url
        self.backends = [b for b in backends if b in BACKENDS]
        self.timeout = timeout
        self.ollama_url = (ollama_url or os.environ.get("OLLAMA_URL") or "http://localhost:11434").rstrip("/")
        self.openai_key = os.environ.get("OPENAI_API_KEY", "") if openai_api_key is None else openai_api_key
        self.openai_url = (openai_base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip(
            "/"
        )
        self.backend_models = dict(backend_models or {})
        self.allow_other_model = allow_other_model
        self.other_models = dict(other_models or {})
        self.auth_token = auth_token
        self.pinned: tuple[str, int] | None = None  # (model, full size) once vectors were produced
        self._channel = None
        self._local = None  # services.embedder.local_backend.LocalEmbedder, once used

    # --- public ---------------------------------------------------------------------------------
    def embed(
        self, texts: list[str] | str, *, input_type: str = "document", instruction: str = "", dimensions: int = 0
    ) -> EmbedResult:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise InvalidArgument("send a non-empty list of non-empty texts")
        if input_type not in ("document", "query"):
            raise InvalidArgument("input_type is 'document' or 'query'")
        for i, t in enumerate(texts):
            try:
                t.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate: no backend can send it
                raise InvalidArgument(f"text {i} is not valid Unicode ({exc.reason} at {exc.start})") from None
        tried = []
        for backend in self.backends:
            try:
                result = getattr(self, f"_embed_{backend}")(texts, input_type, instruction, dimensions)
                self._check_space(result, dimensions)
                return result
            except _Skip as why:
                tried.append(f"{backend}: {why}")
            except _TRY_NEXT as why:
                tried.append(f"{backend}: {why.code}: {why.message}")
        wanted = self.pinned[0] if self.pinned else (self.model or "the default model")
        raise Unavailable(
            f"no backend could embed with {wanted}; tried {'; '.join(tried) or 'none'}. "
            "Start the embedder service (MLX_SERVICE_URL), make the model available locally, "
            "or pass allow_other_model=True with other_models={...} to accept another vector space"
        )

    def health(self) -> dict[str, dict]:
        """Probes every configured backend without embedding: {backend: {"ok": bool, "detail": str}}."""
        out = {}
        for backend in self.backends:
            try:
                out[backend] = {"ok": True, "detail": getattr(self, f"_probe_{backend}")()}
            except _Skip as why:
                out[backend] = {"ok": False, "detail": str(why)}
        return out

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- identity -------------------------------------------------------------------------------
    def _wanted(self) -> str:
        return self.pinned[0] if self.pinned else canonical(self.model) if self.model else ""

    def _names_on(self, backend: str) -> list[tuple[str, bool]]:
        """-> [(model name to ask this backend for, whether it is another model than wanted)]:
        the same model first, then the caller's explicitly allowed other model."""
        wanted = self._wanted()
        names = []
        if backend in self.backend_models:
            names.append((self.backend_models[backend], False))
        elif wanted in BY_NAME and getattr(BY_NAME[wanted], backend):
            names.append((getattr(BY_NAME[wanted], backend), False))
        elif wanted:
            names.append((wanted, False))
        if self.allow_other_model and backend in self.other_models:
            names.append((self.other_models[backend], True))
        if not names:
            raise _Skip("no model named: pass EmbedderClient(model=...) or backend_models for this backend")
        return names

    def _check_space(self, r: EmbedResult, dimensions: int) -> None:
        """Refuses vectors of another model or of a size the model does not have; pins the client."""
        model = canonical(r.model)
        other = self.allow_other_model and bool(self._wanted()) and model != self._wanted()
        if self.pinned and model != self.pinned[0] and not self.allow_other_model:
            raise FailedPrecondition(
                f"{r.backend} answered with {r.model} but this client produced "
                f"{self.pinned[0]} vectors before: refusing to mix vector spaces"
            )
        known = BY_NAME.get(model)
        full = (
            known.dimensions
            if known and known.dimensions
            else (self.pinned[1] if self.pinned and self.pinned[0] == model else None)
        )
        width = int(r.vectors.shape[1])
        if dimensions and width != dimensions:
            raise FailedPrecondition(f"{r.backend} returned {width}-dim vectors for dimensions={dimensions}; refused")
        if not dimensions and full is not None and width != full:
            raise FailedPrecondition(
                f"{r.backend} returned {width}-dim vectors but {r.model} has {full} dims: "
                "not the same vector space, refused"
            )
        if self.pinned is None and not other:
            self.pinned = (model, full if full is not None else (width if not dimensions else None))
        r.dimensions = width

    # --- backends -------------------------------------------------------------------------------
    def _embed_remote(self, texts, input_type, instruction, dimensions) -> EmbedResult:
        if not self.url:
            raise _Skip("MLX_SERVICE_URL is not set")
        model = self._wanted()
        if self.url.startswith(("http://", "https://")):
            body = {"texts": texts, "input_type": input_type, "instruction": instruction, "dimensions": dimensions}
            if model:
                body["model"] = model
            url = f"{self.url.rstrip('/')}/embed"
            out = self._http_json(url, body, self._bearer(), "remote")
            with _answer_of(url):
                vectors = np.asarray(out["embeddings"], dtype=np.float32)
                r = EmbedResult(
                    vectors, "remote-http", out["model"], int(out["dimensions"]), out.get("token_counts", [])
                )
        else:
            import grpc

            from extmind import tensor
            from extmind.channels import auth_metadata
            from extmind.v1 import embedder_pb2, embedder_pb2_grpc

            if self._channel is None:
                self._channel = _grpc_channel(self.url)
            stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
            req = embedder_pb2.EmbedRequest(
                inputs=texts,
                model=model,
                instruction=instruction,
                dimensions=dimensions,
                input_type=embedder_pb2.INPUT_TYPE_QUERY if input_type == "query" else embedder_pb2.INPUT_TYPE_DOCUMENT,
            )
            try:
                resp = stub.Embed(req, timeout=self.timeout, metadata=auth_metadata(self.auth_token))
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, peer=f"the embedder service at {self.url}", as_dependency=False) from None
            r = EmbedResult(
                tensor.decode(resp.embeddings), "remote-grpc", resp.model, resp.dimensions, list(resp.token_counts)
            )
        if model and canonical(r.model) != canonical(model):
            raise _Skip(f"the service answered with {r.model}, not {model}")
        return r

    def _local_backend(self):
        if self._local is None:
            try:
                module = importlib.import_module(_LOCAL_MODULE)
            except ImportError as exc:
                raise _Skip(f"the local backend needs the extmind services and mlx installed ({exc})") from None
            self._local = module.LocalEmbedder()
        return self._local

    def _embed_local(self, texts, input_type, instruction, dimensions) -> EmbedResult:
        vectors, name, dims, counts = self._local_backend().embed(
            self._wanted(), texts, input_type, instruction, dimensions
        )
        return EmbedResult(vectors, "local", name, dims, counts)

    def _embed_ollama(self, texts, input_type, instruction, dimensions) -> EmbedResult:
        return self._first_name(
            "ollama", lambda name, other: self._ollama_call(name, other, texts, input_type, instruction, dimensions)
        )

    def _ollama_call(self, name, other, texts, input_type, instruction, dimensions) -> EmbedResult:
        body = {"model": name, "input": self._with_instruction(texts, input_type, instruction, other), "truncate": True}
        if dimensions:
            body["dimensions"] = dimensions
        out = self._http_json(f"{self.ollama_url}/api/embed", body, {}, "ollama")
        with _answer_of(self.ollama_url):
            vectors = _normalized(np.asarray(out["embeddings"], dtype=np.float32))
        return EmbedResult(vectors, "ollama", name if other else self._wanted(), vectors.shape[1], [])

    def _embed_openai(self, texts, input_type, instruction, dimensions) -> EmbedResult:
        if not self.openai_key:
            raise _Skip("OPENAI_API_KEY is not set")
        return self._first_name(
            "openai", lambda name, other: self._openai_call(name, other, texts, input_type, instruction, dimensions)
        )

    def _openai_call(self, name, other, texts, input_type, instruction, dimensions) -> EmbedResult:
        body = {
            "model": name,
            "input": self._with_instruction(texts, input_type, instruction, other),
            "encoding_format": "float",
        }
        if dimensions:
            body["dimensions"] = dimensions
        out = self._http_json(
            f"{self.openai_url}/embeddings", body, {"Authorization": f"Bearer {self.openai_key}"}, "openai"
        )
        with _answer_of(self.openai_url):
            rows = sorted(out["data"], key=lambda d: d["index"])
            vectors = _normalized(np.asarray([d["embedding"] for d in rows], dtype=np.float32))
        return EmbedResult(vectors, "openai", name if other else self._wanted(), vectors.shape[1], [])

    def _first_name(self, backend: str, call) -> EmbedResult:
        skipped = []
        for name, other in self._names_on(backend):
            try:
                return call(name, other)
            except _Skip as why:
                skipped.append(str(why))
        raise _Skip("; ".join(skipped))

    def _with_instruction(self, texts, input_type, instruction, other: bool) -> list[str]:
        # Third-party servers take raw text; the Qwen3 query instruction is applied here.
        known = BY_NAME.get(self._wanted())
        if input_type == "query" and not other and known is not None and known.instructed:
            return [query_text(instruction or DEFAULT_TASK, t) for t in texts]
        return texts

    # --- probes ---------------------------------------------------------------------------------
    def _probe_remote(self) -> str:
        if not self.url:
            raise _Skip("MLX_SERVICE_URL is not set")
        if self.url.startswith(("http://", "https://")):
            url = f"{self.url.rstrip('/')}/health"
            body = self._http_get(url, self._bearer())
            if body.get("status") != "ok" or not isinstance(body.get("models"), list):  # the embedder's own answer
                raise _Skip(f"{url}: answered {str(body)[:100]}, not an extmind embedder's health")
            return f"{self.url} healthy"
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if self._channel is None:
            self._channel = _grpc_channel(self.url)
        try:
            r = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service="extmind.v1.EmbedderService"), timeout=min(self.timeout, 5)
            )
        except grpc.RpcError as exc:
            raise _Skip(f"{self.url}: {exc.code().name}") from None
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            raise _Skip(f"{self.url}: not serving yet")
        return f"{self.url} serving"

    def _probe_local(self) -> str:
        try:
            return self._local_backend().locate(self._wanted())
        except ExtmindError as exc:
            raise _Skip(exc.message) from None

    def _probe_ollama(self) -> str:
        name = self._names_on("ollama")[0][0]
        tags = self._http_get(f"{self.ollama_url}/api/tags", {})
        names = {m.get("name") for m in tags.get("models", [])} | {m.get("model") for m in tags.get("models", [])}
        if name not in names and f"{name}:latest" not in names:
            raise _Skip(f"{self.ollama_url} does not have {name} (has {sorted(n for n in names if n)})")
        return f"{self.ollama_url} has {name}"

    def _probe_openai(self) -> str:
        if not self.openai_key:
            raise _Skip("OPENAI_API_KEY is not set")
        self._http_get(f"{self.openai_url}/models", {"Authorization": f"Bearer {self.openai_key}"})
        return f"{self.openai_url} reachable"

    # --- HTTP -----------------------------------------------------------------------------------
    def _bearer(self) -> dict:
        token = os.environ.get("EXTMIND_AUTH_TOKEN", "") if self.auth_token is None else self.auth_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _http_get(self, url: str, headers: dict) -> dict:
        with _reaching(url):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout) as r:
                    return _json_object(url, r.read() or b"{}")
            except urllib.error.HTTPError as exc:
                raise _Skip(f"{url}: HTTP {exc.code}") from None

    def _http_json(self, url: str, body: dict, headers: dict, backend: str) -> dict:
        req = urllib.request.Request(
            url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", **headers}
        )
        with _reaching(url):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return _json_object(url, r.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                if exc.code == 400:  # the input is wrong: another backend will not fix it
                    raise InvalidArgument(f"{backend} refused the request: {detail}") from None
                raise _Skip(f"{url}: HTTP {exc.code} {detail}") from None


@contextlib.contextmanager
def _reaching(url: str):
    """Talking to a backend over HTTP: unreachable, not HTTP at all (a gRPC port, say: its bytes
    say nothing) or not JSON is a reason to try the next backend (HTTP statuses: the caller's)."""
    try:
        yield
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Skip(f"{url}: {exc}") from None
    except http.client.HTTPException as exc:
        raise _Skip(f"{url}: not an HTTP answer ({type(exc).__name__})") from None


def _json_object(url: str, raw: bytes) -> dict:
    """A backend's answer, which every API here makes a JSON object (ValueError if not JSON)."""
    out = json.loads(raw)
    if not isinstance(out, dict):
        raise _Skip(f"{url}: answered {type(out).__name__}, not a JSON object")
    return out


@contextlib.contextmanager
def _answer_of(url: str):
    """Reading a backend's JSON answer: one without the fields of its API (another server on that
    address) is a reason to try the next backend, not a KeyError for the caller."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _Skip(f"{url}: an answer without the API's fields ({type(exc).__name__}: {exc})"[:300]) from None


def _normalized(v: np.ndarray) -> np.ndarray:
    if v.ndim != 2 or not np.isfinite(v).all():
        raise _Skip("the backend returned malformed or non-finite vectors")
    n = np.linalg.norm(v, axis=1, keepdims=True)
    if (n == 0).any():
        raise _Skip("the backend returned a zero vector")
    return v / n
