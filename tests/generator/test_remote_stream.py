"""REMOTE retrieval over SearchMemoryStream: one stream per generation batch, closed when the
batch ends (its last request finished or cancelled), with exactly the answers of unary
SearchMemory calls; a memory service without the stream RPC (an older one) is searched with
unary calls instead."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent import futures

import grpc
import mlx.core as mx
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from extmind import errors, tensor
from extmind.procs import free_port
from extmind.v1 import memory_pb2, memory_pb2_grpc
from services.generator.memory_client import MemoryClient, SearchResult, search_requests
from services.generator.memory_resolution import ResolvedMemory
from services.generator.remote_retrieval import RemoteRetriever
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling

from ..helpers import access_lines, wait_for_access_line
from .helpers import run
from .memory_helpers import recreate_memory

STREAM = "/extmind.v1.MemoryService/SearchMemoryStream"
UNARY = "/extmind.v1.MemoryService/SearchMemory"


def _searches(line: str) -> int:
    return int(line.split("searches=", 1)[1].split()[0])


def _waited() -> tuple[float, float]:
    """(observations, seconds) of ``extmind_generator_remote_search_seconds`` so far."""
    name = "extmind_generator_remote_search_seconds"
    return tuple(REGISTRY.get_sample_value(f"{name}_{x}") or 0.0 for x in ("count", "sum"))


class OlderMemoryService(memory_pb2_grpc.MemoryServiceServicer):
    """A memory service from before SearchMemoryStream: the real one's unary calls, passed on
    as they are; the stream RPC answers UNIMPLEMENTED (the generated base class's answer)."""

    def __init__(self, address: str):
        self._stub = memory_pb2_grpc.MemoryServiceStub(grpc.insecure_channel(address))

    def GetMemory(self, request, context):
        return self._stub.GetMemory(request, timeout=30)

    def SearchMemory(self, request, context):
        return self._stub.SearchMemory(request, timeout=30)


class HungMemoryService(memory_pb2_grpc.MemoryServiceServicer):
    """A memory service that takes search requests and never answers them (stuck)."""

    def SearchMemoryStream(self, request_iterator, context):
        for _ in request_iterator:  # reads on, answers nothing
            pass
        yield from ()


class SlowMemoryService(memory_pb2_grpc.MemoryServiceServicer):
    """A memory service that answers every search, each after ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay = delay

    def SearchMemoryStream(self, request_iterator, context):
        for msg in request_iterator:
            time.sleep(self.delay)
            H, q, _ = msg.search.queries.shape
            k = msg.search.top_k
            f32 = np.zeros((H, q, k), np.float32)
            yield memory_pb2.SearchMemoryStreamResponse(
                result=memory_pb2.SearchMemoryResponse(
                    scores=tensor.encode(f32, dtype=tensor.FLOAT32),
                    indices=tensor.encode(f32.astype(np.int64), dtype=tensor.INT64),
                    keys=tensor.encode(np.zeros((H, q, k, 16), np.float32), dtype=tensor.FLOAT32),
                    values=tensor.encode(np.zeros((H, q, k, 16), np.float32), dtype=tensor.FLOAT32),
                )
            )


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def older_memory_service(memory_address):
    server, address = _serve(OlderMemoryService(memory_address))
    yield address
    server.stop(None)


def test_an_answer_that_never_comes_ends_the_stream_after_the_timeout():
    server, address = _serve(HungMemoryService())
    client = MemoryClient(address, timeout=0.5)
    try:
        stream = client.search_stream()
        q = np.ones((4, 1, 16), np.float32)
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable, match="DEADLINE_EXCEEDED: no answer within 0.5 s, searching layer 1"):
            stream.search(search_requests(["m"], 1, q, 3, None), "searching layer 1")
        assert 0.5 <= time.monotonic() - t0 < 5
        assert stream.closed
        with pytest.raises(errors.Unavailable):  # the same error from then on
            stream.search(search_requests(["m"], 0, q, 3, None), "searching layer 0")
    finally:
        client.close()
        server.stop(None)


def test_a_wait_that_fails_is_observed_too():
    """The wait metric counts a layer's search that ends in an error, at the time it took: a
    memory service that never answers shows as waits at the client's timeout."""
    server, address = _serve(HungMemoryService())
    client = MemoryClient(address, timeout=0.5)
    retriever = RemoteRetriever(client, [ResolvedMemory("m", Timestamp(seconds=1), 8, [], [], tensor.FLOAT32)])
    waits = _waited()
    try:
        with pytest.raises(errors.Unavailable, match="no answer within 0.5 s, searching layer 2"):
            retriever.retrieve(2, mx.ones((1, 2, 2, 1, 16)), 3, None)
        count, seconds = (now - then for now, then in zip(_waited(), waits))
        assert count == 1 and 0.5 <= seconds < 5, (count, seconds)
    finally:
        retriever.close()
        client.close()
        server.stop(None)


def test_the_timeout_is_per_answer_not_per_batch_of_requests():
    """A prefill's search goes out as several requests at once: each answer has the client's
    timeout (as each unary call has), not all of them together."""
    server, address = _serve(SlowMemoryService(0.2))
    client = MemoryClient(address, timeout=0.6)
    try:
        stream = client.search_stream()
        q = np.ones((4, 1, 16), np.float32)
        requests = [r for _ in range(6) for r in search_requests(["m"], 0, q, 3, None)]  # ~1.2 s in all
        answers = stream.search(requests, "searching layer 0")
        assert len(answers) == 6 and stream.answered == 6 and not stream.closed
        stream.close()
    finally:
        client.close()
        server.stop(None)


def _retrieve_all(engine, retriever, queries, top_k, threshold):
    """Every layer's Retrieved for ``queries`` [B, KVH, R, L, d], as numpy (on the MLX thread)."""

    def go():
        out = []
        for layer in range(engine.num_layers):
            r = retriever.retrieve(layer, mx.array(queries), top_k, threshold)
            out.append({k: None if v is None else np.array(v) for k, v in vars(r).items()})
        return out

    return engine.mlx.call(go)


@pytest.mark.parametrize("threshold", [None, 0.1])
def test_the_stream_answers_exactly_as_unary_calls_and_an_older_service_falls_back(
    engine, memory, memory_address, module_memory_service, older_memory_service, threshold
):
    mid, _ = memory
    before = len(access_lines(module_memory_service, STREAM))
    resolved = engine.resolver.resolve((mid,))
    rng = np.random.default_rng(0)
    kvh, rep, d = engine.num_kv_heads, engine.num_heads // engine.num_kv_heads, engine.head_dim
    clients = []
    for B, L in ((1, 1), (2, 3)):  # a decode step; a small batched prefill
        queries = rng.standard_normal((B, kvh, rep, L, d)).astype(np.float32)
        streamed = MemoryClient(memory_address)
        unary = MemoryClient(memory_address)
        unary.streams_search = False
        older = MemoryClient(older_memory_service)
        clients += [streamed, unary, older]
        got = {}
        for name, client in (("stream", streamed), ("unary", unary), ("older", older)):
            retriever = RemoteRetriever(client, resolved)
            got[name] = _retrieve_all(engine, retriever, queries, 6, threshold)
            retriever.close()
            assert retriever.calls == engine.num_layers
        assert streamed.streams_search and not older.streams_search  # the older service: unary from now on
        for layer in range(engine.num_layers):
            for field, want in got["unary"][layer].items():
                for other in ("stream", "older"):
                    g = got[other][layer][field]
                    assert (g is None) == (want is None), field
                    if want is not None:
                        assert g.dtype == want.dtype and np.array_equal(g, want), (other, layer, field)
    # one stream per retriever that streamed (the older service's client never reached this one),
    # ended by the retriever's close
    for i in (before, before + 1):
        assert "code=OK" in wait_for_access_line(module_memory_service, STREAM, i)
    for c in clients:
        c.close()


@pytest.mark.parametrize(
    "B,kvh,rep,L,k", [(1, 2, 2, 1, 6), (2, 1, 8, 1, 5), (1, 4, 1, 1, 5), (3, 4, 1, 2, 2), (2, 2, 4, 3, 6)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_hit_rows_are_row_contiguous_for_every_head_layout(B, kvh, rep, L, k, masked):
    """The attend kernels read the hit rows by index, as a row-contiguous [B, H, L, k] array:
    so they are, whatever the heads' layout (GQA, one KV head, one query head per KV head: numpy
    views of those layouts have other strides, and MLX keeps a numpy array's strides), and each
    names where ``HitRows.values`` holds that query head's hit, -1 where masked (the rows
    ``retrieve_rows`` hands the kernels: ``_masked_rows``, else ``_hit_rows``)."""
    from services.generator.remote_retrieval import _hit_rows, _masked_rows

    H = kvh * rep
    found = np.random.default_rng(0).integers(0, 100, (B, H, L, k)).astype(np.int32)
    if masked:
        found[..., k // 2 :] = -1
    a = _masked_rows(found, kvh)
    assert (a is not None) == masked
    a = a if masked else np.asarray(_hit_rows(B, kvh, rep, L, k))
    assert a.flags["C_CONTIGUOUS"] and a.dtype == np.int32 and a.shape == (B, H, L, k)
    for b, h, l_, j in np.ndindex(B, H, L, k):
        want = ((h % rep * B + b) * L + l_) * k + j if found[b, h, l_, j] >= 0 else -1
        assert a[b, h, l_, j] == want, (b, h, l_, j)


@pytest.mark.parametrize("masking", [False, True])
def test_hit_rows_hold_what_retrieve_returns(engine, memory, client, module_memory_service, masking):
    """``retrieve_rows`` (the REMOTE hits as the fused attention kernels take them, on CUDA) holds,
    for every query head, token and hit, ``retrieve``'s value and raw dot bit for bit, and its
    memory row; a hit the threshold masks (``masking``: a threshold at the median hit's cosine)
    is row -1 in both. Queries of a decode step and of a small batched prefill."""
    mid, _ = memory
    resolved = engine.resolver.resolve((mid,))
    rng = np.random.default_rng(1)
    kvh, rep, d = engine.num_kv_heads, engine.num_heads // engine.num_kv_heads, engine.head_dim
    H, top_k = kvh * rep, 6
    streams = len(access_lines(module_memory_service, STREAM))
    hits = masked = 0
    for B, L in ((1, 1), (2, 3)):
        queries = rng.standard_normal((B, kvh, rep, L, d)).astype(np.float32)
        threshold = None
        if masking:
            heads = queries.transpose(1, 2, 0, 3, 4).reshape(H, B * L, d)
            cosines = client.search([mid], 0, heads, top_k, None, [resolved[0].create_time]).scores
            threshold = float(np.median(cosines))

        def go(queries=queries, threshold=threshold):
            retriever = RemoteRetriever(client, resolved)
            out = []
            for layer in range(engine.num_layers):
                q = mx.array(queries)
                r = retriever.retrieve(layer, q, top_k, threshold)
                h = retriever.retrieve_rows(layer, q, top_k, threshold, indices=True)
                out.append([np.array(a) for a in (r.values, r.dots, r.indices, h.values, h.dots, h.rows, h.indices)])
            retriever.close()
            return out

        for values, dots, indices, h_values, h_dots, h_rows, h_indices in engine.mlx.call(go):
            k = indices.shape[-1]
            assert k == top_k and h_rows.shape == h_dots.shape == h_indices.shape == (B, H, L, k)
            np.testing.assert_array_equal(h_indices, indices.reshape(B, H, L, k))
            np.testing.assert_array_equal(h_dots, dots.reshape(B, H, L, k))
            hit = h_indices >= 0
            np.testing.assert_array_equal(h_rows >= 0, hit)
            hits, masked = hits + hit.sum(), masked + (~hit).sum()
            heads = (np.arange(H) // rep)[None, :, None, None]  # each query head's KV head
            got = h_values.astype(np.float32)[heads, np.maximum(h_rows, 0)]  # [B, H, L, k, d]
            np.testing.assert_array_equal(got[hit], values.reshape(B, H, L, k, d)[hit])
            for g in range(kvh):  # each hit of a KV head's query heads has a row of its own
                own = h_rows[:, g * rep : (g + 1) * rep][hit[:, g * rep : (g + 1) * rep]]
                assert len(np.unique(own)) == own.size
    assert hits > 0 and (masked > 0) == masking, (hits, masked)
    for i in range(streams, streams + 2):  # each retriever's stream ended (logged before the next test counts)
        assert "code=OK" in wait_for_access_line(module_memory_service, STREAM, i)


async def test_one_stream_serves_a_whole_generation_and_closes_when_it_ends(engine, memory, module_memory_service):
    mid, _ = memory
    svc = module_memory_service
    before, unary_before = len(access_lines(svc, STREAM)), len(access_lines(svc, UNARY))
    waits = _waited()
    prompt = engine.tokenizer.encode("Alice met Bob at")
    req = GenerationRequest(prompt, Sampling(max_tokens=40), MemoryOptions((mid,), top_k=4, mode="remote"))
    tokens, _, _, _ = await run(engine, req)
    assert len(tokens) >= 10
    line = wait_for_access_line(svc, STREAM, before)  # the batch ended: its stream is closed
    assert "code=OK" in line, line
    n = _searches(line)
    assert n % engine.num_layers == 0 and n >= len(tokens) * engine.num_layers, line  # every layer of every step
    assert len(access_lines(svc, STREAM)) == before + 1  # one stream for the whole generation
    assert len(access_lines(svc, UNARY)) == unary_before  # and no unary search beside it
    # The generator's metric saw every layer's wait, one observation each (one memory: one search a layer).
    count, seconds = (now - then for now, then in zip(_waited(), waits))
    assert count == n and seconds > 0, (count, seconds, n)


async def test_a_cancelled_generation_closes_its_stream(engine, memory, module_memory_service):
    mid, _ = memory
    svc = module_memory_service
    before = len(access_lines(svc, STREAM))
    prompt = engine.tokenizer.encode("Paris is the capital of")
    req = GenerationRequest(prompt, Sampling(max_tokens=500), MemoryOptions((mid,), top_k=4, mode="remote"))
    agen = engine.generate(req)
    seen = 0
    async for ev in agen:
        seen += isinstance(ev, Chunk)
        if seen == 3:
            break
    assert seen == 3
    await agen.aclose()  # the client went away
    line = wait_for_access_line(svc, STREAM, before)
    assert "code=OK" in line and _searches(line) < 100 * engine.num_layers, line
    deadline = time.monotonic() + 5
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["active"] == 0
    # the next REMOTE generation opens a stream of its own
    tokens, _, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=3), req.memory))
    assert len(tokens) == 3
    assert "code=OK" in wait_for_access_line(svc, STREAM, before + 1)


@pytest.mark.parametrize("streams", [True, False])
@pytest.mark.parametrize("rows", ["more", "same"])
def test_a_memory_created_again_is_failed_precondition(engine, memory, memory_address, streams, rows):
    """A memory deleted and created again under its id while a retriever searches it is refused,
    on the stream and in unary calls alike: with more rows (whose hits would point past the
    resolved ones) and with the same number (which only the create_time sent with every search
    tells apart). Resolved again, the new memory is searched."""
    mid, _ = memory
    again = f"created-again-{rows}-{streams}"
    engine.memorize_blocking(engine.tokenizer.encode("A short text."), memory_id=again)
    client = MemoryClient(memory_address)
    client.streams_search = streams
    copy = f"{again}-copy"
    try:
        retriever = RemoteRetriever(client, engine.resolver.resolve((again,)))
        q = np.ones((1, engine.num_kv_heads, engine.num_heads // engine.num_kv_heads, 1, engine.head_dim), np.float32)
        engine.mlx.call(lambda: retriever.retrieve(0, mx.array(q), 4, None))  # as resolved: fine
        if rows == "same":
            engine.memorize_blocking(engine.tokenizer.encode("A short text."), memory_id=copy)
        recreate_memory(client, mid if rows == "more" else copy, again)
        with pytest.raises(errors.FailedPrecondition, match="created again"):
            engine.mlx.call(lambda: retriever.retrieve(0, mx.array(q), 4, None))
        retriever.close()
        fresh = RemoteRetriever(client, engine.resolver.resolve((again,)))
        engine.mlx.call(lambda: fresh.retrieve(0, mx.array(q), 4, None))
        fresh.close()
    finally:
        for i in (again, copy):
            with contextlib.suppress(errors.NotFound):
                client.delete_memory(i)
        client.close()


def test_hits_past_the_resolved_rows_are_refused(engine, memory):
    """The retriever's own check, for a memory service that ignores create_times (older than
    them): a row number past the rows resolved never reaches the citation counts."""
    mid, _ = memory
    retriever = RemoteRetriever(MemoryClient("127.0.0.1:1"), engine.resolver.resolve((mid,)))
    rows = retriever.rows
    hit = SearchResult(np.zeros((1, 1, 2), np.float32), np.array([[[0, rows]]]), None, None, tensor.FLOAT32)
    with pytest.raises(errors.FailedPrecondition, match="changed while this generation searched them"):
        retriever._checked([mid], hit, 2)
    ok = SearchResult(np.zeros((1, 1, 2), np.float32), np.array([[[0, rows - 1]]]), None, None, tensor.FLOAT32)
    assert retriever._checked([mid], ok, 2) is ok
    retriever.client.close()


async def _hold(mlx) -> threading.Event:
    """Holds the MLX thread (no generation step runs) until the returned event is set."""
    gate, holding = threading.Event(), threading.Event()
    mlx.submit(lambda: holding.set() or gate.wait(30))
    assert await asyncio.to_thread(holding.wait, 30)
    return gate


async def test_a_remote_generation_with_citations_ends_cleanly_when_its_memory_is_created_again(
    engine, memory, module_memory_service
):
    """The generator process used to crash (segmentation fault in the citation counts' scatter):
    the request now ends with FAILED_PRECONDITION and the engine serves on."""
    mid, _ = memory
    streams = len(access_lines(module_memory_service, STREAM))
    changing = "changes-mid-generation"
    await engine.memorize(engine.tokenizer.encode("A short text."), memory_id=changing)
    options = MemoryOptions((changing,), top_k=4, mode="remote", return_citations=True)
    req = GenerationRequest(engine.tokenizer.encode("Alice met"), Sampling(max_tokens=3000), options)
    seen = 0
    with pytest.raises(errors.FailedPrecondition, match="created again"):
        async for _ in engine.generate(req):
            seen += 1
            if seen == 3:
                gate = await _hold(engine.mlx)  # no step runs while the memory is replaced
                try:
                    await asyncio.to_thread(recreate_memory, engine.memory, mid, changing)
                finally:
                    gate.set()
    assert engine.stats()["active"] == 0
    # the engine serves on, and a new generation over the new memory works
    tokens, _, _, final = await run(engine, GenerationRequest(req.prompt_tokens, Sampling(max_tokens=3), options))
    assert len(tokens) == 3 and final.citations
    await engine.delete_memory(changing)
    # Both generations' streams have ended in the service's log before the next test counts lines
    # there (the failed one's ends when gRPC has cancelled it, possibly after this test).
    wait_for_access_line(module_memory_service, STREAM, streams + 1)
