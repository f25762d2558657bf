"""python -m services.embedder --model <alias or path> [--model ...] [--reranker ...] [--port N] [--http-port N]"""

from services.common.blas import ensure_openblas

ensure_openblas()  # before MLX loads: re-execs once with OpenBLAS preloaded on Linux

from services.common import mlx_kernel_cache  # noqa: E402

mlx_kernel_cache.configure("embedder")  # before MLX compiles a kernel

from services.common.server import main  # noqa: E402
from services.embedder.app import EmbedderApp, parse_args  # noqa: E402

if __name__ == "__main__":
    main(EmbedderApp, parse_args)
