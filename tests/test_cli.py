"""The ``extmind`` CLI as a person runs it: ``python -m extmind.cli`` in a subprocess, against a real
memory service (on a real Redis) and a real generator (tiny random-weight Llama), both started with
extmind/procs.py. Also the Makefile targets that take the run dir, and the run dir's cluster.json."""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from extmind.channels import sync_channel
from extmind.cluster import Cluster
from extmind.cluster_config import Settings, addresses, service_specs, write_record
from extmind.cluster_pids import PidRecord, write_pid
from extmind.procs import RedisProcess, free_ports, start_time
from extmind.service_procs import ServiceProcess
from extmind.tensor import FLOAT32, encode
from extmind.tiny_models import build_llama
from extmind.v1 import memory_pb2, memory_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent

# Variables that would point the CLI somewhere else than what a test chooses.
_SCRUB = (
    "EMBEDDER_URL",
    "MEMORY_URL",
    "GENERATOR_URL",
    "EMBEDDER_PORT",
    "MEMORY_PORT",
    "GENERATOR_PORT",
    "EXTMIND_RUN_DIR",
    "REDIS_URL",
    "MEMORY_DATA_DIR",
    "EXTMIND_AUTH_TOKEN",
    "RUN_DIR",
    "EMBEDDER_HOST",
    "MEMORY_HOST",
    "GENERATOR_HOST",
    "MAKEFLAGS",
    "MFLAGS",
)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def cli(*args, env=None, cwd=None, input=None):
    return subprocess.run(
        [sys.executable, "-m", "extmind.cli", *args],
        env=env or clean_env(),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )


