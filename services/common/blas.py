"""Gives MLX on Linux a fast BLAS.

The mlx-cpu wheel bundles the reference Netlib BLAS (~6 GFLOP/s on a 2048² matmul); Debian's
OpenBLAS preloaded runs ~30× faster. LD_PRELOAD must be set before the process starts, so
``ensure_openblas()`` re-executes the process once with it when the library is present.
Set EXTMIND_OPENBLAS=0 to keep the bundled BLAS. MLX's CUDA build does its matmuls on the GPU:
with it nothing is preloaded (docs/platform.md).
"""

from __future__ import annotations

import glob
import os
import sys

_CANDIDATES = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3", "/usr/lib64/openblas-pthread/libblas.so.3")


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def mlx_build() -> str:
    """Which MLX build is installed, from the package metadata (without importing MLX, which must
    load after the preload): 'cuda13', 'cuda12', 'cpu' or 'metal' (macOS; also when unknown)."""
    from importlib import metadata

    for dist, name in (("mlx-cuda-13", "cuda13"), ("mlx-cuda-12", "cuda12"), ("mlx-cpu", "cpu")):
        try:
            metadata.version(dist)
            return name
        except metadata.PackageNotFoundError:
            continue
    return "metal"


def scrub_preload() -> None:
    """Removes OpenBLAS from this process's LD_PRELOAD once it is loaded, so that the programs it
    starts (redis-server, node, ...) do not get it: preloaded into them it only costs threads and
    can abort them."""
    kept = [x for x in os.environ.get("LD_PRELOAD", "").split(":") if x and "openblas" not in x]
    if kept:
        os.environ["LD_PRELOAD"] = ":".join(kept)
    else:
        os.environ.pop("LD_PRELOAD", None)
    os.environ.pop("_EXTMIND_BLAS_REEXEC", None)


_settled = False  # ensure_openblas ran in this process (its environment no longer says so)


def ensure_openblas() -> None:
    """Re-exec this process with OpenBLAS preloaded (Linux only, once, when available). Later
    calls in the same process (a module importing another that calls it too) do nothing."""
    global _settled
    if _settled or not sys.platform.startswith("linux") or os.environ.get("EXTMIND_OPENBLAS", "1") == "0":
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or os.environ.get("_EXTMIND_BLAS_REEXEC"):
        scrub_preload()  # loaded (or tried once): children need not inherit it
        _settled = True
        return
    if mlx_build().startswith("cuda"):
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ, _EXTMIND_BLAS_REEXEC="1")
    env["LD_PRELOAD"] = ":".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x)
    os.execve(sys.executable, sys.orig_argv, env)


def blas_in_use() -> str:
    """Which BLAS this process has mapped: 'openblas (path)' or the reference one."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "platform default (Accelerate on macOS)"
    for line in maps.splitlines():
        if "openblas" in line and "libblas" in line:
            return f"openblas ({line.split()[-1]})"
    if mlx_build().startswith("cuda"):
        return f"bundled with mlx (MLX {mlx_build()} build: matmuls run on the GPU)"
    return "reference BLAS bundled with mlx (slow; install libopenblas0-pthread)"
