"""Document collections: upsert / search / delete / filter with given embeddings (checked against
brute force), model binding, the embedder path (a stand-in embedder and the real one), and
UNAVAILABLE without an embedder."""

from __future__ import annotations

import zlib
from concurrent import futures

import grpc
import numpy as np
import pytest

from extmind.procs import free_port
from extmind.service_procs import ServiceProcess
from extmind.tensor import encode
from extmind.v1 import embedder_pb2, embedder_pb2_grpc
from extmind.v1 import memory_pb2 as pb
from tests.helpers import code_of
from tests.ranking import assert_ranking_matches

C = grpc.StatusCode


def doc(i, vec=None, **md):
    d = pb.Document(id=str(i), text=f"text {i}", metadata=md)
    if vec is not None:
        d.embedding.CopyFrom(encode(np.asarray(vec, np.float32)))
    return d


def test_documents_with_given_embeddings(memory_service):
    stub = memory_service.stub()
    rng = np.random.default_rng(0)
    E = rng.standard_normal((60, 24)).astype(np.float32)
    colors = ["red", "green", "blue"]
    docs = [doc(i, E[i], color=colors[i % 3], parity=str(i % 2)) for i in range(60)]
    r = stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="c1", documents=docs, model="m-A"), timeout=10)
    assert list(r.ids) == [str(i) for i in range(60)] and r.model == "m-A" and r.dimensions == 24
    col = stub.GetCollection(pb.GetCollectionRequest(collection="c1"), timeout=10).collection
    assert (col.name, col.model, col.dimensions, col.num_documents) == ("c1", "m-A", 24, 60)

    En = E / np.linalg.norm(E, axis=1, keepdims=True)
    for _ in range(5):
        q = rng.standard_normal(24).astype(np.float32)
        for filt in ({}, {"color": "red"}, {"color": "blue", "parity": "1"}):
            res = stub.SearchDocuments(
                pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(q), top_k=7, filter=filt), timeout=10
            )
            ok = [i for i in range(60) if all(docs[i].metadata[k] == v for k, v in filt.items())]
            ref = En[ok] @ (q / np.linalg.norm(q))
            pos = {str(i): j for j, i in enumerate(ok)}
            got = [pos[h.id] for h in res.hits]
            assert_ranking_matches(got, ref, 7, eps=1e-5)
            assert np.allclose([h.score for h in res.hits], ref[got], atol=1e-5)
            assert all(
                h.text == f"text {h.id}" and dict(h.metadata) == dict(docs[int(h.id)].metadata) for h in res.hits
            )
            assert res.model == "m-A"
    # Default top_k is 10; a filter nothing matches gives no hits.
    assert (
        len(
            stub.SearchDocuments(
                pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(E[0])), timeout=10
            ).hits
        )
        == 10
    )
    assert not stub.SearchDocuments(
        pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(E[0]), filter={"color": "pink"}), timeout=10
    ).hits

    # Upsert replaces (text, metadata, vector); delete removes.
    stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="c1",
            documents=[pb.Document(id="5", text="new five", metadata={"color": "pink"}, embedding=encode(-E[5]))],
        ),
        timeout=10,
    )
    hit = stub.SearchDocuments(
        pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(-E[5]), top_k=1), timeout=10
    ).hits[0]
    assert (hit.id, hit.text, dict(hit.metadata)) == ("5", "new five", {"color": "pink"}) and hit.score > 0.999
    assert (
        stub.DeleteDocuments(pb.DeleteDocumentsRequest(collection="c1", ids=["5", "6", "zzz"]), timeout=10).deleted == 2
    )
    ids = {
        h.id
        for h in stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(E[6]), top_k=100), timeout=10
        ).hits
    }
    assert len(ids) == 58 and "5" not in ids and "6" not in ids
    assert not stub.SearchDocuments(
        pb.SearchDocumentsRequest(collection="c1", query_embedding=encode(E[0]), filter={"color": "pink"}), timeout=10
    ).hits

    # Restart: the same answers from Redis.
    q = encode(rng.standard_normal(24).astype(np.float32))
    before = stub.SearchDocuments(
        pb.SearchDocumentsRequest(collection="c1", query_embedding=q, top_k=20, filter={"parity": "0"}), timeout=10
    )
    memory_service.kill()
    memory_service.start()
    stub = memory_service.stub()
    assert (
        stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="c1", query_embedding=q, top_k=20, filter={"parity": "0"}), timeout=10
        )
        == before
    )
    assert stub.GetCollection(pb.GetCollectionRequest(collection="c1"), timeout=10).collection.num_documents == 58