def one_line(r) -> str:
    """The stderr of a failed command: exactly one line, no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    return r.stderr.strip()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = build_llama(d / "llama", hidden=64, layers=2, heads=4, kv_heads=2, seed=3)
    redis = RedisProcess(d / "redis").start()
    mem = ServiceProcess(
        "services.memory",
        ["--redis-url", redis.url, "--log-format", "text"],
        env={"EXTMIND_AUTH_TOKEN": ""},
        log_dir=d / "logs",
        health_service="extmind.v1.MemoryService",
    ).start()
    gen = ServiceProcess(
        "services.generator",
        ["--model", str(model), "--log-format", "text", "--http-port", "-1"],
        env={"EXTMIND_AUTH_TOKEN": "", "MEMORY_URL": mem.address},
        log_dir=d / "logs",
        health_service="extmind.v1.GeneratorService",
    ).start()
    yield {"memory": mem, "generator": gen, "redis": redis}
    gen.stop()
    mem.stop()
    redis.close()


@pytest.fixture(scope="module")
def env(services):
    (dead,) = free_ports(1)
    return clean_env(
        MEMORY_URL=services["memory"].address,
        GENERATOR_URL=services["generator"].address,
        EMBEDDER_URL=f"127.0.0.1:{dead}",
    )


# ------------------------------------------------------------------ the command line itself


@pytest.mark.parametrize(
    "args, says",
    [
        (["docs", "search", "c", "q", "--top-k", "-1"], "argument --top-k: must be a positive whole number, got -1"),
        (["docs", "search", "c", "q", "--top-k", "0"], "argument --top-k: must be a positive whole number, got 0"),
        (["generate", "hi", "--max-tokens", "-3"], "argument --max-tokens: must be a positive whole number, got -3"),
        (["generate", "hi", "--top-k", "-1"], "argument --top-k: must be a whole number >= 0, got -1"),
        (["generate", "hi", "--top-p", "1.5"], "argument --top-p: must be in [0, 1], got 1.5"),
        (["memorize", "f.txt", "--split-chars", "-5"], "argument --split-chars: must be a whole number >= 0, got -5"),
        (["generate", "hi", "--max-tokens", "99999999999"], "argument --max-tokens: must be at most 4294967295"),
        (["generate", "hi", "--seed", "99999999999999999999999"], "argument --seed: must be at most"),
        (["docs", "search", "c", "q", "--top-k", "99999999999"], "argument --top-k: must be at most 4294967295"),
        (["generate", "hi", "--citations"], "--citations needs --memory ID"),
        (["generate", "hi", "--memory-top-k", "3"], "--memory-top-k needs --memory ID"),
        (
            ["generate", "hi", "--memory", "m", "--memory-top-k", "5000"],
            "argument --memory-top-k: must be at most 1024",
        ),
        (["generate", "hi", "--memory", "m", "--memory-top-k", "0"], "argument --memory-top-k: must be a positive"),
        (["generate", "hi", "--memory", "m", "--citation-min-weight", "0.1"], "only shapes what --citations prints"),
        (["generate", "hi", "--memory", "m", "--max-citations", "2"], "--max-citations only shapes what --citations"),
        (["generate", "hi", "--citation-min-weight", "1.5"], "--citation-min-weight: must be in [0, 1], got 1.5"),
        (["generate", "hi", "--citation-min-weight", "nan"], "--citation-min-weight: must be in [0, 1], got nan"),
        (["generate", "hi", "--memory", "m", "--memory", "n", "--memory", "m"], "--memory m given more than once"),
        (["memorize", "a.txt", "b.txt", "--id", "x"], "--id names one memory"),
        # unknown words name the subcommand whose usage they broke, not the top level's
        (["memories", "show", "a", "b"], "memories show: unrecognized arguments: b (see `extmind memories show"),
        (["generate", "hi", "--mode", "remote"], "unrecognized arguments: --mode remote (see `extmind generate"),
        (["status", "x"], "extmind status: unrecognized arguments: x (see `extmind status --help`)"),
        (["--bogus", "status"], "extmind: unrecognized arguments: --bogus (see `extmind --help`)"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, says):
    r = cli(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    line = one_line(r)
    assert line.startswith("extmind") and says in line, line
    assert r.stdout == ""


def test_python_m_extmind_is_the_extmind_command():
    r = subprocess.run(
        [sys.executable, "-m", "extmind", "generate", "hi", "--top-p", "2"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "argument --top-p: must be in [0, 1], got 2" in one_line(r)


def test_help_describes_every_argument_and_action():
    from extmind.cli_args import build_parser

    def walk(parser, prog):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {c.dest for c in action._choices_actions if c.help}
                assert described == set(action.choices), (prog, set(action.choices) - described)
                for name, child in action.choices.items():
                    yield from walk(child, f"{prog} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield prog, action

    missing = [f"{prog} {a.dest}" for prog, a in walk(build_parser(), "extmind") if not a.help]
    assert missing == [], missing


def test_arguments_not_in_their_form_are_one_line_exit_2():
    # as argparse's own value errors (--top-k abc): a wrong command line
    for args, says in (
        (["docs", "upsert", "c", "no-equals-sign"], "must be id=text, @file or @file.jsonl"),
        (["memorize", "x.txt", "--label", "nolabel"], "--label: 'nolabel' must look like key=value"),
        (["memorize", "x.txt", "--label", "=v"], "--label: '=v' must look like key=value (a non-blank key)"),
        (["docs", "upsert", "c", "a=b", "--meta", " =v"], "--meta: ' =v' must look like key=value (a non-blank key)"),
        (["docs", "search", "c", "q", "--filter", "bad"], "--filter: 'bad' must look like key=value"),
        (["docs", "upsert", "c", "a=b", "--meta", "=v"], "--meta: '=v' must look like key=value"),
        (["docs", "upsert", "c", "@"], "'@' names no file: give @FILE or @FILE.jsonl"),
        (["docs", "upsert", "c", "id3="], "document 'id3=': blank text (give id=text)"),
        (["docs", "upsert", "c", "=some text"], "document '=some text': blank id (give id=text)"),
        (["docs", "upsert", "c", " =some text"], "document ' =some text': blank id (give id=text)"),
        (["generate", "hi", "--temperature", "inf"], "argument --temperature: must be in [0, ∞), got inf"),
        (["generate", "hi", "--memory", ""], "argument --memory: must not be empty"),
        (["generate", "hi", "--stop", ""], "argument --stop: must not be empty"),
        # bytes that are not UTF-8 (Python hands them over as lone surrogates), in any argument
        (["docs", "upsert", "c", "i=\udcff"], "extmind: argument 'i=\\udcff' is not valid UTF-8 text"),
        (["docs", "search", "c", "q", "--filter", "k=\udcff"], "argument 'k=\\udcff' is not valid UTF-8 text"),
        (["generate", "hi\udcff"], "argument 'hi\\udcff' is not valid UTF-8 text"),
        (["memorize", "f\udcff.txt"], "argument 'f\\udcff.txt' is not valid UTF-8 text (a file name? rename it)"),
        (["memories", "show", "a\udcff"], "argument 'a\\udcff' is not valid UTF-8 text"),
        (["docs", "search", "c", "q", "--top-k", "abc"], "--top-k"),
    ):
        r = cli(*args)
        assert r.returncode == 2 and says in one_line(r), (args, r.stderr)
        # checked while parsing: before the environment and the files (a wrong URL, a missing file)
        r = cli(*args, env=clean_env(MEMORY_URL="http://x:1", GENERATOR_URL="http://x:1"))
        assert r.returncode == 2 and says in one_line(r), (args, r.stderr)


def test_bad_values_are_one_line_exit_1(tmp_path):
    r = cli("generate", "")
    assert r.returncode == 1 and "the prompt is empty: give its text, or '-' and the text on stdin" in one_line(r)
    lines = tmp_path / "docs.jsonl"
    for line, says in (
        ('{"id": "a"}', ":1: each line must be a JSON object with 'id' and 'text'"),
        ('{"id": "a", "text": 3}', ":1: 'text' must be a non-empty string"),
        ('{"id": "a", "text": " "}', ":1: 'text' must be a non-empty string"),
        ('{"id": null, "text": "t"}', ":1: 'id' must be a non-empty string (or a whole number)"),
        ('{"id": true, "text": "t"}', ":1: 'id' must be a non-empty string (or a whole number)"),
        (
            '{"id": "a", "text": "t", "metadata": {"year": 2024}}',
            ":1: 'metadata' must map non-empty names to strings (quote numbers: \"2024\")",
        ),
        ('{"id": "a", "text": "t", "metadata": {"": "v"}}', ":1: 'metadata' must map non-empty names to strings"),
        ('{"id": "a", "text": "t", "metadata": ["v"]}', ":1: 'metadata' must map non-empty names to strings"),
        ('{"id": "a", "text": "t", "metadata": ""}', ":1: 'metadata' must map non-empty names to strings"),
        ('{"id": "a", "text": "bad \\ud800"}', ":1: text that is not valid UTF-8 (a lone surrogate such as \\ud800)"),
        (
            '{"id": "a", "text": "t", "metadata": {"\\udc00": "v"}}',
            ":1: text that is not valid UTF-8 (a lone surrogate such as \\ud800)",
        ),
        ('{"id": "a", "text": "t"', ":1: not valid JSON (Expecting ',' delimiter: line 1 column 24 (char 23))"),
        ("\n  \n", " holds no documents: one JSON object with 'id' and 'text' a line"),
    ):
        lines.write_text(line + "\n")
        r = cli("docs", "upsert", "c", f"@{lines}")
        assert r.returncode == 1 and one_line(r) == f"extmind: {lines}" + says, r.stderr
    lines.write_text('{"id": ' + "9" * 5000 + ', "text": "t"}\n')  # past Python's digits for an int
    r = cli("docs", "upsert", "c", f"@{lines}")
    assert r.returncode == 1 and one_line(r).startswith(f"extmind: {lines}:1: not valid JSON ("), r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = cli("docs", "upsert", "c", f"@{empty}")
    assert r.returncode == 1 and one_line(r) == f"extmind: {empty} is empty: nothing to upsert", r.stderr
    r = cli("memories", "list", env=clean_env(EXTMIND_CLI_TIMEOUT="soon"))
    assert (
        r.returncode == 1 and one_line(r) == "extmind: EXTMIND_CLI_TIMEOUT='soon' must be a positive number of seconds"
    )


def test_non_utf8_input_is_one_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    for args in (["memorize", str(bad)], ["docs", "upsert", "c", f"@{bad}"]):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert one_line(r) == (
            f"extmind: {bad} is not UTF-8 text (byte 0xe9 at offset 3); convert it first, "
            "e.g. `iconv -f latin1 -t utf-8`"
        )
    r = subprocess.run(
        [sys.executable, "-m", "extmind.cli", "memorize", "-"],
        env=clean_env(),
        cwd=ROOT,
        input=b"\xff\xfe",
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 1 and b"stdin is not UTF-8 text" in r.stderr and r.stderr.count(b"\n") == 1


def test_unreachable_service_is_one_line_saying_where_the_url_came_from(tmp_path):
    (dead,) = free_ports(1)
    run = tmp_path / "run"
    r = cli("memories", "list", env=clean_env(MEMORY_URL=f"127.0.0.1:{dead}"))
    assert r.returncode == 1 and r.stdout == ""  # no table header before the error
    line = one_line(r)
    assert line.startswith(f"extmind: UNAVAILABLE: cannot reach the memory service at 127.0.0.1:{dead} [MEMORY_URL]")
    assert line.endswith("is the cluster up? `make up`, `extmind status`")
    r = cli("memories", "list", env=clean_env(MEMORY_PORT=str(dead), EXTMIND_RUN_DIR=str(run)))
    assert f"at 127.0.0.1:{dead} [default; no {run}/cluster.json] (" in one_line(r)
    run.mkdir()
    (run / "cluster.json").write_text(json.dumps({"memory_url": f"127.0.0.1:{dead}"}))
    r = cli("memories", "list", env=clean_env(EXTMIND_RUN_DIR=str(run)))
    assert f"at 127.0.0.1:{dead} [{run}/cluster.json] (" in one_line(r)


@pytest.mark.parametrize("url", ["http//bad", "localhost", "http://127.0.0.1:1", "grpc://"])
def test_a_url_that_is_no_grpc_target_says_which_forms_are(url):
    r = cli("memories", "list", env=clean_env(MEMORY_URL=url))
    assert r.returncode == 1 and r.stdout == ""
    line = one_line(r)
    assert line.startswith(f"extmind: the memory service's URL [MEMORY_URL]: {url!r} is "), line
    assert "host:port or grpc://host:port" in line or "use host:port, grpc://host:port" in line, line


def test_a_grpc_url_without_a_port_is_told_it_meant_443():
    r = cli("memories", "list", env=clean_env(MEMORY_URL="grpc://127.0.0.1", EXTMIND_CLI_TIMEOUT="5"))
    line = one_line(r)
    assert r.returncode == 1 and line.startswith("extmind: UNAVAILABLE: cannot reach the memory service"), line
    assert line.endswith("; grpc://127.0.0.1 names no port, so gRPC tried 443"), line


def test_up_refuses_a_url_that_is_no_grpc_target_before_starting_anything(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "extmind.cluster", "up", "--run-dir", str(run)],
        env=clean_env(MEMORY_URL="memory"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "MEMORY_URL: 'memory' is not a gRPC target" in r.stderr, r.stderr
    assert not run.exists()  # no service started, no run dir made


def test_an_unresolvable_host_is_unreachable_not_an_answer():
    r = cli("memories", "list", env=clean_env(MEMORY_URL="no-such-host.invalid:1"))
    line = one_line(r)
    assert r.returncode == 1 and "cannot reach the memory service at no-such-host.invalid:1 [MEMORY_URL]" in line, line
    assert "answered" not in line


def test_a_service_that_answers_unavailable_is_not_called_unreachable():
    # The generator is up; the memory service behind it is not: the line must not send the user
    # looking for the generator (it quotes the dead peer's own transport error further on).
    said = (
        "memory 'renmi': memory service at 127.0.0.1:1 is unavailable (UNAVAILABLE: failed to connect "
        "to all addresses); start it or point --memory-url at it"
    )

    def list_memories(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, said)

    handler = grpc.method_handlers_generic_handler(
        "extmind.v1.MemoryService",
        {
            "ListMemories": grpc.unary_unary_rpc_method_handler(
                list_memories,
                request_deserializer=memory_pb2.ListMemoriesRequest.FromString,
                response_serializer=memory_pb2.ListMemoriesResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        r = cli("memories", "list", env=clean_env(MEMORY_URL=f"127.0.0.1:{port}"))
    finally:
        server.stop(None)
    assert r.returncode == 1
    assert one_line(r) == f"extmind: UNAVAILABLE: the memory service at 127.0.0.1:{port} [MEMORY_URL] answered: {said}"


def test_an_http_port_given_as_a_grpc_url_says_so():
    # A natural mistake: EMBEDDER_URL at the HTTP face (8000) instead of the gRPC port (50051).
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"127.0.0.1:{server.server_port}"
    try:
        r = cli("embed", "hi", env=clean_env(EMBEDDER_URL=url))
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 1 and r.stdout == ""
    assert one_line(r) == (
        f"extmind: UNAVAILABLE: {url} [EMBEDDER_URL] is not a gRPC server (it answers in HTTP/1, as the "
        "services' HTTP ports do); the embedder's gRPC port is 50051 unless EMBEDDER_PORT says otherwise"
    )


# ------------------------------------------------------------------ against the services


def test_docs_create_collections_drop(env):
    r = cli("docs", "collections", env=env)
    assert r.returncode == 0 and "cli-col" not in r.stdout, r.stderr
    r = cli("docs", "create", "cli-col", "--model", "test-model", "--dimensions", "8", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "created collection cli-col (test-model, 8 dims)", r.stderr
    r = cli("docs", "collections", env=env)
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["cli-col"][1:4] == ["0", "8", rows["cli-col"][3]] and rows["cli-col"][-1] == "test-model", r.stdout
    r = cli("docs", "drop", "cli-col", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "dropped collection cli-col", r.stderr
    r = cli("docs", "collections", env=env)
    assert r.returncode == 0 and "cli-col" not in r.stdout
    r = cli("docs", "drop", "cli-col", env=env)
    assert r.returncode == 1
    line = one_line(r)
    # A command to type, not an RPC name; the collection named once; no hint to create what is dropped.
    assert line.startswith("extmind: NOT_FOUND: collection 'cli-col' does not exist: nothing to delete"), line
    assert "`extmind docs collections`" in line and "ListCollections" not in line and "create" not in line
    assert line.count("cli-col") == 1


def test_memorize_skips_or_replaces_existing_ids(env, tmp_path):
    a, b, c = (tmp_path / f"{n}.txt" for n in ("cli-a", "cli-b", "cli-c"))
    a.write_text("The lighthouse keeper lit the lamp at dusk.\n")
    b.write_text("Bees dance to tell the hive where flowers are.\n")
    c.write_text("Granite forms when magma cools slowly underground.\n")
    r = cli("memorize", str(a), str(b), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    made = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert set(made) == {"cli-a", "cli-b"}
    tokens, rows = made["cli-a"].split(" tokens, ")
    # The count the generator tokenized and the rows stored differ by the BOS, and the line says so.
    assert rows == f"{int(tokens) - 1} memory rows (special tokens such as BOS are not stored)", made

    # With the progress shown (a pipe: a line per 10%): a skipped id costs no work, so the bar
    # counts only the text memorized, and with every id skipped there is no bar at all.
    r = cli("memorize", str(a), str(c), env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cli-a: exists already, skipped (--replace memorizes it again)"
    assert lines[1].startswith("cli-c: ") and "memory rows" in lines[1]
    progress = r.stderr.splitlines()
    n = len(c.read_text())
    assert progress and all(f"/{n} chars" in p and p.endswith(" cli-c") for p in progress), r.stderr
    r = cli("memorize", str(a), str(b), env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines() == [f"cli-{x}: exists already, skipped (--replace memorizes it again)" for x in "ab"]
    # Two files giving one id: refused before anything is memorized (the second would be skipped).
    other = tmp_path / "sub"
    other.mkdir()
    (other / "cli-d.txt").write_text("Owls turn their heads.\n")
    (tmp_path / "cli-d.txt").write_text("Otters hold hands.\n")
    r = cli("memorize", str(tmp_path / "cli-d.txt"), str(other / "cli-d.txt"), env=env)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert one_line(r).endswith("both give the memory id cli-d: rename one"), r.stderr
    assert cli("memories", "show", "cli-d", env=env).returncode == 1

    r = cli("memorize", str(a), "--replace", "--quiet", "--label", "round=2", env=env)
    assert r.returncode == 0 and r.stdout.startswith("cli-a: ") and "memory rows" in r.stdout, r.stderr
    show = cli("memories", "show", "cli-a", env=env)
    fields = dict(line.split(None, 1) for line in show.stdout.splitlines())
    assert fields["labels"] == "round=2, source=cli-a.txt"  # the labels of the second memorize: replaced
    assert fields["excerpt"] == "The lighthouse keeper lit the lamp at dusk."
    assert fields["rows"].startswith(f"{int(tokens) - 1} (one per stored token; special tokens such as BOS")
    # Not "one more": every special token of a text is left out, not only the BOS.
    assert fields["rows"].endswith("so `extmind memorize` counted more tokens)"), fields["rows"]
    listed = cli("memories", "list", env=env)
    assert {line.split()[0] for line in listed.stdout.splitlines()[1:]} >= {"cli-a", "cli-b", "cli-c"}


def test_show_of_a_memory_written_from_token_ids_says_nothing_of_memorize(services, env):
    # As README's memory example writes one: token ids given, no text, another model's fingerprint.
    stub = memory_pb2_grpc.MemoryServiceStub(sync_channel(services["memory"].address))
    keys = encode(np.zeros((1, 3, 4), np.float32))  # [kv heads, rows, head_dim]
    stub.CreateMemory(
        memory_pb2.CreateMemoryRequest(
            memory_id="cli-raw",
            model_fingerprint="another-model",
            token_ids=[5, 6, 7],
            layout=memory_pb2.MemoryLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype=FLOAT32),
        ),
        timeout=10,
    )
    append = memory_pb2.AppendMemoryRequest(memory_id="cli-raw", layer=0, keys=keys, values=keys)
    stub.AppendMemory(iter([append]), timeout=10)
    show = cli("memories", "show", "cli-raw", env=env)
    assert show.returncode == 0, show.stderr
    fields = dict(line.split(None, 1) for line in show.stdout.splitlines())
    assert fields["rows"] == "3 (one per stored token)", fields["rows"]
    assert fields["excerpt"].startswith("- (not memorized by this CLI"), fields["excerpt"]


def test_not_found_names_the_memory_once(env):
    r = cli("memories", "show", "cli-nope", env=env)
    assert r.returncode == 1
    line = one_line(r)
    assert line == "extmind: NOT_FOUND: memory 'cli-nope' does not exist; `extmind memories list` shows the stored ones"
    # Through the generator, which prefixes the memory's name to the memory service's message.
    r = cli("generate", "hello", "--memory", "cli-nope", "--max-tokens", "2", env=env)
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith("extmind: NOT_FOUND: memory 'cli-nope' does not exist") and line.count("cli-nope") == 1


# ------------------------------------------------------------------ finding the cluster


def test_cluster_json_in_the_run_dir_is_found_without_env_vars(services, tmp_path):
    mem = services["memory"].address
    (tmp_path / ".run").mkdir()
    (tmp_path / ".run" / "cluster.json").write_text(json.dumps({"memory_url": mem}))
    r = cli("memories", "list", cwd=tmp_path)  # ./.run, no variables
    assert r.returncode == 0 and r.stdout.startswith("MEMORY "), r.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cluster.json").write_text(json.dumps({"memory_url": mem}))
    for how in (dict(env=clean_env(EXTMIND_RUN_DIR=str(elsewhere))), dict(args=["--run-dir", str(elsewhere)])):
        r = cli(*how.get("args", []), "docs", "collections", env=how.get("env"), cwd=ROOT)
        assert r.returncode == 0 and r.stdout.startswith("COLLECTION"), (how, r.stderr)

    # An explicit MEMORY_URL wins over the record.
    (dead,) = free_ports(1)
    r = cli("memories", "list", env=clean_env(MEMORY_URL=f"127.0.0.1:{dead}"), cwd=tmp_path)
    assert r.returncode == 1 and f"memory service at 127.0.0.1:{dead}" in one_line(r)


def test_status_describes_the_services_the_urls_name(services, env, tmp_path):
    run = tmp_path / "run"  # nothing started from here
    r = cli("status", env=dict(env, EXTMIND_RUN_DIR=str(run)))
    assert r.stderr == f"extmind: no run dir {run}: the URLs above are the environment's or the defaults\n"
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["memory"][1:5] == [services["memory"].address, "-", "external", "SERVING"], r.stdout
    assert rows["generator"][1:5] == [services["generator"].address, "-", "external", "SERVING"], r.stdout
    assert rows["embedder"][3:5] == ["external", "UNREACHABLE"], r.stdout
    # Redis sits behind the external memory service: unknown from here, not "not running".
    assert rows["redis"][3:5] == ["unknown", "-"] and "not running" not in r.stdout, r.stdout
    assert r.returncode == 1  # the embedder is down

    r = cli("status", env=dict(env, EXTMIND_RUN_DIR=str(run), REDIS_URL=services["redis"].url))
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["redis"][3:5] == ["external", "PONG"], r.stdout

    # Only ports (e.g. docker compose published on this host): a service that answers but was not
    # started from this run dir is external too, and so its Redis is unknown.
    r = cli("status", env=clean_env(EXTMIND_RUN_DIR=str(run), MEMORY_PORT=str(services["memory"].port)))
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["memory"][1:5] == [str(services["memory"].port), "-", "external", "SERVING"], r.stdout
    assert rows["redis"][3:5] == ["unknown", "-"], r.stdout


def make(*args, **env):
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        env=clean_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_targets_take_EXTMIND_RUN_DIR(tmp_path):
    run = tmp_path / "my-run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "memory.log").write_text("a line only this run dir has\n")
    r = make("logs", EXTMIND_RUN_DIR=str(run))
    assert r.returncode == 0 and "a line only this run dir has" in r.stdout, r.stdout + r.stderr
    r = make("down", EXTMIND_RUN_DIR=str(run))
    assert r.returncode == 0 and f"nothing to stop (no pid files under {run}/pids)" in r.stdout, r.stdout + r.stderr
    # `make status` and `make up` pass the same run dir (dry run: they would install first).
    for target in ("status", "up"):
        r = make("-n", target, EXTMIND_RUN_DIR=str(run))
        assert f"-m extmind.cluster {target} --run-dir {run}" in r.stdout, r.stdout
    # RUN_DIR on the command line still wins.
    r = make("-n", "status", f"RUN_DIR={tmp_path}/other", EXTMIND_RUN_DIR=str(run))
    assert f"--run-dir {tmp_path}/other" in r.stdout, r.stdout
    # `up` ends by naming the command that stops the cluster, with the run dir when not the default.
    r = make("-n", "up", EXTMIND_RUN_DIR=str(run))
    assert f"'make down RUN_DIR={run}' stops it" in r.stdout, r.stdout
    r = make("-n", "up")
    assert "'make down' stops it" in r.stdout, r.stdout


def _clean_args(tmp_path, venv_python: str | None, **more) -> tuple[tuple, Path, Path, Path]:
    """`make clean` arguments pointing everything it deletes at ``tmp_path`` (checked by a dry
    run first: a recipe deleting anything else must not run here). ``venv_python``: the content
    of the venv's bin/python (a shell script), None for no venv at all."""
    run, venv, nm = tmp_path / "run", tmp_path / "venv", tmp_path / "node_modules"
    nm.mkdir()
    venv.mkdir()
    if venv_python is not None:
        (venv / "bin").mkdir()
        (venv / "bin" / "python").write_text(venv_python)
        (venv / "bin" / "python").chmod(0o755)
    args = ("clean", f"VENV={venv}", f"NODE_MODULES={nm}", f"RUN_DIR={run}", *(f"{k}={v}" for k, v in more.items()))
    dry = make("-n", *args).stdout.splitlines()
    # Any line that could delete: a leading rm, one inside an if or after &&, find -delete, git clean.
    deleting = [ln for ln in dry if re.search(r"\brm\b|-delete\b|\bgit\b.*\bclean\b|rmtree", ln)]
    assert deleting == [f"rm -rf {venv} {nm} {run}"], dry
    return args, run, venv, nm


