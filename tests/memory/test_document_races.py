"""Requests that change one collection at the same time (found by a break-it pass): each must see
the collection as the one before it left it, RAM must agree with Redis, and the service must
start again from what Redis holds. Through the real service and Redis; the embedder that the
documents wait on is a stand-in speaking its wire format that holds its answer until told."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np

from extmind.tensor import encode
from extmind.v1 import embedder_pb2, embedder_pb2_grpc
from extmind.v1 import memory_pb2 as pb
from tests.helpers import code_of

C = grpc.StatusCode


class HeldEmbedder(embedder_pb2_grpc.EmbedderServiceServicer):
    """Model 'held-8': 8 dimensions; each Embed waits for ``release`` once ``hold`` is set."""

    def __init__(self):
        self.hold, self.release, self.waiting = threading.Event(), threading.Event(), threading.Event()

    def Embed(self, request, context):
        if self.hold.is_set():
            self.waiting.set()
            self.release.wait(30)
        rng = np.random.default_rng(len(request.inputs))
        v = rng.standard_normal((len(request.inputs), 8)).astype(np.float32)
        return embedder_pb2.EmbedResponse(embeddings=encode(v), model="held-8", dimensions=8)


def _serve_embedder():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    impl = HeldEmbedder()
    embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(impl, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, impl, f"127.0.0.1:{port}"


def _docs(prefix, n, dims=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = pb.Document(id=f"{prefix}{i}", text=f"text {prefix}{i}")
        if dims:
            d.embedding.CopyFrom(encode(rng.standard_normal(dims).astype(np.float32)))
        out.append(d)
    return out


def _count(stub, name):
    return stub.GetCollection(pb.GetCollectionRequest(collection=name), timeout=10).collection.num_documents


def _in_parallel(*calls):
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(code_of, c) for c in calls]]


def test_a_drop_while_an_upsert_waits_on_the_embedder_leaves_no_orphans(memory_service_factory):
    server, impl, address = _serve_embedder()
    svc = memory_service_factory(args=["--embedder-url", address])
    stub = svc.stub()
    try:
        stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="dropped", documents=_docs("a", 3)), timeout=10)
        impl.hold.set()
        with futures.ThreadPoolExecutor(1) as pool:
            upsert = pool.submit(
                code_of,
                lambda: stub.UpsertDocuments(
                    pb.UpsertDocumentsRequest(collection="dropped", documents=_docs("b", 5)), timeout=30
                ),
            )
            assert impl.waiting.wait(10)
            stub.DeleteCollection(pb.DeleteCollectionRequest(collection="dropped"), timeout=10)
            impl.release.set()
            code, _ = upsert.result()
        # The upsert came after the drop: the collection exists again holding its 5 documents
        # (its meta with them: no documents of a collection Redis no longer names).
        assert code == C.OK and _count(stub, "dropped") == 5
        svc.stop()
        svc.start()
        stub = svc.stub()
        assert _count(stub, "dropped") == 5
        hits = stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="dropped", query_embedding=encode(np.ones(8, np.float32)), top_k=10),
            timeout=10,
        ).hits
        assert sorted(h.id for h in hits) == [f"b{i}" for i in range(5)]
    finally:
        impl.release.set()
        server.stop(0)


def test_two_upserts_making_one_collection_with_other_models(memory_service_factory):
    """Both name a new collection, with embeddings of other models and sizes: one makes it, the
    other is FAILED_PRECONDITION with nothing stored, and the service starts again."""
    svc = memory_service_factory()
    stub = svc.stub()
    for round_ in range(5):
        name = f"contested{round_}"
        codes = _in_parallel(
            lambda name=name: stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(collection=name, model="mA", documents=_docs("a", 50, 4)), timeout=10
            ),
            lambda name=name: stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(collection=name, model="mB", documents=_docs("b", 50, 8)), timeout=10
            ),
        )
        assert sorted(c.name for c, _ in codes) == ["FAILED_PRECONDITION", "OK"], codes
        assert _count(stub, name) == 50
    svc.stop()
    svc.start()
    stub = svc.stub()
    assert all(_count(stub, f"contested{r}") == 50 for r in range(5))


def test_two_upserts_making_one_collection_keep_every_document(memory_service_factory):
    svc = memory_service_factory()
    stub = svc.stub()
    for round_ in range(5):
        name = f"shared{round_}"
        codes = _in_parallel(
            *(
                lambda p=p, name=name: stub.UpsertDocuments(
                    pb.UpsertDocumentsRequest(collection=name, model="m", documents=_docs(p, 100, 8)), timeout=10
                )
                for p in "abcd"
            )
        )
        assert all(c == C.OK for c, _ in codes), codes
        assert _count(stub, name) == 400  # searchable at once, not only after a restart


def test_writes_and_deletes_of_the_same_ids_agree_with_redis(memory_service_factory):
    """Upserts and deletes of the same ids from many threads: what the service searches is what
    a restart loads from Redis."""
    svc = memory_service_factory()
    stub = svc.stub()
    stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(collection="ids", model="m", documents=_docs("x", 20, 8)), timeout=10
    )
    rng = np.random.default_rng(0)

    def worker(seed):
        r = np.random.default_rng(seed)
        for _ in range(40):
            ids = [f"x{i}" for i in r.choice(20, 3, replace=False)]
            if r.random() < 0.5:
                docs = [d for d in _docs("x", 20, 8, seed=int(r.integers(1 << 30))) if d.id in ids]
                stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="ids", model="m", documents=docs), timeout=10)
            else:
                stub.DeleteDocuments(pb.DeleteDocumentsRequest(collection="ids", ids=ids), timeout=10)

    with futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, rng.integers(1 << 30, size=16).tolist()))

    def held(stub):  # id -> score: which documents, and which vector each holds
        q = pb.SearchDocumentsRequest(collection="ids", query_embedding=encode(np.ones(8, np.float32)), top_k=100)
        return {h.id: h.score for h in stub.SearchDocuments(q, timeout=10).hits}

    before = held(stub)
    svc.stop()
    svc.start()
    after = held(svc.stub())
    assert sorted(after) == sorted(before)
    assert np.allclose([after[i] for i in before], list(before.values()), atol=1e-5)


def test_a_name_ending_in_a_newline_is_not_a_name(memory_service):
    stub = memory_service.stub()
    code, msg = code_of(
        lambda: stub.CreateCollection(
            pb.CreateCollectionRequest(collection="nl\n", model="m", dimensions=4), timeout=10
        )
    )
    assert code == C.INVALID_ARGUMENT and "not a valid name" in msg
