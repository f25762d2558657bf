"""Blocking client for the memory service, as the generator uses it.

Blocking on purpose: REMOTE retrieval calls ``search`` from inside the model forward on the MLX
thread. gRPC failures become extmind errors through ``errors.from_rpc_error`` as a dependency:
statuses that describe the request (NOT_FOUND, FAILED_PRECONDITION, ...) keep their code, a
memory service that is down, slow or refuses our token is UNAVAILABLE naming its address.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from extmind import errors, row_wire, tensor
from extmind.channels import auth_metadata, sync_channel
from extmind.v1 import memory_pb2, memory_pb2_grpc
from services.generator.kv_dtypes import KV_DTYPES, widen
from services.generator.search_stream import SearchStream

# Ends an AppendMemory stream whose messages failed (``MemoryClient.append``).
_ABORT = memory_pb2.AppendMemoryRequest(abort=True).SerializeToString()

# The memory service's default response budget (--max-response-mb 4): REMOTE searches split their
# query tokens so that every answer fits a memory service with default settings.
SEARCH_ANSWER_BUDGET = 4 << 20


class MemoryChanged(errors.FailedPrecondition):
    """A memory changed between resolving it (GetMemory) and fetching its rows: deleted and
    created again under its id (another create_time, however many rows it has), or rows that do
    not fit what was resolved. FAILED_PRECONDITION to the caller; resolving it again can help
    (``GeneratorEngine`` does so once)."""


def check_incarnation(memory_id: str, want: Timestamp | None, chunk) -> None:
    """MemoryChanged when FetchMemory message ``chunk`` (a ``row_wire.FetchedSlice`` or the
    protobuf message) carries another create_time than ``want``, the memory's as resolved. A
    message without one (a memory service older than the field) or no ``want`` is not checked."""
    if want is None or not chunk.HasField("create_time"):
        return
    got = chunk.create_time
    if (got.seconds, got.nanos) != (want.seconds, want.nanos):
        raise MemoryChanged(
            f"memory {memory_id!r} was deleted and created again since this request resolved it "
            "(its create_time differs); send the request again"
        )


@dataclass
class SearchResult:
    scores: np.ndarray  # [H, q, k] float32 cosine (-inf where masked)
    indices: np.ndarray  # [H, q, k] int64 (-1 where masked)
    keys: np.ndarray  # [H, q, k, d] in ``dtype``'s storage (float32 once ``widened``)
    values: np.ndarray
    dtype: int = tensor.FLOAT32  # extmind.tensor code of keys and values (bfloat16 as uint16 bits)

    def widened(self) -> SearchResult:
        """Keys and values as float32 (the memory's float16 / bfloat16 widened exactly)."""
        if self.dtype == tensor.FLOAT32:
            return self
        return SearchResult(self.scores, self.indices, widen(self.keys, self.dtype), widen(self.values, self.dtype))


@dataclass
class StoredRows:
    """One memory's rows as stored (docs/extended-mind.md, "Dtypes"): per layer keys and values
    [KVH, N, d] as numpy arrays of the memory's dtype storage (``extmind.tensor.STORAGE``: float32,
    float16, or bfloat16 as its uint16 bits)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    dtype: int  # extmind.tensor dtype code

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))


class _LayerRows:
    """One layer's row slices as FetchMemory streams them, joined: written into arrays of
    ``rows`` rows as they arrive when ``rows`` is known, else kept and concatenated at the end."""

    def __init__(self, rows: int | None):
        self.rows = rows
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys = self.values = None
        self.filled = 0
        self.handed = False  # given to an on_layer callback already

    @property
    def complete(self) -> bool:
        return self.keys is not None and self.filled == self.rows

    def add(self, keys: np.ndarray, values: np.ndarray) -> bool:
        """-> False when the slice does not fit (more rows than ``rows``, another shape)."""
        if self.rows is None:
            self.parts.append((keys, values))
            return True
        n = keys.shape[1]
        if self.keys is None:
            shape = (keys.shape[0], self.rows, keys.shape[2])
            self.keys, self.values = np.empty(shape, keys.dtype), np.empty(shape, keys.dtype)
        lo, hi = self.filled, self.filled + n
        if hi > self.rows or keys.shape[::2] != self.keys.shape[::2] or values.shape != keys.shape:
            return False
        self.keys[:, lo:hi], self.values[:, lo:hi] = keys, values
        self.filled = hi
        return True

    def result(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.keys is not None:
            return self.keys[:, : self.filled], self.values[:, : self.filled]
        if not self.parts:
            return None, None
        return tuple(np.concatenate([p[i] for p in self.parts], axis=1) for i in (0, 1))


class MemoryClient:
    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None):
        self.url = url
        self.timeout = timeout
        self._channel = sync_channel(url)
        self._stub = memory_pb2_grpc.MemoryServiceStub(self._channel)
        # AppendMemory as the stub has it, but sending serialized requests as they are too.
        self._append = self._channel.stream_unary(
            "/extmind.v1.MemoryService/AppendMemory",
            request_serializer=row_wire.as_is,
            response_deserializer=memory_pb2.AppendMemoryResponse.FromString,
        )
        # FetchMemory read with the rows left in the received bytes (row_wire.read_fetch_response).
        self._fetch = self._channel.unary_stream(
            "/extmind.v1.MemoryService/FetchMemory",
            request_serializer=memory_pb2.FetchMemoryRequest.SerializeToString,
            response_deserializer=row_wire.read_fetch_response,
        )
        self._metadata = auth_metadata(token)
        # False once the memory service answered UNIMPLEMENTED to SearchMemoryStream (older than
        # it): REMOTE retrieval then uses unary SearchMemory.
        self.streams_search = True

    def close(self) -> None:
        self._channel.close()

    def _error(self, e: grpc.RpcError, what: str) -> errors.ExtmindError:
        err = errors.from_rpc_error(
            e, peer=f"memory service at {self.url}", as_dependency=True, hint="start it or point --memory-url at it"
        )
        # Say which call failed: "fetching memory 'x': ...", unless the answer names it already.
        return err if err.message.startswith(what) else type(err)(f"{what}: {err.message}")

    def _unary(self, method, request, what: str, timeout: float | None = None, wait_for_ready: bool = False):
        try:
            return method(
                request, timeout=timeout or self.timeout, metadata=self._metadata, wait_for_ready=wait_for_ready
            )
        except grpc.RpcError as e:
            raise self._error(e, what) from None

    def get_memory(self, memory_id: str, include_tokens: bool = False) -> memory_pb2.Memory:
        return self._unary(
            self._stub.GetMemory,
            memory_pb2.GetMemoryRequest(memory_id=memory_id, include_tokens=include_tokens),
            f"memory {memory_id!r}",
        ).memory

    def list_memories(
        self, *, fingerprint: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[memory_pb2.Memory], str]:
        """One page of memories (of ``fingerprint``'s model; "" = all) -> (memories, next page token,
        "" after the last page). ``page_size`` 0 = the memory service's default."""
        r = self._unary(
            self._stub.ListMemories,
            memory_pb2.ListMemoriesRequest(model_fingerprint=fingerprint, page_size=page_size, page_token=page_token),
            "listing memories",
        )
        return list(r.memories), r.next_page_token

    def create_memory(
        self, *, memory_id: str, layout: memory_pb2.MemoryLayout, fingerprint: str, token_ids, positions, labels
    ) -> memory_pb2.Memory:
        req = memory_pb2.CreateMemoryRequest(
            memory_id=memory_id,
            layout=layout,
            model_fingerprint=fingerprint,
            token_ids=list(token_ids),
            positions=list(positions),
            labels=dict(labels),
        )
        return self._unary(self._stub.CreateMemory, req, "creating the memory").memory

    def delete_memory(self, memory_id: str, create_time: Timestamp | None = None, *, wait: float | None = None) -> None:
        """Deletes the memory; with ``create_time``, only the one created then (FailedPrecondition
        when the id names a memory created again since: kept). ``wait``: seconds to wait for an
        unreachable memory service to come back (gRPC's wait-for-ready) before Unavailable /
        DeadlineExceeded; None fails at once, as every other call."""
        self._unary(
            self._stub.DeleteMemory,
            memory_pb2.DeleteMemoryRequest(memory_id=memory_id, create_time=create_time),
            f"deleting memory {memory_id!r}",
            timeout=wait,
            wait_for_ready=wait is not None,
        )

    def append(
        self, requests: Iterable[memory_pb2.AppendMemoryRequest | bytes], timeout: float | None = None
    ) -> memory_pb2.AppendMemoryResponse:
        """Streams ``requests`` in one AppendMemory call: messages, or serialized messages
        (``row_wire.append_request``) sent as they are. gRPC pulls them one at a time as the
        stream can take them (on its own thread), so a generator that computes each message
        only holds one message at a time. An exception raised by ``requests`` aborts the stream
        (an ``abort`` message: the memory service removes the rows it got before it answers) and
        is re-raised here."""
        failed: list[BaseException] = []

        def remembering():
            try:
                yield from requests
            except Exception as e:  # noqa: BLE001 - any failure of the messages aborts
                # Not raised on into gRPC, which would cancel the call: the memory service may
                # see a cancel as the stream's end and keep the rows (docs/contract.md).
                failed.append(e)
                yield _ABORT
            except BaseException as e:  # gRPC closing the iterator (the call ended): nothing to send
                failed.append(e)
                raise

        try:
            resp = self._append(remembering(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            raise self._error(e, "appending rows") from None
        if failed:  # a service that took the abort as a message (none does: CANCELLED above)
            raise failed[0]
        return resp

    def fetch_stored(
        self,
        memory_id: str,
        num_layers: int,
        rows: int | None = None,
        on_layer=None,
        create_time: Timestamp | None = None,
    ) -> StoredRows:
        """Every layer's keys and values as stored, in the memory's dtype (no widening). A layer
        without rows is None. With ``rows`` (the memory's rows per layer, as resolved) each layer
        is written into one array as its slices arrive instead of joined at the end (one copy
        less); a layer that would hold more is MemoryChanged, one that ends with fewer comes back
        shorter. With ``create_time`` (the memory's as resolved) every message must carry it:
        the rows of a memory deleted and created again since are MemoryChanged, checked before
        any of them is used. ``on_layer(layer, keys, values, dtype)`` (optional) is called, on
        this thread, with each layer as soon as it holds ``rows`` rows (the arrays then are
        final: the same ones come back). Raises FailedPrecondition for a layer this model lacks,
        the memory service's errors otherwise."""
        layers = [_LayerRows(rows) for _ in range(num_layers)]
        dtype = None
        try:
            for chunk in self._fetch(
                memory_pb2.FetchMemoryRequest(memory_id=memory_id),
                timeout=max(self.timeout, 300.0),
                metadata=self._metadata,
            ):
                check_incarnation(memory_id, create_time, chunk)
                if chunk.layer >= num_layers:
                    raise errors.FailedPrecondition(
                        f"memory {memory_id!r} has layer {chunk.layer}; this model has {num_layers}"
                    )
                allowed = KV_DTYPES if dtype is None else (dtype,)  # one dtype for the whole memory
                keys = tensor.decode_raw(chunk.keys, name="keys", dtypes=allowed, ndim=3)
                dtype = chunk.keys.dtype
                values = tensor.decode_raw(chunk.values, name="values", dtypes=(dtype,), ndim=3)
                layer = layers[chunk.layer]
                if not layer.add(keys, values):
                    raise MemoryChanged(f"memory {memory_id!r} changed while it was fetched; send the request again")
                if on_layer is not None and layer.complete and not layer.handed:
                    layer.handed = True
                    on_layer(chunk.layer, *layer.result(), dtype)
        except grpc.RpcError as e:
            raise self._error(e, f"fetching memory {memory_id!r}") from None
        done = [x.result() for x in layers]
        return StoredRows([k for k, _ in done], [v for _, v in done], tensor.FLOAT32 if dtype is None else dtype)

    def fetch(self, memory_id: str, num_layers: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every layer's keys and values as float32 numpy [KVH, N, d] (widened exactly)."""
        rows = self.fetch_stored(memory_id, num_layers)
        wide = lambda a: None if a is None else widen(a, rows.dtype)  # noqa: E731
        return [wide(k) for k in rows.keys], [wide(v) for v in rows.values]

    def search(
        self, memory_ids, layer: int, queries: np.ndarray, top_k: int, threshold: float | None, create_times=()
    ) -> SearchResult:
        """queries float32 [H, q, d] -> the top-k of each query token, [H, q, k, ...], in unary
        SearchMemory calls. A prefill's answer can be far larger than the memory service's
        response budget (4 MiB by default): the query tokens go in as many calls as it takes to
        keep each answer inside it (``search_requests``)."""
        what = f"searching layer {layer}"
        return concat_results(
            [
                search_result(self._unary(self._stub.SearchMemory, req, what))
                for req in search_requests(memory_ids, layer, queries, top_k, threshold, create_times)
            ]
        ).widened()

    def search_stream(self) -> SearchStream:
        """A SearchMemoryStream call for many searches (REMOTE retrieval: one per layer per step);
        close it when done. See ``SearchStream``."""
        return SearchStream(self._stub, self._metadata, self.url, self.timeout, self._error)


def search_request(memory_ids, layer: int, queries: np.ndarray, top_k: int, threshold: float | None, create_times=()):
    """One SearchMemoryRequest (vectors asked for) of float32 queries [H, q, d]. ``create_times``:
    a Timestamp per memory id as resolved, or () (the memory service then does not check)."""
    req = memory_pb2.SearchMemoryRequest(
        memory_ids=memory_ids,
        layer=layer,
        queries=tensor.encode(queries, dtype=tensor.FLOAT32),
        top_k=top_k,
        return_vectors=True,
        create_times=create_times,
    )
    if threshold is not None:
        req.sim_threshold = threshold
    return req


def search_requests(
    memory_ids, layer: int, queries: np.ndarray, top_k: int, threshold: float | None, create_times=()
) -> list:
    """The SearchMemoryRequests of one search of float32 queries [H, q, d]: the query tokens split
    so that every answer fits the memory service's default response budget."""
    H, q, d = queries.shape
    per_token = H * top_k * (12 + 2 * d * 4)  # scores + indices + keys + values (float32 at most)
    step = max(1, (SEARCH_ANSWER_BUDGET - 4096) // max(per_token, 1))
    memory_ids = list(memory_ids)
    return [
        search_request(memory_ids, layer, queries[:, i : i + step], top_k, threshold, create_times)
        for i in range(0, q, step)
    ]


def search_result(r: memory_pb2.SearchMemoryResponse) -> SearchResult:
    """A SearchMemoryResponse with vectors -> SearchResult; keys and values stay in the memory's
    dtype (views of the message's bytes)."""
    keys = tensor.decode_raw(r.keys, name="keys", dtypes=KV_DTYPES)
    return SearchResult(
        tensor.decode(r.scores, name="scores"),
        tensor.decode(r.indices, name="indices"),
        keys,
        tensor.decode_raw(r.values, name="values", dtypes=(r.keys.dtype,)),
        r.keys.dtype,
    )


def concat_results(parts: list[SearchResult]) -> SearchResult:
    """The answers to ``search_requests``' pieces, joined along the query tokens."""
    if len(parts) == 1:
        return parts[0]
    return SearchResult(
        *(np.concatenate([getattr(p, f) for p in parts], axis=1) for f in ("scores", "indices", "keys", "values")),
        parts[0].dtype,
    )