def _recorded_sleeper(run: Path) -> subprocess.Popen:
    """A real process recorded in ``run`` as a service `up` started."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    s = Settings.from_env(str(run))
    s.pids.mkdir(parents=True)
    write_pid(s, PidRecord("sleeper", sleeper.pid, start_time(sleeper.pid), 0, ["sleep", "300"], {}))
    return sleeper


# A venv whose python is there but broken (e.g. its base interpreter was upgraded away).
BROKEN_PY = "#!/bin/sh\necho 'python: error while loading shared libraries' >&2\nexit 127\n"


@pytest.mark.parametrize(
    "venv_python",
    [f'#!/bin/sh\nexec {sys.executable} "$@"\n', BROKEN_PY, None],
    ids=["venv", "broken-venv", "no-venv"],
)
def test_make_clean_stops_the_cluster_before_deleting_its_run_dir(tmp_path, venv_python):
    """`make clean` deletes the run dir, where a running cluster's Redis and pid records live: what
    `up` started from it is stopped first (here a real process recorded as a service), also when
    the venv is broken or gone (then with $(PYTHON): `down` needs only the standard library)."""
    args, run, venv, nm = _clean_args(tmp_path, venv_python, PYTHON=sys.executable)
    sleeper = _recorded_sleeper(run)
    try:
        r = make(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sleeper" in r.stdout and f"(pid {sleeper.pid})" in r.stdout, r.stdout
        assert sleeper.wait(timeout=30) is not None  # stopped by `make clean`, not by this test
        assert not run.exists() and not venv.exists() and not nm.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_make_clean_keeps_the_run_dir_when_it_cannot_stop_the_cluster(tmp_path):
    """Deleting the pid records of services it could not stop would leave them (and their Redis)
    running with no `make down` to find them: clean fails, says so and keeps the run dir."""
    args, run, venv, nm = _clean_args(tmp_path, BROKEN_PY, PYTHON="false")
    sleeper = _recorded_sleeper(run)
    try:
        r = make(*args)
        assert r.returncode != 0, r.stdout + r.stderr
        assert f"could not stop the cluster of {run}" in r.stdout + r.stderr, r.stdout + r.stderr
        assert (run / "pids" / "sleeper.pid").exists() and sleeper.poll() is None
    finally:
        sleeper.kill()


def test_make_clean_without_a_run_dir_needs_no_python(tmp_path):
    args, run, venv, nm = _clean_args(tmp_path, None, PYTHON="false")
    r = make(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not venv.exists() and not nm.exists()


def test_cluster_down_needs_only_the_standard_library(tmp_path):
    """`make clean` falls back to the system Python (no grpc) when the venv is broken."""
    run = tmp_path / "run"
    sleeper = _recorded_sleeper(run)
    code = (
        "import sys\n"
        "for m in ('grpc', 'grpc_health', 'numpy', 'redis', 'mlx'):\n"
        "    sys.modules[m] = None  # importing them fails\n"
        "from extmind.cluster import main\n"
        f"sys.exit(main(['down', '--run-dir', {str(run)!r}]))\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"sleeper    stopped (pid {sleeper.pid})" in r.stdout, r.stdout
        assert sleeper.wait(timeout=30) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _pid(name: str, port: int, argv: list[str], extra: dict) -> PidRecord:
    """A pid record as `up` writes it (read back by write_record and addresses only)."""
    return PidRecord(name, 1, "?", port, [sys.executable, "-m", f"services.{name}", *argv], extra)


@pytest.fixture
def launcher_env(monkeypatch):
    for k in (*_SCRUB, "REDIS_URL", "MEMORY_DATA_DIR", "EMBEDDER_HTTP_PORT", "GENERATOR_HTTP_PORT", "MEMORY_HTTP_PORT"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_cluster_json_names_the_redis_and_data_dir_of_the_running_memory_service(tmp_path, launcher_env):
    """`up` again with another MEMORY_DATA_DIR or REDIS_URL keeps the running memory service on its
    own: cluster.json (what `status` and clients read) names those, not this environment's."""
    old = tmp_path / "old-data"
    launcher_env.setenv("MEMORY_DATA_DIR", str(tmp_path / "new-data"))
    launcher_env.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    s = Settings.from_env(str(tmp_path / "run"))
    s.run_dir.mkdir()
    embedded = _pid("memory", 5052, ["--port", "5052", "--data-dir", str(old), "--http-port", "-1"], {})
    write_record(s, {"memory": embedded})
    record = json.loads(s.record_file.read_text())
    assert (record["memory_data_dir"], record["redis_url"]) == (str(old), ""), record
    launcher_env.delenv("REDIS_URL")
    external = _pid("memory", 5052, ["--data-dir", str(old), "--redis-url", "redis://127.0.0.1:7/0"], {})
    write_record(s, {"memory": external})
    assert json.loads(s.record_file.read_text())["redis_url"] == "redis://127.0.0.1:7/0"
    write_record(s, {})  # no memory service recorded: the environment's
    assert json.loads(s.record_file.read_text())["memory_data_dir"] == str(tmp_path / "new-data")