def test_collections_and_model_binding(memory_service):
    stub = memory_service.stub()
    v8 = np.ones(8, np.float32)
    c = stub.CreateCollection(pb.CreateCollectionRequest(collection="bound", model="m-B", dimensions=8), timeout=10)
    assert c.collection.model == "m-B" and c.collection.num_documents == 0
    assert (
        code_of(
            lambda: stub.CreateCollection(
                pb.CreateCollectionRequest(collection="bound", model="m-B", dimensions=8), timeout=10
            )
        )[0]
        == C.ALREADY_EXISTS
    )
    up = lambda **kw: stub.UpsertDocuments(pb.UpsertDocumentsRequest(**kw), timeout=10)  # noqa: E731
    up(collection="bound", documents=[doc(1, v8)])  # model omitted = the collection's
    up(collection="bound", documents=[doc(2, v8)], model="m-B")
    code, msg = code_of(lambda: up(collection="bound", documents=[doc(3, v8)], model="m-OTHER"))
    assert code == C.FAILED_PRECONDITION and "m-B" in msg
    assert code_of(lambda: up(collection="bound", documents=[doc(3, np.ones(9, np.float32))]))[0] == C.INVALID_ARGUMENT
    assert code_of(lambda: up(collection="new", documents=[doc(3, v8)]))[0] == C.INVALID_ARGUMENT  # model needed
    bad = doc(4)
    bad.embedding.CopyFrom(encode(np.ones(8, np.float16)))
    assert code_of(lambda: up(collection="bound", documents=[bad]))[0] == C.INVALID_ARGUMENT  # float32 only
    bad.embedding.CopyFrom(encode(np.full(8, np.nan, np.float32)))
    assert code_of(lambda: up(collection="bound", documents=[bad]))[0] == C.INVALID_ARGUMENT
    bad.embedding.CopyFrom(encode(v8))
    bad.embedding.data = bad.embedding.data[:-4]
    assert code_of(lambda: up(collection="bound", documents=[bad]))[0] == C.INVALID_ARGUMENT
    assert code_of(lambda: up(collection="bound", documents=[doc(1, v8), doc(1, v8)]))[0] == C.INVALID_ARGUMENT
    assert code_of(lambda: up(collection="bound", documents=[]))[0] == C.INVALID_ARGUMENT
    assert code_of(lambda: up(collection="bad name!", documents=[doc(1, v8)], model="x"))[0] == C.INVALID_ARGUMENT
    search = lambda **kw: stub.SearchDocuments(pb.SearchDocumentsRequest(**kw), timeout=10)  # noqa: E731
    for value in (np.inf, -np.inf, np.nan):  # one bad element, after a good document: nothing stored
        e = v8.copy()
        e[5] = value
        bad.embedding.CopyFrom(encode(e))
        code, msg = code_of(lambda: up(collection="bound", documents=[doc(7, v8), bad]))
        assert code == C.INVALID_ARGUMENT and "documents[1].embedding" in msg and "element 5" in msg, msg
        assert "send a finite embedding" in msg
        e_query = code_of(lambda: search(collection="bound", query_embedding=encode(e)))  # noqa: B023
        assert e_query.code == C.INVALID_ARGUMENT and "query_embedding" in e_query.details
    assert not [h for h in search(collection="bound", query_embedding=encode(v8)).hits if h.id in ("4", "7")]
    assert code_of(lambda: search(collection="nope", query_embedding=encode(v8)))[0] == C.NOT_FOUND
    assert code_of(lambda: search(collection="bound"))[0] == C.INVALID_ARGUMENT  # empty query
    assert (
        code_of(lambda: search(collection="bound", query_embedding=encode(np.ones(9, np.float32))))[0]
        == C.INVALID_ARGUMENT
    )
    assert code_of(lambda: search(collection="bound", query_embedding=encode(v8), top_k=10**6))[0] == C.INVALID_ARGUMENT
    assert (
        code_of(lambda: stub.DeleteDocuments(pb.DeleteDocumentsRequest(collection="nope", ids=["1"]), timeout=10))[0]
        == C.NOT_FOUND
    )
    assert [h.id for h in search(collection="bound", query_embedding=encode(v8)).hits] in (["1", "2"], ["2", "1"])

    up(collection="second", documents=[doc(1, np.ones(4, np.float32))], model="m-C")
    names = [c.name for c in stub.ListCollections(pb.ListCollectionsRequest(), timeout=10).collections]
    assert names == ["bound", "second"]
    stub.DeleteCollection(pb.DeleteCollectionRequest(collection="bound"), timeout=10)
    assert (
        code_of(lambda: stub.GetCollection(pb.GetCollectionRequest(collection="bound"), timeout=10))[0] == C.NOT_FOUND
    )
    assert (
        code_of(lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="bound"), timeout=10))[0]
        == C.NOT_FOUND
    )
    memory_service.stop()
    memory_service.start()
    stub = memory_service.stub()
    assert [c.name for c in stub.ListCollections(pb.ListCollectionsRequest(), timeout=10).collections] == ["second"]


