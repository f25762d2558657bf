"""The generator's OpenAI-compatible HTTP face, through the official ``openai`` package and raw HTTP,
against ``python -m services.generator`` on a real memory service. The model is a chain model
(extmind.tiny_models.build_chain_llama): its greedy answers are known by construction, and with
zero attention outputs, memories change retrieval (citations) but not the text."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass

import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from extmind.procs import free_port
from extmind.tiny_models import build_chain_llama
from extmind.tiny_tokenizers import build_tokenizer
from extmind.v1 import memory_pb2
from services.generator.chat_prompt import encode_messages

from .helpers import start_generator
from .memory_helpers import TEXT

TOKEN = "s3cret"
EOS = "<|eot_id|>"
# prompt's last token -> what the model then says (ending in EOS).
COMPLETION = ("Ġand", ["Ġthe", "Ġlazy", "Ġfox", EOS])  # " and" -> " the lazy fox"
CHAT_ANSWER = ["ĠBerlin", "Ġis", "Ġcapital", EOS]  # after the chat template's last token
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which city?"}]


@dataclass
class Served:
    port: int
    log_path: object
    grpc_address: str
    model_id: str
    memory_service: object
    tokenizer: object

    def client(self, key: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=30)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None, token: str = TOKEN):
        """-> (status, headers, body bytes) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def json(self, method: str, path: str, body=None, **kw):
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)


def _chain_model(path):
    """A chain model answering COMPLETION after " and" and CHAT_ANSWER after the chat template."""
    build_tokenizer(path, "llama")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()
    build_chain_llama(path, {})  # first without chains: the tokenizer files tell the template's last token
    tok = load_tokenizer(path)
    last = encode_messages(tok, MESSAGES)[-1]
    chain = {}
    for seq in ([COMPLETION[0], *COMPLETION[1]], CHAT_ANSWER):
        ids = [vocab[t] for t in seq]
        for a, b in zip(ids, ids[1:]):
            chain[a] = b
    chain[last] = vocab[CHAT_ANSWER[0]]
    build_chain_llama(path, chain)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, module_memory_service):
    path = tmp_path_factory.mktemp("chain-http") / "chain-model"
    path.mkdir()
    tok = _chain_model(path)
    port = free_port()
    svc = start_generator(
        tmp_path_factory.mktemp("http-logs"),
        path,
        module_memory_service.address,
        "--http-port",
        str(port),
        "--auth-token",
        TOKEN,
    )
    yield Served(port, svc.log_path, svc.address, "chain-model", module_memory_service, tok)
    svc.stop()


@pytest.fixture(scope="module")
def memory_id(served):
    status, body = served.json("POST", "/v1/memories", {"text": TEXT, "memory_id": "facts", "metadata": {"k": "v"}})
    assert status == 200, body
    # stored rows vs the text's tokens (the BOS is not stored), as gRPC Memorize counts them
    assert body["num_tokens"] == body["num_rows"] == body["input_tokens"] - 1
    return body["id"]


# --- completions -------------------------------------------------------------------------------