def test_addresses_of_http_faces_off_or_on_a_picked_port(tmp_path, launcher_env):
    """-1 (off) and 0 (a port the service picks) are no URL: not "http://127.0.0.1:-1"."""
    s = Settings.from_env(str(tmp_path / "run"))
    recs = {
        "embedder": _pid("embedder", 1, [], {"http": -1}),
        "memory": _pid("memory", 2, [], {"http": 0, "redis": "embedded"}),
        "generator": _pid("generator", 3, [], {"http": 0}),
    }
    a = addresses(s, recs)
    assert (a["embedder_http_url"], a["generator_http_url"]) == ("", ""), a
    assert (a["embedder_http_port"], a["memory_http_port"], a["generator_http_port"]) == (-1, 0, 0), a
    recs["memory"] = _pid("memory", 2, [], {"redis": "embedded"})  # started with MEMORY_HTTP_PORT=-1
    assert addresses(s, recs)["memory_http_port"] == -1


def test_a_service_started_beside_running_ones_reaches_them_where_they_listen(tmp_path, launcher_env):
    """`up` with EMBEDDER_PORT/MEMORY_PORT changed restarts a stopped memory service or generator
    beside the running embedder/memory service: it must call them on their ports, not on the new
    ones (nothing listens there until a `make down`). An explicit *_URL still wins."""
    launcher_env.setenv("EMBEDDER_PORT", "6001")
    launcher_env.setenv("MEMORY_PORT", "6002")
    launcher_env.setenv("GENERATOR_MODEL", str(tmp_path / "model"))
    c = Cluster(Settings.from_env(str(tmp_path / "run")), out=lambda *a: None)
    running = {"embedder": _pid("embedder", 5001, [], {}), "memory": _pid("memory", 5002, [], {})}
    specs = service_specs(c._settings_for_new(running), lambda *a: None)
    assert _flag(specs["memory"].argv, "--embedder-url") == "127.0.0.1:5001", specs["memory"].argv
    assert _flag(specs["generator"].argv, "--memory-url") == "127.0.0.1:5002", specs["generator"].argv
    assert specs["memory"].port == 6002  # the service started now takes this environment's port
    launcher_env.setenv("EMBEDDER_URL", "emb.example:443")
    c = Cluster(Settings.from_env(str(tmp_path / "run")), out=lambda *a: None)
    specs = service_specs(c._settings_for_new(running), lambda *a: None, ["memory"])
    assert _flag(specs["memory"].argv, "--embedder-url") == "emb.example:443"


