"""scripts/mlx-backend.sh picks the MLX build `make install` and the Dockerfile install: its
decisions for each OS / NVIDIA driver / override, with `uname` and `nvidia-smi` faked on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mlx-backend.sh"
VERSION = re.search(r"^mlx==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run(tmp_path, *, os_name="Linux", driver=None, smi_fails=False, override=None, args=()):
    """Runs the script with a fake `uname -s` and, when driver or smi_fails is given, a fake
    `nvidia-smi`; PATH holds only the fakes and the tools the script needs."""
    bin_dir = tmp_path / "bin"
    shutil.rmtree(bin_dir, ignore_errors=True)
    bin_dir.mkdir()
    _fake(bin_dir, "uname", f"echo {os_name}")
    if smi_fails:
        _fake(bin_dir, "nvidia-smi", 'echo "NVIDIA-SMI has failed because it could not communicate" >&2; exit 9')
    elif driver is not None:
        _fake(
            bin_dir,
            "nvidia-smi",
            f'[ "$1 $2" = "--query-gpu=driver_version --format=csv,noheader" ] || exit 3\necho {driver}\necho {driver}',
        )
    for tool in ("sed", "head", "tr", "dirname"):  # the real ones, beside the fakes
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = {"PATH": str(bin_dir)}
    if override is not None:
        env["EXTMIND_MLX_BACKEND"] = override
    return subprocess.run(["/bin/bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "case, expected",
    [
        ({"driver": "580.82.07"}, "cuda13"),
        ({"driver": "590.1"}, "cuda13"),
        ({"driver": "575.57.08"}, "cuda12"),
        ({"driver": "550.54.14"}, "cuda12"),
        ({"driver": "535.247.01"}, "cpu"),  # too old for either CUDA build
        ({"driver": "470.256.02"}, "cpu"),
        ({"smi_fails": True}, "cpu"),  # nvidia-smi installed, no driver loaded
        ({}, "cpu"),  # no nvidia-smi
        ({"os_name": "Darwin"}, "metal"),
        ({"os_name": "Darwin", "override": "cpu"}, "metal"),  # one macOS wheel: Metal and CPU
        ({"driver": "580.82.07", "override": "cpu"}, "cpu"),
        ({"driver": "580.82.07", "override": "cuda12"}, "cuda12"),
        ({"override": "cuda13"}, "cuda13"),  # e.g. building an image on a machine without a GPU
        ({"driver": "470.1", "override": "cuda12"}, "cuda12"),
        ({"driver": "580.82.07", "override": ""}, "cuda13"),  # empty = detect
    ],
)
def test_decision(tmp_path, case, expected):
    name = run(tmp_path, **case, args=("--name",))
    assert name.returncode == 0, name.stderr
    assert name.stdout == f"{expected}\n" and name.stderr == ""
    req = run(tmp_path, **case)
    assert req.returncode == 0, req.stderr
    want = f"mlx=={VERSION}" if expected == "metal" else f"mlx[{expected}]=={VERSION}"
    assert req.stdout == want + "\n"


def test_old_driver_says_why_it_falls_back_to_cpu(tmp_path):
    r = run(tmp_path, driver="470.256.02")
    assert r.stdout == f"mlx[cpu]=={VERSION}\n"
    assert r.stderr == (
        "mlx-backend: NVIDIA driver 470.256.02 is older than 550 (MLX's CUDA 12 build): using the CPU build\n"
    )


@pytest.mark.parametrize("bad", ["gpu", "cuda", "CPU", "cuda11"])
def test_invalid_override_fails_in_one_line_naming_the_valid_values(tmp_path, bad):
    r = run(tmp_path, driver="580.82.07", override=bad)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert f"'{bad}'" in r.stderr and "cpu, cuda12, cuda13" in r.stderr


def test_cuda_override_on_macos_fails_in_one_line(tmp_path):
    r = run(tmp_path, os_name="Darwin", override="cuda13")
    assert r.returncode != 0 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "Linux-only" in r.stderr


def test_version_is_pinned_once():
    """requirements.txt names mlx once, without an extra: the extra comes from the script."""
    mlx_lines = [
        line
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if re.match(r"mlx\b(?!-)", line.split("#", 1)[0].strip())
    ]
    assert mlx_lines == [f"mlx=={VERSION}"]
    assert "scripts/mlx-backend.sh" in (REPO / "Makefile").read_text()
    assert "scripts/mlx-backend.sh" in (REPO / "Dockerfile").read_text()


def test_image_builds_the_cpu_backend_unless_told():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG MLX_BACKEND=cpu$", text, re.M)
    assert 'EXTMIND_MLX_BACKEND="$MLX_BACKEND" scripts/mlx-backend.sh' in text