def test_completions_whole_and_streamed(served):
    c = served.client()
    r = c.completions.create(model=served.model_id, prompt=" and", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == served.model_id
    assert [(x.index, x.text, x.finish_reason) for x in r.choices] == [(0, " the lazy fox", "stop")]
    prompt_tokens = len(served.tokenizer.encode(" and"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens,
        4,  # three words and EOS
        prompt_tokens + 4,
    )
    parts = list(
        c.completions.create(model=served.model_id, prompt=" and", stream=True, stream_options={"include_usage": True})
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == " the lazy fox"
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 4
    # OpenAI's default is 16 tokens; max_tokens cuts with "length"; token ids work as the prompt.
    ids = served.tokenizer.encode(" and")
    r = c.completions.create(model=served.model_id, prompt=ids, max_tokens=2)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (" the lazy", "length", 2)


def test_stop_strings(served):
    c = served.client()
    for stop, text in [("lazy", " the "), ([" fox", "zzz"], " the lazy"), (["e l"], " th"), ("nowhere", None)]:
        r = c.completions.create(model=served.model_id, prompt=" and", stop=stop, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text or " the lazy fox", "stop"), stop
        streamed = list(c.completions.create(model=served.model_id, prompt=" and", stop=stop, stream=True))
        assert "".join(p.choices[0].text for p in streamed) == (text or " the lazy fox"), stop
    r = c.chat.completions.create(model=served.model_id, messages=MESSAGES, stop=[" capital"])
    assert r.choices[0].message.content == " Berlin is" and r.choices[0].finish_reason == "stop"


def test_chat_whole_and_streamed(served):
    c = served.client()
    r = c.chat.completions.create(model=served.model_id, messages=MESSAGES, temperature=0, seed=7)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        " Berlin is capital",
        "stop",
    )
    assert r.usage.prompt_tokens == len(encode_messages(served.tokenizer, MESSAGES))
    assert r.system_fingerprint and r.usage.completion_tokens == 4
    parts = list(c.chat.completions.create(model=served.model_id, messages=MESSAGES, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == " Berlin is capital"
    assert [p.choices[0].finish_reason for p in parts] == [None] * (len(parts) - 1) + ["stop"]
    assert all(p.usage is None for p in parts)
    r = c.chat.completions.create(model=served.model_id, messages=MESSAGES, max_completion_tokens=1)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (" Berlin", "length")
    # Content given as text parts is the same message.
    parts_msg = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Which city?"}]}]
    r = c.chat.completions.create(model=served.model_id, messages=parts_msg)
    assert r.choices[0].message.content == " Berlin is capital"


def test_logprobs(served):
    c = served.client()
    r = c.chat.completions.create(
        model=served.model_id, messages=MESSAGES, logprobs=True, top_logprobs=2, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert [x.token for x in content] == [" Berlin", " is", " capital"]
    for x in content:
        # The chosen token holds all the probability; the runner-up is the margin (30 nats, less the
        # final RMS norm's eps: 30 / sqrt(1 + 512e-6)) behind.
        assert -1e-6 < x.logprob <= 0 and x.bytes == list(x.token.encode())
        assert [t.token for t in x.top_logprobs][0] == x.token and len(x.top_logprobs) == 2
        assert x.top_logprobs[1].logprob == pytest.approx(-30 / (1 + 512e-6) ** 0.5, abs=1e-3)
    assert c.chat.completions.create(model=served.model_id, messages=MESSAGES).choices[0].logprobs is None
    r = c.completions.create(model=served.model_id, prompt=" and", logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.tokens == [" the", " lazy", " fox"] and lp.text_offset == [0, 4, 9]
    assert all(-1e-6 < x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs == [
        {" the": lp.token_logprobs[0]},
        {" lazy": lp.token_logprobs[1]},
        {" fox": lp.token_logprobs[2]},
    ]
    streamed = list(c.completions.create(model=served.model_id, prompt=" and", logprobs=0, stream=True))
    assert [t for p in streamed if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == lp.tokens


def test_logprobs_stop_where_a_stop_string_cuts_the_text(served):
    """The tokens in logprobs are those of the text returned: the token that completes a stop
    string, and tokens whose text only began it, are left out (as EOS is), whole and streamed;
    the usage still counts every generated token."""
    c = served.client()
    for stop, text, tokens in [
        (" lazy", " the", [" the"]),  # the stop string is one token
        (" lazy f", " the", [" the"]),  # " lazy" was held back, " fox" completed it
        ("zy f", " the la", [" the", " lazy"]),  # " lazy" shows partly; " fox" completed it
        (" the lazy fox", "", []),
    ]:
        r = c.completions.create(model=served.model_id, prompt=" and", logprobs=0, stop=stop, temperature=0)
        lp = r.choices[0].logprobs
        assert (r.choices[0].text, lp.tokens, r.choices[0].finish_reason) == (text, tokens, "stop"), stop
        assert len(lp.token_logprobs) == len(tokens) and r.usage.completion_tokens > len(tokens)
        streamed = list(
            c.completions.create(
                model=served.model_id, prompt=" and", logprobs=0, stop=stop, temperature=0, stream=True
            )
        )
        assert "".join(p.choices[0].text for p in streamed) == text, stop
        assert [t for p in streamed if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == tokens, stop
        chat = c.chat.completions.create(
            model=served.model_id, messages=MESSAGES, logprobs=True, stop=" capital", temperature=0
        )
        assert chat.choices[0].message.content == " Berlin is"
        assert [x.token for x in chat.choices[0].logprobs.content] == [" Berlin", " is"]


# --- memories ----------------------------------------------------------------------------------


def test_memories_crud(served, memory_id):
    status, one = served.json("GET", f"/v1/memories/{memory_id}")
    assert status == 200 and one["id"] == "facts" and one["object"] == "memory" and one["state"] == "ready"
    assert one["metadata"] == {"k": "v"} and one["num_tokens"] == one["num_rows"] > 10
    status, models = served.json("GET", "/v1/models")
    assert one["model_fingerprint"] == models["data"][0]["model_fingerprint"]
    made = [served.json("POST", "/v1/memories", {"text": f"note {i}", "memory_id": f"note-{i}"})[1] for i in range(3)]
    assert [m["id"] for m in made] == ["note-0", "note-1", "note-2"]
    seen, after = [], ""
    while True:
        cursor = f"&{'after' if len(seen) < 3 else 'page_token'}={after}" if after else ""
        status, page = served.json("GET", f"/v1/memories?limit=1{cursor}")
        assert status == 200 and len(page["data"]) == 1
        seen += [m["id"] for m in page["data"]]
        if not page["has_more"]:
            assert page["next_page_token"] is None
            break
        after = page["next_page_token"]
    assert sorted(seen) == ["facts", "note-0", "note-1", "note-2"]
    for m in made:
        assert served.json("DELETE", f"/v1/memories/{m['id']}") == (
            200,
            {"id": m["id"], "object": "memory.deleted", "deleted": True},
        )
    assert served.json("GET", "/v1/memories/note-0")[0] == 404
    # The memory service's messages name its RPC and fields; an HTTP caller reads endpoints and parameters.
    status, body = served.json("GET", "/v1/memories/note-0")
    assert body["error"]["message"] == "memory 'note-0' does not exist; GET /v1/memories shows the stored ones"
    status, body = served.json("GET", "/v1/memories?after=not-a-token")
    assert status == 400 and body["error"]["code"] == "invalid_argument", body
    message = body["error"]["message"]
    assert "'after' is not one this service issued" in message and "previous GET /v1/memories response" in message
    assert "ListMemories" not in message and " page_token" not in message, message
    # A method a path does not take: the answer names every method of the path's routes.
    for method, path, use in (("PUT", "/v1/memories", "GET or POST"), ("POST", "/v1/memories/x", "DELETE or GET")):
        status, body = served.json(method, path, {})
        assert status == 405 and body["error"]["message"] == f"{method} {path}: use {use}", body


def test_memorize_streams_progress(served):
    status, headers, data = served.request("POST", "/v1/memories", {"text": TEXT, "memory_id": "s1", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e[len("data: ") :]) for e in data.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert data.decode().endswith("data: [DONE]\n\n")
    progress, done = events[:-1], events[-1]
    assert progress and all(p["object"] == "memory.progress" for p in progress)
    assert progress[-1]["tokens_done"] == progress[-1]["tokens_total"]
    assert done["id"] == "s1" and done["state"] == "ready"
    assert served.json("DELETE", "/v1/memories/s1")[0] == 200


def test_chat_and_completions_with_memories_and_citations(served, memory_id):
    c = served.client()
    em = {"memory_ids": [memory_id], "top_k": 4}
    r = c.chat.completions.create(model=served.model_id, messages=MESSAGES, extra_body={"extmind": em})
    assert r.choices[0].message.content == " Berlin is capital"  # attention adds nothing in this model
    cites = r.model_extra["extmind"]["citations"]
    assert cites and len(cites) <= 5
    for cite in cites:
        assert set(cite) == {"memory_id", "start_token", "end_token", "text", "hits"}
        assert cite["memory_id"] == memory_id and 0 <= cite["start_token"] < cite["end_token"] and cite["hits"] > 0
        assert cite["text"] and cite["text"] in TEXT
    assert [x["hits"] for x in cites] == sorted((x["hits"] for x in cites), reverse=True)
    parts = list(
        c.completions.create(
            model=served.model_id,
            prompt=" and",
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"extmind": {**em, "mode": "remote"}},
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == " the lazy fox"
    assert all("extmind" not in (p.model_extra or {}) for p in parts[:-1])
    assert parts[-1].usage is not None and parts[-1].model_extra["extmind"]["citations"]
    r = c.completions.create(
        model=served.model_id, prompt=" and", extra_body={"extmind": {**em, "return_citations": False}}
    )
    assert r.choices[0].text == " the lazy fox" and r.model_extra["extmind"] == {"citations": []}


# --- errors ------------------------------------------------------------------------------------


def _status_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    e = info.value
    return e.status_code, e.body


def test_every_error_status_has_openai_shape(served, memory_id):
    c = served.client()
    chat = c.chat.completions.create
    built_elsewhere = memory_pb2.CreateMemoryRequest(
        memory_id="other-model",
        layout=memory_pb2.MemoryLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=1),
        model_fingerprint="sha256:" + "0" * 64,
    )
    served.memory_service.stub().CreateMemory(built_elsewhere, timeout=10)
    # Another model's memory is not this generator's to show or delete (the list hides it too).
    for method in ("GET", "DELETE"):
        status, err = served.json(method, "/v1/memories/other-model")
        assert status == 404 and "another model" in err["error"]["message"], (method, err)
    assert served.memory_service.stub().GetMemory(memory_pb2.GetMemoryRequest(memory_id="other-model"), timeout=10)
    cases = [
        (lambda: chat(model=served.model_id, messages=MESSAGES, n=2), 400, "invalid_argument", "n"),
        (lambda: chat(model=served.model_id, messages=MESSAGES, temperature=3), 400, "invalid_argument", "temperature"),
        (lambda: chat(model=served.model_id, messages=[]), 400, "invalid_argument", "messages"),
        (
            lambda: chat(model=served.model_id, messages=[{"role": "tool", "content": "x"}]),
            400,
            "invalid_argument",
            "messages[0].role",
        ),
        (
            lambda: chat(model=served.model_id, messages=MESSAGES, top_logprobs=3),
            400,
            "invalid_argument",
            "top_logprobs",
        ),
        (lambda: chat(model=served.model_id, messages=MESSAGES, max_tokens=0), 400, "invalid_argument", "max_tokens"),
        (lambda: chat(model=served.model_id, messages=MESSAGES, stop=[""]), 400, "invalid_argument", "stop"),
        (
            lambda: chat(model=served.model_id, messages=MESSAGES, stop=[f"s{i}" for i in range(33)]),
            400,
            "invalid_argument",
            "stop",
        ),
        (
            lambda: c.completions.create(model=served.model_id, prompt=" and", logprobs=6),
            400,
            "invalid_argument",
            "logprobs",
        ),
        (lambda: c.completions.create(model=served.model_id, prompt=["a", "b"]), 400, "invalid_argument", "prompt"),
        (lambda: c.completions.create(model=served.model_id, prompt=[10**6]), 400, "invalid_argument", None),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id], "mode": "far"}},
            ),
            400,
            "invalid_argument",
            "extmind.mode",
        ),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id], "layers": [0, 99]}},
            ),
            400,
            "invalid_argument",
            "extmind.layers",
        ),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id], "top_k": -1}},
            ),
            400,
            "invalid_argument",
            "extmind.top_k",
        ),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id], "threshold": 1.5}},
            ),
            400,
            "invalid_argument",
            "extmind.threshold",
        ),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id], "citation_min_weight": 2}},
            ),
            400,
            "invalid_argument",
            "extmind.citation_min_weight",
        ),
        (
            lambda: chat(
                model=served.model_id,
                messages=MESSAGES,
                extra_body={"extmind": {"memory_ids": [memory_id, memory_id]}},
            ),
            400,
            "invalid_argument",
            "extmind.memory_ids",
        ),
        (
            lambda: served.client("wrong").chat.completions.create(model=served.model_id, messages=MESSAGES),
            401,
            "unauthenticated",
            None,
        ),
        (lambda: chat(model="gpt-4o", messages=MESSAGES), 404, "model_not_found", None),
        (
            lambda: chat(model=served.model_id, messages=MESSAGES, extra_body={"extmind": {"memory_ids": ["absent"]}}),
            404,
            "not_found",
            None,
        ),
        (
            lambda: c.completions.create(
                model=served.model_id,
                prompt=" and",
                stream=True,
                extra_body={"extmind": {"memory_ids": ["other-model"]}},
            ),
            409,
            "failed_precondition",
            None,
        ),
    ]
    for call, status, code, param in cases:
        got, body = _status_of(call)
        assert (got, body["code"], body["param"]) == (status, code, param), body
        assert body["type"] == "invalid_request_error" and body["message"]
    assert "another model" in _status_of(cases[-1][0])[1]["message"]
    # Raw HTTP: bodies that are not JSON objects or not text, unknown paths and methods.
    for raw, words in [
        (b"{", "JSON"),
        (b"[1]", "object"),
        (b'{"prompt": "\xff"}', "UTF-8"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"prompt": " and", "model": 5}', "'model'"),
    ]:
        status, body = served.json("POST", "/v1/completions", raw=raw)
        assert status == 400 and words in body["error"]["message"], (raw, body)
    assert served.json("GET", "/v1/nothing")[0] == 404
    assert served.json("GET", "/v1/chat/completions")[1]["error"]["code"] == "unimplemented"
    assert served.json("GET", "/v1/memories?limit=0")[0] == 400
    assert served.json("POST", "/v1/memories", {"text": ""})[0] == 400
    # wrong types are not read as "empty"
    for field, value in (("memory_id", False), ("metadata", []), ("metadata", 0)):
        status, body = served.json("POST", "/v1/memories", {"text": "x", field: value})
        assert status == 400 and body["error"]["param"] == field, (field, value, body)
    assert served.json("GET", "/v1/memories?limit=%C2%B2")[0] == 400  # a Unicode digit
    # Unknown fields are ignored, as OpenAI does.
    status, body = served.json("POST", "/v1/completions", {"prompt": " and", "user": "u1", "frequency_penalty": 0})
    assert status == 200 and body["choices"][0]["text"] == " the lazy fox"