def test_down_stops_a_redis_left_in_the_memory_services_own_data_dir(tmp_path, launcher_env):
    """A memory service killed before it could stop its Redis (SIGKILL on macOS) leaves that Redis
    running: `down` finds it through the data dir the service was started with (its pid record),
    even when MEMORY_DATA_DIR changed since. A real redis-server; a real process as the service."""
    old = tmp_path / "old-data"
    redis = RedisProcess(old).start()
    service = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (old / "redis.pid").write_text(f"{redis.proc.pid}\n")
        launcher_env.setenv("MEMORY_DATA_DIR", str(tmp_path / "new-data"))
        s = Settings.from_env(str(tmp_path / "run"))
        s.pids.mkdir(parents=True)
        argv = [sys.executable, "-m", "services.memory", "--port", "5052", "--data-dir", str(old)]
        write_pid(s, PidRecord("memory", service.pid, start_time(service.pid), 5052, argv, {}))
        out = []
        Cluster(s, out=out.append).down()
        assert any(f"redis      stopped (pid {redis.proc.pid}" in ln for ln in out), out
        assert redis.proc.wait(timeout=30) is not None and service.wait(timeout=30) is not None
    finally:
        if service.poll() is None:
            service.kill()
        redis.close()


def _long_text(path: Path, sentences: int) -> Path:
    path.write_text(" ".join(f"Sentence {i} tells of the lighthouse keeper and the sea." for i in range(sentences)))
    return path


