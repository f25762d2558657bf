"""The memory service's HTTP port: GET /metrics (Prometheus text) moves with real gRPC calls, and
GET /health says 503 while the service loads and 200 once it serves."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from extmind.procs import free_port
from extmind.tensor import FLOAT32, encode
from extmind.v1 import memory_pb2 as pb
from tests.memory import helpers as h

MEMORY = "extmind.v1.MemoryService"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[tuple, float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_real_calls(memory_service_factory):
    port = free_port()
    svc = memory_service_factory(args=["--http-port", str(port)])
    stub = svc.stub()
    assert get(port, "/health") == (200, json.dumps({"status": "ok"}, separators=(",", ":")))
    status, body = get(port, "/v1/memories")  # not a route here: the answer lists what is
    assert status == 404 and "endpoints: GET /health, GET /metrics" in json.loads(body)["error"]["message"]
    before = scrape(port)
    assert value(before, "extmind_memory_memories") == 0 and value(before, "extmind_memory_rows", kind="kv") == 0

    rng = np.random.default_rng(0)
    layers, heads, rows, dim = 2, 2, 40, 16
    K, V = h.random_kv(rng, layers, heads, rows, dim, FLOAT32)
    h.build(stub, "m1", K, V, FLOAT32, chunk_rows=15)
    Q = rng.standard_normal((4, 1, dim)).astype(np.float32)
    for layer in range(layers):
        for _ in range(3):
            h.search(stub, ["m1"], layer, Q, 5)
    try:
        stub.GetMemory(pb.GetMemoryRequest(memory_id="missing"), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("GetMemory of a missing memory answered")
    emb = lambda i: encode(np.eye(8, dtype=np.float32)[i], dtype=FLOAT32)  # noqa: E731
    stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="c",
            model="m",
            documents=[pb.Document(id=f"d{i}", text=f"text {i}", embedding=emb(i)) for i in range(3)],
        ),
        timeout=10,
    )
    stub.SearchDocuments(pb.SearchDocumentsRequest(collection="c", query_embedding=emb(1), top_k=2), timeout=10)

    # The READY memory loads into RAM in the background; the gauges read that state.
    deadline = time.monotonic() + 10
    while value(after := scrape(port), "extmind_memory_memories") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731

    calls = "extmind_grpc_requests_total"
    assert delta(calls, service=MEMORY, method="CreateMemory", code="OK") == 1
    assert delta(calls, service=MEMORY, method="AppendMemory", code="OK") == 1
    assert delta(calls, service=MEMORY, method="SearchMemory", code="OK") == 6
    assert delta(calls, service=MEMORY, method="GetMemory", code="NOT_FOUND") == 1
    assert delta(calls, service=MEMORY, method="UpsertDocuments", code="OK") == 1
    assert delta(calls, service=MEMORY, method="SearchDocuments", code="OK") == 1
    assert delta("extmind_grpc_request_seconds_count", service=MEMORY, method="SearchMemory") == 6
    assert delta("extmind_grpc_request_seconds_sum", service=MEMORY, method="SearchMemory") > 0
    assert value(after, "extmind_grpc_in_flight", service=MEMORY, method="SearchMemory") == 0

    assert delta("extmind_memory_searches_total", kind="kv") == 6
    assert delta("extmind_memory_search_seconds_count", kind="kv") == 6
    assert delta("extmind_memory_searches_total", kind="document") == 1
    assert delta("extmind_memory_search_seconds_count", kind="document") == 1
    assert delta("extmind_memory_appends_total") == 1
    assert delta("extmind_memory_append_rows_total") == layers * rows
    assert delta("extmind_memory_append_bytes_total") == 2 * K.nbytes
    assert value(after, "extmind_memory_memories") == 1
    assert value(after, "extmind_memory_rows", kind="kv") == rows
    assert value(after, "extmind_memory_rows", kind="document") == 3
    assert value(after, "extmind_memory_collections") == 1
    # the HTTP port counts its own requests (observe_http): the scrapes and the health check so far
    assert value(after, "extmind_http_requests_total", face="memory", route="/health", method="GET", status="200") == 1


def test_health_is_503_while_loading(memory_service_factory):
    """A memory service waiting for its Redis (nothing listens there) is loading: 503, and its
    /metrics already answers."""
    port = free_port()
    svc = memory_service_factory(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", args=["--http-port", str(port)], start=False
    )
    svc.spawn()
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        try:
            status = get(port, "/health")
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    assert status == (503, json.dumps({"status": "loading"}, separators=(",", ":"))), svc.log_tail()
    try:  # refused by the readiness guard: counted as well
        svc.stub().ListMemories(pb.ListMemoriesRequest(), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    else:
        raise AssertionError("a loading memory service answered ListMemories")
    samples = scrape(port)
    assert value(samples, "extmind_grpc_requests_total", service=MEMORY, method="ListMemories", code="UNAVAILABLE") == 1


def test_a_taken_http_port_is_one_readable_error(memory_service_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        svc = memory_service_factory(args=["--http-port", str(port)], start=False)
        proc = svc.spawn()
        assert proc.wait(timeout=60) == 1
    log = svc.log_tail()
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in log and "MEMORY_HTTP_PORT" in log, log
    assert "Traceback" not in log, log


def test_health_is_503_while_draining(memory_service_factory):
    """SIGTERM starts the drain: while an AppendMemory stream is still open, /health says draining
    (so a load balancer stops sending), and the process ends once the stream is done."""
    import signal
    import threading

    port = free_port()
    svc = memory_service_factory(args=["--http-port", str(port), "--grace-seconds", "20"])
    assert get(port, "/health")[0] == 200
    release = threading.Event()

    def requests():
        release.wait(30)  # the stream stays open (no message yet) until the drain has been seen
        return
        yield

    call = svc.stub().AppendMemory.future(requests(), timeout=60)
    time.sleep(0.5)  # the call is in flight on the server
    svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    seen = None
    while time.monotonic() < deadline:
        seen = get(port, "/health")
        if seen[0] == 503:
            break
        time.sleep(0.05)
    assert seen == (503, json.dumps({"status": "draining"}, separators=(",", ":"))), seen
    # and it keeps answering so for the whole drain (the port is not closed by the signal)
    for _ in range(10):
        time.sleep(0.1)
        assert get(port, "/health")[0] == 503
    release.set()
    try:
        call.result(timeout=30)
    except grpc.RpcError:
        pass  # an empty stream is refused: what matters is that the drain waited for it
    assert svc.proc.wait(timeout=30) == 0, svc.log_tail()
