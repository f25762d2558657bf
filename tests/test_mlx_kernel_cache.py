"""services/common/mlx_kernel_cache.py: MLX CUDA's kernel folder per service, MLX build and GPU kind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from services.common import mlx_kernel_cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(mlx_kernel_cache.ENV, raising=False)
    monkeypatch.delenv(mlx_kernel_cache.MLX_ENV, raising=False)
    return monkeypatch


def test_the_folder_names_the_service_the_mlx_build_and_the_gpu_kind():
    folder = mlx_kernel_cache.kernel_folder("/models/mlx-kernels", "generator", "0.32.4", "cuda13", (9, 0))
    assert folder == Path("/models/mlx-kernels/generator/mlx-0.32.4-cuda13-sm90")
    others = {
        mlx_kernel_cache.kernel_folder("/b", s, v, b, c)
        for s, v, b, c in [
            ("generator", "0.32.4", "cuda13", (9, 0)),
            ("embedder", "0.32.4", "cuda13", (9, 0)),
            ("generator", "0.32.5", "cuda13", (9, 0)),
            ("generator", "0.32.4", "cuda12", (9, 0)),
            ("generator", "0.32.4", "cuda13", (8, 0)),
        ]
    }
    assert len(others) == 5  # any change of service, version, build or GPU: another folder


def test_nothing_is_set_without_the_variable_or_when_mlx_is_given_a_folder(env, tmp_path):
    assert mlx_kernel_cache.configure("generator") is None
    assert mlx_kernel_cache.MLX_ENV not in os.environ
    env.setenv(mlx_kernel_cache.ENV, str(tmp_path))
    env.setenv(mlx_kernel_cache.MLX_ENV, "/somewhere/else")
    assert mlx_kernel_cache.configure("generator") is None
    assert os.environ[mlx_kernel_cache.MLX_ENV] == "/somewhere/else"


@pytest.mark.skipif(mx.cuda.is_available(), reason="checks the build without CUDA")
def test_off_cuda_nothing_is_set(env, tmp_path):
    env.setenv(mlx_kernel_cache.ENV, str(tmp_path))
    assert mlx_kernel_cache.configure("generator") is None
    assert mlx_kernel_cache.MLX_ENV not in os.environ


@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX's kernel cache is its CUDA backend's")
def test_on_cuda_mlx_writes_its_kernels_into_the_services_folder(tmp_path):
    # A fresh process: MLX reads the variable once, at its first compile.
    code = (
        "from services.common import mlx_kernel_cache as c; import mlx.core as mx; "
        "f = c.configure('generator'); x = mx.arange(1000, dtype=mx.float32); "
        "mx.eval(mx.compile(lambda a: mx.exp(a) * 3 + a)(x)); print(f)"
    )
    env = {**os.environ, mlx_kernel_cache.ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop(mlx_kernel_cache.MLX_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert folder.parent == tmp_path / "generator" and folder.name.startswith(f"mlx-{mx.__version__}-cuda")
    assert any(folder.glob("*.ptx")), sorted(p.name for p in tmp_path.rglob("*"))


def test_a_local_cluster_keeps_the_kernels_in_its_run_dir_unless_told_otherwise(env, tmp_path):
    from extmind.cluster_config import child_env

    assert child_env(tmp_path)[mlx_kernel_cache.ENV] == str(tmp_path / "mlx-kernels")
    env.setenv(mlx_kernel_cache.ENV, "/models/mlx-kernels")  # compose's, or the user's
    assert child_env(tmp_path)[mlx_kernel_cache.ENV] == "/models/mlx-kernels"
    env.setenv(mlx_kernel_cache.ENV, "")  # set empty: MLX's own folder
    assert child_env(tmp_path)[mlx_kernel_cache.ENV] == ""
    env.delenv(mlx_kernel_cache.ENV)  # `exec` (a container's entry point): nothing under its run dir
    assert mlx_kernel_cache.ENV not in child_env()