async def test_the_documents_engine_refuses_non_finite_embeddings(redis_server):
    """The engine checks too (not only the gRPC face): a NaN / inf stored would turn every cosine
    against it NaN. Nothing of the request is stored, not even its collection."""
    from extmind.errors import InvalidArgument
    from services.memory.documents import Documents
    from services.memory.embedder_calls import DocumentEmbedder
    from services.memory.kv_store import KVStore

    store = KVStore(redis_server.url)
    try:
        docs = Documents(store.r, DocumentEmbedder(""))
        for value in (np.nan, np.inf, -np.inf):
            e = np.ones(4, np.float32)
            e[2] = value
            with pytest.raises(InvalidArgument, match="document 'b' holds NaN or infinite"):
                await docs.upsert("eng", [("a", "t", {}, np.ones(4, np.float32)), ("b", "t", {}, e)], "m", 0)
            assert await docs.find("eng") is None
        # all zeros: no direction (a cosine of 0 with everything, ranked at random)
        zero = np.zeros(4, np.float32)
        with pytest.raises(InvalidArgument, match="document 'b' is all zeros"):
            await docs.upsert("eng", [("a", "t", {}, np.ones(4, np.float32)), ("b", "t", {}, zero)], "m", 0)
        assert await docs.find("eng") is None
        await docs.upsert("eng", [("a", "t", {}, np.ones(4, np.float32))], "m", 0)
        with pytest.raises(InvalidArgument, match="query_embedding is all zeros"):
            await docs.search("eng", "", zero, 1, {}, "")
    finally:
        await store.close()