def test_memorize_outlasts_the_cli_timeout_while_progress_comes(env, tmp_path):
    # EXTMIND_CLI_TIMEOUT bounds each wait for progress, not the whole memorize: a long text on a
    # CPU takes many windows (minutes for a few pages with the default model).
    f = _long_text(tmp_path / "cli-long.txt", 250)  # ~9 000 tokens: a dozen 3 072-token windows
    t0 = time.monotonic()
    r = cli("memorize", str(f), "--quiet", env=dict(env, EXTMIND_CLI_TIMEOUT="1.5"))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout.startswith("cli-long: "), r.stderr
    assert elapsed > 1.5, elapsed  # longer than one timeout, so a deadline on the whole call would have failed it
    assert cli("memories", "delete", "cli-long", env=env).returncode == 0


def test_memorize_gives_up_when_the_generator_falls_silent(services, env, tmp_path):
    f = _long_text(tmp_path / "cli-silent.txt", 1000)  # minutes of work: still building when stopped
    p = subprocess.Popen(
        [sys.executable, "-m", "extmind.cli", "memorize", str(f), "--quiet"],
        env=dict(env, EXTMIND_CLI_TIMEOUT="2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gen = services["generator"].pid
    memory = memory_pb2_grpc.MemoryServiceStub(sync_channel(services["memory"].address))

    def exists() -> bool:
        try:
            memory.GetMemory(memory_pb2.GetMemoryRequest(memory_id="cli-silent"), timeout=10)
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            return False

    try:
        deadline = time.monotonic() + 60
        while not exists():  # building: stop the generator mid-way
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.02)
        os.kill(gen, signal.SIGSTOP)
        out, err = p.communicate(timeout=30)
    finally:
        os.kill(gen, signal.SIGCONT)
    assert p.returncode == 1 and out == "", (out, err)
    assert err.strip() == (
        "extmind: the generator sent no progress on cli-silent for 2s (EXTMIND_CLI_TIMEOUT), so the memorize "
        "was cancelled and the generator drops what it had built"
    )
    # ... and it does: the half-built memory goes once the generator runs again.
    deadline = time.monotonic() + 60
    while exists():
        assert time.monotonic() < deadline, "the cancelled memory stayed"
        time.sleep(0.2)


def test_counts_read_as_words():
    from extmind.cli_common import counted

    assert [counted(n, "memory row") for n in (0, 1, 2)] == ["0 memory rows", "1 memory row", "2 memory rows"]


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    # JSON strings may hold U+2028 / U+2029 / U+0085 as they are (json.dumps(ensure_ascii=False));
    # str.splitlines would cut such a line in two. A byte-order mark is not part of the first line.
    from extmind.cli_docs import _documents

    f = tmp_path / "d.jsonl"
    rows = [
        {"id": "a", "text": "p1\u2028p2\u0085p3"},
        {"id": 7, "text": "t", "metadata": {"k": "v"}},
        {"id": "n", "text": "t", "metadata": None},  # null: no metadata of its own
    ]
    f.write_text("\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\n")
    docs = _documents([f"@{f}"], {"all": "x"})
    assert [(d.id, d.text, dict(d.metadata)) for d in docs] == [
        ("a", "p1\u2028p2\u0085p3", {"all": "x"}),
        ("7", "t", {"all": "x", "k": "v"}),
        ("n", "t", {"all": "x"}),
    ]
