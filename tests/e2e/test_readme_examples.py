"""The README's Python examples for the memory service and the generator (and the raw gRPC
embedder call beside them), run as written against the cluster `make up` starts: the code is taken
from README.md at test time, only its default addresses are swapped for the test cluster's free
ports, and what it prints is checked against what the README says it prints. Editing an example
into something that no longer runs, or no longer prints what its comments promise, fails here.

The generator is the one `make up` serves: the committed models/extmind-facts-6m (not
downloaded), so " Tirnorbury" is a real answer from memory, not a random-weight model's babble.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess

import grpc
import numpy as np
import pytest

from extmind.channels import sync_channel
from extmind.v1 import memory_pb2, memory_pb2_grpc

from .cluster import REPO, cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = (REPO / "README.md").read_text()


def readme_block(lang: str, marker: str) -> str:
    """The one ```lang block of README.md that contains ``marker``."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README.md has {len(found)} ```{lang} blocks containing {marker!r}, expected 1"
    return found[0]


def with_addresses(code: str, swaps: dict[str, str]) -> str:
    """``code`` with each README default address replaced by the test cluster's. Every one must be
    there: an example pointing at another port than the documented default is a README bug."""
    for default, actual in swaps.items():
        assert default in code, f"the README example no longer uses the default address {default}:\n{code}"
        code = code.replace(default, actual)
    return code


def run(code: str, scope: dict) -> str:
    """Executes ``code`` in ``scope`` as a script would run; -> what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    return out.getvalue()


def promised(code: str, anchor: str) -> object:
    """The value the README's comment on the line containing ``anchor`` says it prints: the
    Python literal after ``# `` or ``# -> `` (e.g. ``print(r.text)  # " Tirnorbury"``)."""
    lines = [line for line in code.splitlines() if anchor in line]
    assert len(lines) == 1, f"{len(lines)} lines of the example contain {anchor!r}"
    m = re.search(r"#\s*(?:->\s*)?(.+)$", lines[0])
    assert m, f"no comment saying what it prints on: {lines[0]}"
    return ast.literal_eval(m.group(1).strip())


@pytest.fixture(scope="module")
def urls(cluster) -> dict[str, str]:
    s = cluster.settings()
    return {
        "embedder": s.embedder_url,
        "memory": s.memory_url,
        "generator": s.generator_url,
        "generator_http": f"127.0.0.1:{s.generator_http_port}",
    }


@pytest.fixture(scope="module")
def memory_stub(urls):
    with sync_channel(urls["memory"]) as ch:
        yield memory_pb2_grpc.MemoryServiceStub(ch)


def delete_memory(stub, memory_id: str) -> None:
    with contextlib.suppress(grpc.RpcError):  # NOT_FOUND: the example never got that far
        stub.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=memory_id), timeout=30)


# ------------------------------------------------------------------ memory service