def test_no_embedder_is_unavailable(memory_service_factory, memory_service):
    down = memory_service_factory(args=["--embedder-url", f"127.0.0.1:{free_port()}", "--embedder-timeout", "3"])
    for svc, hint in ((memory_service, "--embedder-url"), (down, "embedder")):
        stub = svc.stub()
        code, msg = code_of(
            lambda stub=stub: stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(collection="t", documents=[pb.Document(id="1", text="hello")]), timeout=10
            )
        )
        assert code == C.UNAVAILABLE and hint in msg
        stub.UpsertDocuments(
            pb.UpsertDocumentsRequest(collection="t", model="m", documents=[doc(1, np.ones(4))]), timeout=10
        )
        code, msg = code_of(
            lambda stub=stub: stub.SearchDocuments(pb.SearchDocumentsRequest(collection="t", query="hello"), timeout=10)
        )
        assert code == C.UNAVAILABLE and hint in msg
        assert (
            stub.SearchDocuments(
                pb.SearchDocumentsRequest(collection="t", query_embedding=encode(np.ones(4, np.float32))), timeout=10
            )
            .hits[0]
            .id
            == "1"
        )


class FakeEmbedder(embedder_pb2_grpc.EmbedderServiceServicer):
    """Deterministic stand-in: one model 'fake-16' (alias 'fake'), 16 dimensions (Matryoshka)."""

    calls: list

    def Embed(self, request, context):
        self.calls.append(request)
        if request.model not in ("", "fake", "fake-16"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        dims = request.dimensions or 16
        out = []
        for text in request.inputs:
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(16).astype(np.float32)[:dims]
            out.append(v / np.linalg.norm(v))
        return embedder_pb2.EmbedResponse(embeddings=encode(np.stack(out)), model="fake-16", dimensions=dims)


@pytest.fixture
def fake_embedder():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    impl = FakeEmbedder()
    impl.calls = []
    embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(impl, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", impl
    server.stop(0)


def test_upsert_and_search_through_an_embedder(memory_service_factory, fake_embedder):
    address, impl = fake_embedder
    stub = memory_service_factory(args=["--embedder-url", address]).stub()
    texts = [f"document number {i}" for i in range(12)]
    r = stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="auto",
            documents=[pb.Document(id=str(i), text=t, metadata={"n": str(i)}) for i, t in enumerate(texts)],
        ),
        timeout=10,
    )
    assert r.model == "fake-16" and r.dimensions == 16  # bound to the embedder's canonical name
    assert impl.calls[-1].input_type == embedder_pb2.INPUT_TYPE_DOCUMENT
    res = stub.SearchDocuments(
        pb.SearchDocumentsRequest(collection="auto", query=texts[7], top_k=3, instruction="find it"), timeout=10
    )
    assert res.hits[0].id == "7" and res.hits[0].score > 0.999
    assert impl.calls[-1].input_type == embedder_pb2.INPUT_TYPE_QUERY and impl.calls[-1].model == "fake-16"
    assert impl.calls[-1].instruction == "find it"
    # Mixed: one with an embedding of the same model, one computed.
    v = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="auto",
            documents=[
                pb.Document(id="given", text="x", embedding=encode(v)),
                pb.Document(id="made", text="document number 3"),
            ],
        ),
        timeout=10,
    )
    assert (
        stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="auto", query_embedding=encode(v), top_k=1), timeout=10
        )
        .hits[0]
        .id
        == "given"
    )
    # Matryoshka size for a new collection, and an unknown model is NOT_FOUND from the embedder.
    r = stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(collection="small", dimensions=8, documents=[pb.Document(id="a", text="alpha")]),
        timeout=10,
    )
    assert r.dimensions == 8 and impl.calls[-1].dimensions == 8
    code, msg = code_of(
        lambda: stub.UpsertDocuments(
            pb.UpsertDocumentsRequest(collection="other", model="nope", documents=[pb.Document(id="a", text="alpha")]),
            timeout=10,
        )
    )
    assert code == C.NOT_FOUND and "embedder" in msg
    c = stub.CreateCollection(pb.CreateCollectionRequest(collection="probe", model="fake"), timeout=10).collection
    assert (c.model, c.dimensions) == ("fake-16", 16)


