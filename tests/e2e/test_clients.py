"""Clients of the running cluster: the `extmind` CLI and a Node.js client of the contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extmind.channels import sync_channel
from extmind.procs import free_ports
from extmind.v1 import embedder_pb2, embedder_pb2_grpc

from .cluster import REPO, cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def reference_embeddings(cluster, texts):
    with sync_channel(cluster.url("embedder")) as ch:
        r = embedder_pb2_grpc.EmbedderServiceStub(ch).Embed(embedder_pb2.EmbedRequest(inputs=texts), timeout=60)
    return np.frombuffer(r.embeddings.data, "<f4").reshape(tuple(r.embeddings.shape)), r


# ------------------------------------------------------------------ Node.js


def test_node_client_calls_embed_and_generate(cluster):
    texts = ["hello from node", "a completely different sentence about volcanoes"]
    r = subprocess.run(
        ["node", str(REPO / "tests/e2e/node_client.js"), *texts],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    vecs = np.array(out["embed"]["vectors"], dtype=np.float32)
    ref, reply = reference_embeddings(cluster, texts)
    # Node decoded the raw little-endian bytes to exactly the vectors Python decodes.
    assert out["embed"]["shape"] == [len(texts), reply.dimensions]
    assert out["embed"]["model"] == reply.model
    np.testing.assert_array_equal(vecs, ref)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    g = out["generate"]
    assert len(g["token_ids"]) == g["usage"]["completion_tokens"] > 0
    assert g["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")


def test_node_client_error_is_one_line(cluster, tmp_path):
    (dead,) = free_ports(1)
    env = dict(cluster.env, EMBEDDER_URL=f"127.0.0.1:{dead}")
    r = subprocess.run(
        ["node", str(REPO / "tests/e2e/node_client.js")], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and r.stderr.startswith("node client: UNAVAILABLE")


# ------------------------------------------------------------------ the CLI


def test_cli_embed_matches_the_service(cluster):
    r = cli(cluster, "embed", "first text", "second text", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref, reply = reference_embeddings(cluster, ["first text", "second text"])
    np.testing.assert_allclose(np.array(out["embeddings"], dtype=np.float32), ref, rtol=0, atol=1e-6)
    assert out["model"] == reply.model and out["dimensions"] == reply.dimensions
    human = cli(cluster, "embed", "first text", "second text")
    assert human.returncode == 0 and "cosine similarity" in human.stdout and reply.model in human.stdout


def test_cli_documents_upsert_search_delete(cluster, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        '{"id": "cats", "text": "Cats purr and chase mice.", "metadata": {"kind": "animal"}}\n'
        '{"id": "trains", "text": "Steam trains run on coal and iron rails.", "metadata": {"kind": "machine"}}\n'
    )
    r = cli(cluster, "docs", "upsert", "cli-docs", f"@{jsonl}", "boats=Sailing boats move with the wind.")
    assert r.returncode == 0, r.stderr
    assert "upserted 3 documents" in r.stdout
    r = cli(cluster, "docs", "search", "cli-docs", "a locomotive on the railway", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0].split()
    assert first[1] == "trains", r.stdout
    r = cli(cluster, "docs", "search", "cli-docs", "a locomotive", "--filter", "kind=animal")
    assert [line.split()[1] for line in r.stdout.splitlines()] == ["cats"], r.stdout
    r = cli(cluster, "docs", "delete", "cli-docs", "cats", "boats")
    assert r.returncode == 0 and "deleted 2 documents from cli-docs\n" == r.stdout, r.stdout + r.stderr
    r = cli(cluster, "docs", "delete", "cli-docs", "trains", "cats", "nosuch")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "deleted 1 document from cli-docs (2 of the 3 ids were not there)\n", r.stdout


def test_cli_memorize_list_show_generate_delete(cluster, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("The observatory on the hill opened in 1931.\n\nIts telescope has a mirror of two metres.\n")
    r = cli(cluster, "memorize", str(f), "--id", "cli-notes", "--label", "kind=test")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cli-notes: ") and "tokens" in r.stdout
    assert "100.0%" in r.stderr  # the progress bar finished
    r = cli(cluster, "memorize", str(f), "--id", "cli-split", "--split-chars", "50", "--quiet")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["cli-split.000", "cli-split.001"]

    r = cli(cluster, "memories", "list")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert listed.get("cli-notes") == "READY" and "cli-split.001" in listed
    r = cli(cluster, "memories", "show", "cli-notes", "--tokens")
    assert r.returncode == 0 and "kind=test" in r.stdout and "READY" in r.stdout

    r = cli(
        cluster,
        "generate",
        "When did the observatory open?",
        "--memory",
        "cli-notes",
        "--citations",
        "--max-tokens",
        "6",
    )
    assert r.returncode == 0, r.stderr
    assert "[6 tokens" in r.stderr or "tokens, stop" in r.stderr, r.stderr
    assert "cited cli-notes[" in r.stderr
    # 0 counts every top-k pick, so there are spans to cite; --max-citations caps them at one.
    r = cli(
        cluster,
        "generate",
        "When did the observatory open?",
        *("--memory", "cli-notes", "--citations", "--max-tokens", "6"),
        *("--citation-min-weight", "0", "--max-citations", "1"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("cited cli-notes[") == 1, r.stderr

    r = cli(cluster, "memories", "delete", "cli-notes")
    assert r.returncode == 0 and r.stdout == "deleted cli-notes\n", r.stdout + r.stderr
    # several ids, in order, stopping at one that is gone
    r = cli(cluster, "memories", "delete", "cli-split.000", "cli-split.001", "cli-notes")
    assert r.returncode == 1 and r.stdout == "deleted cli-split.000\ndeleted cli-split.001\n", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("extmind: NOT_FOUND"), r.stderr
    r = cli(cluster, "memories", "show", "cli-notes")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("extmind: NOT_FOUND"), r.stderr


def test_cli_errors_are_one_readable_line(cluster, tmp_path):
    (dead,) = free_ports(1)
    env = dict(cluster.env, GENERATOR_URL=f"127.0.0.1:{dead}")
    cases = [
        (["generate", "hello"], env, 1, "extmind: UNAVAILABLE"),
        (["memorize", str(tmp_path / "missing.txt")], None, 1, "extmind: cannot read"),
        (["embed", "text", "--dimensions", "100000"], None, 1, "extmind: INVALID_ARGUMENT"),
        # a wrong command line: exit 2
        (["docs", "upsert", "c", "no-equals-sign"], None, 2, "extmind docs upsert: argument items: document"),
        # no reranker is served offline (EMBEDDER_RERANKER unset): the service says so
        (["rerank", "which?", "doc a", "doc b"], None, 1, "extmind: NOT_FOUND"),
    ]
    for args, e, code, prefix in cases:
        r = cli(cluster, *args, env=e)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert r.stderr.startswith(prefix) and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_status_table(cluster):
    # Through the installed console script (pyproject's [project.scripts]), as a person runs it.
    script = Path(sys.executable).parent / "extmind"
    r = subprocess.run(
        [str(script), "status", "--run-dir", str(cluster.run_dir)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    s = cluster.settings()
    for name, port in (("embedder", s.embedder_port), ("memory", s.memory_port), ("generator", s.generator_port)):
        assert rows[name][1] == str(port) and rows[name][3] == "running" and rows[name][4] == "SERVING"
    assert rows["redis"][3] == "running" and rows["redis"][4] == "PONG"  # the memory service's own Redis


# ------------------------------------------------------------------ the Python embedder client


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_python_embedder_client_with_mlx_service_url(cluster, monkeypatch, scheme):
    from extmind.embedder_client import EmbedderClient

    s = cluster.settings()
    url = f"grpc://{s.embedder_url}" if scheme == "grpc" else f"http://127.0.0.1:{s.embedder_http_port}"
    monkeypatch.setenv("MLX_SERVICE_URL", url)
    texts = ["The harbour freezes in January.", "Quantum computers use qubits."]
    ref, reply = reference_embeddings(cluster, texts)
    with EmbedderClient() as client:  # the whole fallback chain, as a user gets it: remote comes first
        r = client.embed(texts)
        assert r.backend == f"remote-{scheme}"
        assert (r.model, r.dimensions) == (reply.model, reply.dimensions)
        np.testing.assert_allclose(r.vectors, ref, rtol=0, atol=1e-5)
        q = client.embed(["When is the harbour frozen?"], input_type="query")
        assert q.backend == f"remote-{scheme}"
        sims = q.vectors @ r.vectors.T
        assert sims[0, 0] > sims[0, 1]