def test_memory_example_stores_searches_and_upserts(urls, memory_stub):
    code = with_addresses(readme_block("python", "MemoryServiceStub("), {"127.0.0.1:50052": urls["memory"]})
    scope: dict = {}
    try:
        run(code, scope)
        # "returns once every row is on disk: READY"
        got = memory_stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="notes"), timeout=30).memory
        assert got.state == memory_pb2.MEMORY_STATE_READY and got.num_tokens == 100, got
        scores, rows, keys = scope["scores"], scope["rows"], scope["keys"]
        # "[32,1,5], [32,1,5], [32,1,5,128]": 32 query heads over 8 KV heads, one query each, k=5
        assert (scores.shape, rows.shape, keys.shape) == ((32, 1, 5), (32, 1, 5), (32, 1, 5, 128))
        K = scope["K"]
        for h in range(32):  # query head h reads KV head h // 4 of layer 0
            assert len(set(rows[h, 0])) == 5 and 0 <= rows[h, 0].min() and rows[h, 0].max() < 100
            np.testing.assert_array_equal(keys[h, 0], K[0, h // 4][rows[h, 0]])
            assert np.all(np.diff(scores[h, 0]) <= 0), scores[h, 0]  # best first
        hits = memory_stub.SearchDocuments(
            memory_pb2.SearchDocumentsRequest(collection="faq", query="opening hours", top_k=1), timeout=60
        )
        assert [(h.id, h.text) for h in hits.hits] == [("1", "Open 9-5")], hits
    finally:
        delete_memory(memory_stub, "notes")
        with contextlib.suppress(grpc.RpcError):
            memory_stub.DeleteCollection(memory_pb2.DeleteCollectionRequest(collection="faq"), timeout=30)


# ------------------------------------------------------------------ generator, gRPC


@pytest.fixture(scope="module")
def generated(urls, memory_stub):
    """The Memorize + Generate example run once, as written: (its code, its variables, what it
    printed).
    Its memory (velmar-grpc) is deleted after the module."""
    code = with_addresses(readme_block("python", "g.MemorizeRequest("), {"127.0.0.1:50053": urls["generator"]})
    delete_memory(memory_stub, "velmar-grpc")  # a left-over of an interrupted run would be ALREADY_EXISTS
    scope: dict = {}
    printed = run(code, scope)
    yield code, scope, printed
    delete_memory(memory_stub, "velmar-grpc")


CITATION_LINE = re.compile(r"\[(\d+) hits\] tokens \[(\d+):(\d+)\]: (.*)")


def test_generate_example_answers_from_memory_and_cites_it(generated):
    code, scope, printed = generated
    assert scope["mem"].memory_id == "velmar-grpc" and scope["mem"].num_rows > 0
    lines = printed.splitlines()
    assert lines[0] == promised(code, "prompt="), printed  # print(r.text): " Tirnorbury"
    cited = [CITATION_LINE.fullmatch(line) for line in lines[1:]]
    assert cited and all(cited), printed  # every citation printed in the example's format
    hits = [int(m.group(1)) for m in cited]
    assert hits == sorted(hits, reverse=True), printed  # "most retrieved spans first"
    spans = [(int(m.group(2)), int(m.group(3))) for m in cited]
    assert all(0 <= a < b <= scope["mem"].num_tokens for a, b in spans), spans  # half-open, in the text
    assert "Tirnorbury" in ast.literal_eval(cited[0].group(4)), printed  # the answer's own fact, first


class RecordingStub:
    """The example's generator stub, keeping every GenerateStream message it hands the example
    (to check the stream's shape, which the example's printing cannot show)."""

    def __init__(self, stub):
        self._stub, self.events = stub, []

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def GenerateStream(self, *args, **kwargs):  # noqa: N802 (the gRPC method's name)
        for ev in self._stub.GenerateStream(*args, **kwargs):
            self.events.append(ev)
            yield ev


def test_generate_stream_example_streams_the_answer_and_cites_it(generated):
    first_code, first_scope, _ = generated
    code = readme_block("python", "GenerateStreamRequest(")
    # The README runs it after the Memorize + Generate example, in the same session: its stub,
    # its `g` and its memory velmar-grpc.
    stub = RecordingStub(first_scope["stub"])
    printed = run(code, dict(first_scope, stub=stub))
    text, finish, cited, rest = printed.split("\n", 3)
    assert rest == "", printed
    assert text == promised(first_code, "prompt="), printed  # " Tirnorbury", as Generate answered
    m = re.fullmatch(r"FINISH_REASON_(STOP|LENGTH), (\d+) tokens", finish)
    assert m and 1 <= int(m.group(2)) <= 16, finish
    # "the first token comes alone"; "the last message: finish_reason, usage and the citations"
    events = stub.events
    assert len(events[0].token_ids) == 1, events[0]
    assert events[-1].finish_reason and all(not ev.finish_reason for ev in events[:-1])
    # the tokens printed are the generation's (the end token counted, never streamed as text)
    assert int(m.group(2)) == events[-1].usage.completion_tokens >= sum(len(ev.token_ids) for ev in events)
    # The README's promise, `[' lives in Tirnorbury.']`: the most retrieved span is the answer's
    # own sentence. Only the first is compared: whether a weak span also passes the citation
    # threshold can change with a backend's float rounding (on CPU this one, 255 hits, is alone).
    printed_spans, readme_spans = ast.literal_eval(cited), promised(code, "print([c.text")
    assert printed_spans[0] == readme_spans[0], (printed_spans, readme_spans)


def test_generate_example_run_twice_is_already_exists_until_the_memory_is_deleted(cluster, urls, generated):
    code, first_scope, first_printed = generated
    # what the README says of it: "run the snippet twice and `Memorize` answers ALREADY_EXISTS"
    assert re.search(r"twice and `Memorize` answers ALREADY_EXISTS \(`extmind memories delete\s+velmar-grpc`", README)
    scope: dict = {}
    with pytest.raises(grpc.RpcError) as err:
        run(code, scope)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value
    assert "r" not in scope  # Memorize refused it: nothing was generated
    # The README's way out: `extmind memories delete velmar-grpc`; then the example runs again.
    env = dict(
        cluster.env, MEMORY_URL=urls["memory"], GENERATOR_URL=urls["generator"], EXTMIND_RUN_DIR=str(cluster.run_dir)
    )
    r = cli(cluster, "memories", "delete", "velmar-grpc", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    again = run(code, {})
    assert again.splitlines()[0] == first_printed.splitlines()[0]


# ------------------------------------------------------------------ generator, OpenAI HTTP face


def test_openai_examples_memorize_over_curl_and_answer_through_the_openai_package(urls, memory_stub):
    http = urls["generator_http"]
    shell = with_addresses(readme_block("bash", "/v1/memories"), {"localhost:8001": http})
    code = with_addresses(readme_block("python", "from openai import OpenAI"), {"127.0.0.1:8001": http})
    delete_memory(memory_stub, "velmar-http")
    try:
        r = subprocess.run(["bash", "-e", "-c", shell], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        decoder, answers, at = json.JSONDecoder(), [], 0
        while at < len(r.stdout.rstrip()):
            obj, at = decoder.raw_decode(r.stdout, at)
            answers.append(obj)
            while at < len(r.stdout) and r.stdout[at].isspace():
                at += 1
        memorized, completion = answers
        assert (memorized["id"], memorized["state"]) == ("velmar-http", "ready"), memorized
        assert "Tirnorbury" in completion["choices"][0]["text"], completion

        # The streamed one: server-sent events, the text in pieces, the citations in the last chunk.
        streamed = with_addresses(readme_block("bash", '"stream": true'), {"localhost:8001": http})
        r = subprocess.run(["bash", "-e", "-c", streamed], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        events = [line.removeprefix("data: ") for line in r.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.stdout
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == completion["choices"][0]["text"], r.stdout
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop", r.stdout
        assert "Tirnorbury" in chunks[-1]["extmind"]["citations"][0]["text"], r.stdout

        printed = run(code, {}).splitlines()
        assert printed[0] == promised(code, "print(r.choices[0].text)"), printed  # " Tirnorbury"
        cited = [re.fullmatch(r"(\d+) (.+)", line) for line in printed[1:]]
        assert cited and all(cited), printed  # "hits text" for every citation
        assert "Tirnorbury" in cited[0].group(2), printed
    finally:
        delete_memory(memory_stub, "velmar-http")


# ------------------------------------------------------------------ embedder, raw gRPC (Clients)


def test_raw_grpc_embed_example_decodes_the_vectors(urls):
    code = with_addresses(readme_block("python", "EmbedderServiceStub("), {"127.0.0.1:50051": urls["embedder"]})
    scope: dict = {}
    run(code, scope)
    vectors = scope["vectors"]
    assert vectors.shape == (1, 384) and vectors.dtype == np.float32  # the default all-MiniLM-L6-v2
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-3