def test_upsert_without_embeddings_on_the_real_embedder(memory_service_factory, tmp_path):
    """The embedder service with its offline default model (all-MiniLM-L6-v2)."""
    pytest.importorskip("services.embedder.app")
    emb = ServiceProcess(
        "services.embedder",
        ["--http-port", str(free_port()), "--log-format", "text"],
        env={"EXTMIND_AUTH_TOKEN": "", "EMBEDDER_MODELS": ""},
        log_dir=tmp_path,
        health_service="extmind.v1.EmbedderService",
        start_timeout=180,
    )
    emb.start()
    try:
        stub = memory_service_factory(args=["--embedder-url", emb.address]).stub()
        texts = {
            "cat": "The cat sat on the warm windowsill all afternoon.",
            "rain": "Heavy rain flooded the streets of the old town.",
            "code": "The compiler reported a type error on line twelve.",
        }
        r = stub.UpsertDocuments(
            pb.UpsertDocumentsRequest(
                collection="real", documents=[pb.Document(id=k, text=t) for k, t in texts.items()]
            ),
            timeout=120,
        )
        assert r.dimensions == 384 and r.model
        hits = stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="real", query="a kitten resting by the window", top_k=3), timeout=120
        ).hits
        assert hits[0].id == "cat" and len(hits) == 3
    finally:
        emb.stop()


def test_search_answers_stay_within_the_response_budget(memory_service_factory):
    """Texts and metadata are the client's, of any size: a search whose hits would pass the
    response budget is INVALID_ARGUMENT saying how many fit (a stock client would get a
    RESOURCE_EXHAUSTED that looks retryable), and a document no search could return is refused."""
    svc = memory_service_factory(args=["--max-response-mb", "0.1"])  # 104 857 bytes
    stub = svc.stub()
    rng = np.random.default_rng(0)
    docs = [doc(i, rng.standard_normal(8), blob="x" * 20_000) for i in range(10)]
    stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="big", model="m", documents=docs), timeout=10)
    q = encode(np.ones(8, np.float32))
    code, msg = code_of(
        lambda: stub.SearchDocuments(
            pb.SearchDocumentsRequest(collection="big", query_embedding=q, top_k=10), timeout=10
        )
    )
    assert code == C.INVALID_ARGUMENT and "ask for top_k 5 or fewer" in msg, msg
    hits = stub.SearchDocuments(pb.SearchDocumentsRequest(collection="big", query_embedding=q, top_k=5), timeout=10)
    assert len(hits.hits) == 5 and hits.ByteSize() <= 0.1 * 2**20
    huge = doc("huge", np.ones(8), blob="y" * 120_000)
    code, msg = code_of(
        lambda: stub.UpsertDocuments(
            pb.UpsertDocumentsRequest(collection="big", model="m", documents=[huge]), timeout=10
        )
    )
    assert code == C.INVALID_ARGUMENT and "could never return it" in msg, msg
    assert stub.GetCollection(pb.GetCollectionRequest(collection="big"), timeout=10).collection.num_documents == 10
    # At the budget exactly (the search's own count of a hit: id, text, metadata, 32 for the rest):
    # stored, and a search returns it; a byte more is refused.
    room = int(0.1 * 2**20) - 4096
    for extra, stored in ((0, True), (1, False)):
        edge = pb.Document(
            id="e", text="t", metadata={"blob": "z" * (room - 46 + extra)}, embedding=encode(np.ones(8, np.float32))
        )
        code, _ = code_of(
            lambda edge=edge: stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(collection="edge", model="m", documents=[edge]), timeout=10
            )
        )
        assert code == (C.OK if stored else C.INVALID_ARGUMENT)
    one = stub.SearchDocuments(pb.SearchDocumentsRequest(collection="edge", query_embedding=q, top_k=1), timeout=10)
    assert [h.id for h in one.hits] == ["e"] and one.ByteSize() <= 0.1 * 2**20
