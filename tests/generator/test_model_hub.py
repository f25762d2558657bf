"""A generator model given as a Hugging Face hub id: fetched from the hub into the cache when not
there (mlx-lm's own lookup reads the cache only), from the cache alone with HF_HUB_OFFLINE=1, and
a clear error naming each attempt when neither has it. The hub is a local HTTP server speaking the
hub's wire format (the endpoints huggingface_hub's snapshot_download calls), serving a tiny
checkpoint built by the test."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from extmind import errors
from extmind.tiny_models import build_llama
from services.generator.engine import EngineConfig, GeneratorEngine

REPO = "extmind-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves the files of ``model_dir`` as repo REPO at commit COMMIT; records the paths asked."""

    def __init__(self, model_dir: Path):
        self.files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}
        self.asked: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, body: bytes | None):
                hub.asked.append(f"{self.command} {self.path}")
                info = f"/api/models/{REPO}/revision/"
                tree = f"/api/models/{REPO}/tree/"
                resolve = f"/{REPO}/resolve/"
                if self.path.startswith(tree):  # the repo's files, one page
                    data = json.dumps(
                        [
                            {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in hub.files.items()
                        ]
                    ).encode()
                    headers = {"Content-Type": "application/json"}
                elif self.path.startswith(info):
                    data = json.dumps(
                        {"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.files]}
                    ).encode()
                    headers = {"Content-Type": "application/json"}
                elif self.path.startswith(resolve) and self.path.split("/")[-1].split("?")[0] in hub.files:
                    data = hub.files[self.path.split("/")[-1].split("?")[0]]
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                else:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body is None:
                    self.wfile.write(data)

            def do_GET(self):
                self._answer(None)

            def do_HEAD(self):
                self._answer(b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    model = build_llama(tmp_path / "tiny", hidden=32, layers=1, heads=2, kv_heads=1, seed=0)
    server = FakeHub(model)
    # huggingface_hub reads these at import into its constants: set both.
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hc, "ENDPOINT", server.url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server.cache = cache
    yield server
    server.close()


def _start(model: str) -> GeneratorEngine:
    engine = GeneratorEngine(EngineConfig(model=model))
    engine.start()
    return engine


def _error(model: str) -> str:
    engine = GeneratorEngine(EngineConfig(model=model))
    with pytest.raises(errors.NotFound) as got:
        engine.start()
    return got.value.message


def test_a_hub_id_not_in_the_cache_is_downloaded_then_served_and_then_found_offline(hub, monkeypatch):
    engine = _start(REPO)
    try:
        path = engine.model_path
        assert path.name == COMMIT and path.is_relative_to(hub.cache), path
        for name, data in hub.files.items():
            assert (path / name).read_bytes() == data  # the checkpoint as served, bit for bit
        assert any(a.startswith(f"GET /{REPO}/resolve/{COMMIT}/model.safetensors") for a in hub.asked), hub.asked
    finally:
        engine.stop()
    hub.asked.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = _start(REPO)
    try:
        assert engine.model_path == path and hub.asked == []  # from the cache, the hub not asked
    finally:
        engine.stop()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_a_hub_id_not_in_the_cache_says_downloads_are_off(hub, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    message = _error(REPO)
    assert f"hub {REPO} (local cache: not in the cache); (downloads are off: HF_HUB_OFFLINE" in message, message
    assert hub.asked == []


def test_a_hub_id_the_hub_does_not_have_names_each_attempt(hub):
    message = _error("extmind-test/no-such-model")
    assert message.startswith("generator model 'extmind-test/no-such-model': no local directory at "), message
    assert "hub extmind-test/no-such-model (local cache: not in the cache); " in message, message
    assert "hub extmind-test/no-such-model (download: the hub answered 404 (RepositoryNotFoundError: 404 " in message
    assert "\n" not in message, message
    assert message.endswith("or a hub id (downloaded into the Hugging Face cache unless HF_HUB_OFFLINE=1)"), message


def test_a_hub_that_cannot_be_reached_says_so(hub):
    hub.close()  # the endpoint now refuses connections, as a machine without network
    message = _error(REPO)
    assert (
        f"hub {REPO} (local cache: not in the cache); hub {REPO} (download: the hub could not be reached (" in message
    )


def test_a_hub_that_accepts_and_never_answers_times_out(hub, monkeypatch):
    import socket

    from services.common import hub as hub_ids

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read or answered
    import huggingface_hub.constants as hc

    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_ids, "TIMEOUT_S", 0.5)
    try:
        message = _error(REPO)
    finally:
        silent.close()
    assert f"hub {REPO} (download: the hub did not answer within 0.5 s (" in message, message


@pytest.mark.parametrize("model", ["./no-such-dir", "~/no-such-dir", "a/b/c", "org/..", " "])
def test_a_path_that_is_not_there_is_not_asked_of_the_hub(hub, model):
    message = _error(model)
    assert "no directory at" in message and "or a hub id (org/name)" in message, message
    assert hub.asked == []
