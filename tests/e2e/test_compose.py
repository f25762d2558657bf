"""docker-compose.yml validates offline (`docker-compose config`) and wires what the issue asks."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .cluster import REPO

COMPOSE = shutil.which("docker-compose")


@pytest.fixture(scope="module")
def config() -> dict:
    assert COMPOSE, "docker-compose is not installed (make install puts Debian's package in place)"
    r = subprocess.run(
        [COMPOSE, "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_config_passes_quietly():
    r = subprocess.run([COMPOSE, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_redis_has_aof_on_a_named_volume_and_is_not_published(config):
    redis = config["services"]["redis"]
    assert "ports" not in redis
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync always" in cmd
    assert any(str(v).startswith("redis-data:/data") for v in redis["volumes"]), redis["volumes"]
    assert "redis-data" in config["volumes"]


def test_services_use_grpc_health_checks_and_wait_for_healthy_dependencies(config):
    svcs = config["services"]
    ports = {"embedder": 50051, "memory": 50052, "generator": 50053}
    for name in ports:
        s = svcs[name]
        # the cheap probe: the server's health file is fresh (no Python process per check)
        assert s["healthcheck"]["test"][0] == "CMD-SHELL"
        assert "find /tmp/extmind-serving -newermt" in s["healthcheck"]["test"][1]
        assert s["command"] == [name] and s["image"] == "extmind:latest"
        assert any("/models" in str(v) for v in s["volumes"])  # the model cache volume
        env = s["environment"]
        assert "EMBEDDER_MODEL" in env and "GENERATOR_MODEL" in env
    assert svcs["memory"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "embedder": {"condition": "service_healthy"},
    }
    assert svcs["generator"]["depends_on"] == {"memory": {"condition": "service_healthy"}}
    assert svcs["memory"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert svcs["generator"]["environment"]["MEMORY_URL"] == "memory:50052"
    assert "model-cache" in config["volumes"]


def test_models_come_from_the_environment():
    r = subprocess.run(
        [COMPOSE, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "GENERATOR_MODEL": "/models/my-llama",
            "GENERATOR_PORT": "6000",
            "GENERATOR_HTTP_PORT": "6001",
        },
    )
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    gen = cfg["services"]["generator"]
    assert gen["environment"]["GENERATOR_MODEL"] == "/models/my-llama"
    assert any(str(p.get("published")) == "6000" and p["target"] == 50053 for p in gen["ports"])
    assert any(str(p.get("published")) == "6001" and p["target"] == 8001 for p in gen["ports"])


def test_dockerfile_entry_point_is_the_launcher():
    text = (REPO / "Dockerfile").read_text()
    assert "EXTMIND_HEALTH_FILE=/tmp/extmind-serving" in text
    assert 'ENTRYPOINT ["python", "-m", "extmind.cluster", "exec"]' in text
    assert "libopenblas0-pthread" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".run" in ignored and "node_modules" in ignored


def test_gpu_override_gives_the_mlx_services_a_gpu():
    r = subprocess.run(
        [COMPOSE, "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    for name in ("embedder", "generator"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert services[name]["image"] == "extmind:cuda"
        # MLX's kernel cache on the model-cache volume, the base file's environment kept
        env = services[name]["environment"]
        assert env["EXTMIND_MLX_KERNEL_CACHE"].startswith("/models/") and env["MEMORY_URL"] == "memory:50052"
        assert any(
            (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/models" for v in services[name]["volumes"]
        )
    assert services["embedder"]["build"]["args"]["MLX_BACKEND"] == "cuda13"
    assert "deploy" not in services["memory"] and services["memory"]["image"] == "extmind:cuda"
