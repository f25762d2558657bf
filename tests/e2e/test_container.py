"""Container smoke test: the image builds and the compose stack comes up healthy and serves.

Runs only where a Docker engine answers (`docker info`); elsewhere it is skipped and says so.
Offline or behind a proxy, point it at what the machine has:
  EXTMIND_DOCKER_BASE_IMAGE   base image for the build (default: the Dockerfile's python:3.11-slim)
  EXTMIND_DOCKER_PIP_CERT     a CA bundle on this machine for pip inside the build
  REDIS_IMAGE                 the Redis image compose runs (default redis:7.2-bookworm)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest

from extmind.channels import sync_channel
from extmind.cluster_config import FACTS_MODEL
from extmind.healthcheck import check
from extmind.procs import free_ports
from extmind.v1 import embedder_pb2, embedder_pb2_grpc, generator_pb2, generator_pb2_grpc

from .cluster import REPO

DOCKER = shutil.which("docker")
COMPOSE = shutil.which("docker-compose")


def _engine_answers() -> bool:
    if not DOCKER:
        return False
    return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (COMPOSE and _engine_answers()),
        reason="no Docker engine answers `docker info` (or no docker-compose): container smoke test not run",
    ),
]


def _run(*args, timeout=1800, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tag = f"extmind:smoke-{uuid.uuid4().hex[:8]}"
    args = [DOCKER, "build", "-t", tag]
    if os.environ.get("EXTMIND_DOCKER_BASE_IMAGE"):
        args += ["--build-arg", f"BASE_IMAGE={os.environ['EXTMIND_DOCKER_BASE_IMAGE']}"]
    cert = os.environ.get("EXTMIND_DOCKER_PIP_CERT")
    context = REPO
    if cert:  # a copy of the context with the CA bundle under certs/ (never written into the repo)
        context = tmp_path_factory.mktemp("ctx") / "ctx"
        shutil.copytree(
            REPO,
            context,
            ignore=shutil.ignore_patterns(".git", ".venv", "node_modules", ".run", "__pycache__", ".gpu*"),
        )
        shutil.copy(cert, context / "certs" / "ca.pem")
        args += ["--build-arg", "PIP_CERT=/app/certs/ca.pem"]
    _run(*args, str(context))
    size = json.loads(_run(DOCKER, "image", "inspect", tag).stdout)[0]["Size"]
    yield tag, size
    subprocess.run([DOCKER, "image", "rm", "-f", tag], capture_output=True)


def test_image_is_small_and_has_no_torch(image):
    tag, size = image
    assert size < 1.5e9, f"the image is {size / 1e9:.2f} GB (goal: at most 1.5 GB)"
    r = subprocess.run(
        [DOCKER, "run", "--rm", "--entrypoint", "python", tag, "-c", "import torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_compose_stack_comes_up_healthy_and_embeds(image, tmp_path):
    tag, _ = image
    project = f"extmindsmoke{uuid.uuid4().hex[:6]}"
    ep, hp, mp, mhp, gp, ghp = free_ports(6)
    env = dict(
        os.environ,
        EMBEDDER_PORT=str(ep),
        EMBEDDER_HTTP_PORT=str(hp),
        MEMORY_PORT=str(mp),
        MEMORY_HTTP_PORT=str(mhp),
        GENERATOR_PORT=str(gp),
        GENERATOR_HTTP_PORT=str(ghp),
    )
    # The stack runs the image built above, under the name compose expects.
    _run(DOCKER, "tag", tag, "extmind:latest")
    compose = [COMPOSE, "-p", project, "-f", str(REPO / "docker-compose.yml")]
    try:
        _run(*compose, "up", "-d", "--no-build", env=env, cwd=REPO, timeout=600)
        deadline = time.monotonic() + 900
        targets = {name: f"127.0.0.1:{port}" for name, port in (("embedder", ep), ("memory", mp), ("generator", gp))}
        status = {}
        while time.monotonic() < deadline:
            status = {name: check(t) for name, t in targets.items()}
            if all(s == "SERVING" for s in status.values()):
                break
            time.sleep(3)
        logs = subprocess.run([*compose, "logs", "--tail", "30"], capture_output=True, text=True, env=env, cwd=REPO)
        assert all(s == "SERVING" for s in status.values()), f"{status}\n{logs.stdout[-4000:]}"
        with sync_channel(targets["embedder"]) as ch:
            r = embedder_pb2_grpc.EmbedderServiceStub(ch).Embed(
                embedder_pb2.EmbedRequest(inputs=["a container smoke test"]), timeout=120
            )
        v = np.frombuffer(r.embeddings.data, "<f4")
        assert r.dimensions == 384 and abs(np.linalg.norm(v) - 1) < 1e-3
        with sync_channel(targets["generator"]) as ch:  # the image serves the committed facts model
            info = generator_pb2_grpc.GeneratorServiceStub(ch).GetInfo(
                generator_pb2.GeneratorServiceGetInfoRequest(), timeout=60
            )
        cfg = json.loads((FACTS_MODEL / "config.json").read_text())
        assert (info.num_layers, info.head_dim) == (cfg["num_hidden_layers"], 32)
    finally:
        subprocess.run([*compose, "down", "-v"], capture_output=True, env=env, cwd=REPO, timeout=300)