def test_health_models_and_metrics_need_no_token_but_the_api_does(served):
    assert served.json("GET", "/health", token="") == (
        200,
        {
            "status": "ok",
            "model": served.model_id,
            "model_fingerprint": served.json("GET", "/v1/models")[1]["data"][0]["model_fingerprint"],
        },
    )
    status, headers, data = served.request("GET", "/metrics", token="")
    assert status == 200 and headers["content-type"].startswith("text/plain") and b"# TYPE" in data
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/memories"), ("POST", "/v1/completions")]:
        status, body = served.json(method, path, {"prompt": "x"} if method == "POST" else None, token="")
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), path


def test_sse_framing_on_the_wire(served):
    body = {"prompt": " and", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    status, headers, data = served.request("POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = data.decode()
    assert text.endswith("\n\ndata: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e, e  # one data line per event, a blank line after it
    objects = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert "".join(o["choices"][0]["text"] for o in objects if o["choices"]) == " the lazy fox"
    assert objects[-1]["choices"] == [] and objects[-1]["usage"]["completion_tokens"] == 4
    status, _, data = served.request("POST", "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    chunks = [json.loads(e[6:]) for e in data.decode().split("\n\n")[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_one_access_line_per_request_streams_when_they_end(served):
    body = {"prompt": " and", "stream": True, "user": "access-line-check", "max_tokens": 3}
    assert served.request("POST", "/v1/completions", body)[0] == 200
    deadline = time.monotonic() + 10
    want = "path=/v1/completions status=200"
    while time.monotonic() < deadline:
        lines = [x for x in served.log_path.read_text().splitlines() if want in x and "completion_tokens=3" in x]
        if lines:
            break
        time.sleep(0.1)
    assert lines and "method=POST" in lines[-1] and "duration_ms=" in lines[-1], served.log_path.read_text()[-2000:]


def test_chat_template_kwargs_reach_the_template(served):
    """vLLM's ``chat_template_kwargs`` become the template's variables (Qwen3's enable_thinking);
    the engine's rules for them apply (tests/generator/test_chat_families.py has their effect)."""
    c = served.client()
    r = c.chat.completions.create(
        model=served.model_id, messages=MESSAGES, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert r.choices[0].message.content == " Berlin is capital"  # the Llama 3 template ignores it
    for kwargs, param, words in [
        ([1], "chat_template_kwargs", "must be an object"),
        ({"messages": "x"}, None, "cannot be set"),
        ({"enable_thinking": {"nested": True}}, None, "must be a boolean, number, string or null"),
    ]:
        status, body = served.json(
            "POST",
            "/v1/chat/completions",
            {"model": served.model_id, "messages": MESSAGES, "chat_template_kwargs": kwargs},
        )
        assert status == 400 and words in body["error"]["message"], (kwargs, body)
        if param:
            assert body["error"]["param"] == param


def test_http_metrics_count_requests_by_route_template(served):
    """GET /metrics of the generator's face counts its own requests by route template (a memory id
    never becomes a label)."""
    from prometheus_client.parser import text_string_to_metric_families

    def count(route: str, method: str, status: str) -> float:
        _, _, data = served.request("GET", "/metrics")
        for fam in text_string_to_metric_families(data.decode()):
            for s in fam.samples:
                if s.name == "extmind_http_requests_total" and s.labels == {
                    "face": "generator",
                    "route": route,
                    "method": method,
                    "status": status,
                }:
                    return s.value
        return 0.0

    status, body = served.json("POST", "/v1/memories", {"text": TEXT, "memory_id": "metrics-route"})
    assert status == 200, body
    memory_id = body["id"]
    before = count("/v1/memories/{memory_id}", "GET", "200"), count("/v1/memories/{memory_id}", "GET", "404")
    assert served.json("GET", f"/v1/memories/{memory_id}")[0] == 200
    assert served.json("GET", "/v1/memories/v1")[0] == 404  # an id that looks like a path segment
    after = count("/v1/memories/{memory_id}", "GET", "200"), count("/v1/memories/{memory_id}", "GET", "404")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    _, _, data = served.request("GET", "/metrics")
    assert memory_id not in data.decode().split("extmind_http_requests_total")[1].split("# HELP")[0]


def test_memory_service_down_is_503(served, memory_id):
    c = served.client()
    served.memory_service.stop()
    try:
        got, body = _status_of(
            lambda: c.chat.completions.create(
                model=served.model_id, messages=MESSAGES, extra_body={"extmind": {"memory_ids": [memory_id]}}
            )
        )
        assert (got, body["code"], body["type"]) == (503, "unavailable", "service_unavailable")
        assert "memory service" in body["message"]
        for method, path, b in [
            ("GET", "/v1/memories", None),
            ("POST", "/v1/memories", {"text": "x"}),
            ("POST", "/v1/memories", {"text": "x", "stream": True}),  # refused before the first event
            ("DELETE", f"/v1/memories/{memory_id}", None),
        ]:
            status, err = served.json(method, path, b)
            assert (status, err["error"]["code"]) == (503, "unavailable"), path
        # Without memories the generator still answers.
        assert c.chat.completions.create(model=served.model_id, messages=MESSAGES).choices[0].message.content
    finally:
        served.memory_service.start()
