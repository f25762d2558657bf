"""Where MLX's CUDA backend keeps the kernels it compiles (``MLX_PTX_CACHE_DIR``), per service and build.

MLX CUDA writes the kernels it compiles for its own ops to a folder and reads them back in later
processes (docs/platform.md, "CUDA notes"); by default ``/tmp/mlx/<mlx version>/ptx``. It finds a
file by the kernel's name alone, so a folder must not outlive the MLX build and the GPU kind that
filled it, and two processes compiling the same kernel at once write the same file.
``EXTMIND_MLX_KERNEL_CACHE`` names a folder that outlives containers (docker-compose.gpu.yml puts
it on the model-cache volume); each service then keeps its kernels in a folder of its own under it,
named after the MLX version, its CUDA build and the GPU's compute capability
(``kernel_folder``): a new image or another GPU starts an empty one. ``MLX_PTX_CACHE_DIR`` set in
the environment wins; off CUDA (Metal, the CPU build) nothing is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.common.blas import mlx_build

ENV = "EXTMIND_MLX_KERNEL_CACHE"  # (read by name below, as tests/test_envvars.py scans for)
MLX_ENV = "MLX_PTX_CACHE_DIR"


def kernel_folder(base: str | Path, service: str, mlx_version: str, backend: str, capability: tuple[int, int]) -> Path:
    """``base/service/mlx-<version>-<backend>-sm<major><minor>``, e.g.
    ``/models/mlx-kernels/generator/mlx-0.32.4-cuda13-sm90``."""
    major, minor = capability
    return Path(base) / service / f"mlx-{mlx_version}-{backend}-sm{major}{minor}"


def configure(service: str) -> Path | None:
    """Points MLX's kernel cache at ``kernel_folder`` under ``EXTMIND_MLX_KERNEL_CACHE`` when that
    is set, ``MLX_PTX_CACHE_DIR`` is not, and MLX computes on CUDA. Call it before MLX compiles a
    kernel (MLX reads the variable once, at its first compile). -> the folder set, or None."""
    base = os.environ.get("EXTMIND_MLX_KERNEL_CACHE", "").strip()
    if not base or os.environ.get("MLX_PTX_CACHE_DIR") is not None:  # set, even empty (MLX's cache off): it wins
        return None
    import mlx.core as mx

    build = mlx_build()
    if not build.startswith("cuda") or not mx.cuda.is_available():
        return None
    info = mx.device_info()
    capability = (int(info.get("compute_capability_major", 0)), int(info.get("compute_capability_minor", 0)))
    folder = kernel_folder(base, service, mx.__version__, build, capability)
    os.environ["MLX_PTX_CACHE_DIR"] = str(folder)
    return folder
