"""python -m services.generator --model <path or hub id> --memory-url HOST:PORT [--port N]"""

from services.common.blas import ensure_openblas

ensure_openblas()  # before MLX loads: re-execs once with OpenBLAS preloaded on Linux

from services.common import mlx_kernel_cache  # noqa: E402

mlx_kernel_cache.configure("generator")  # before MLX compiles a kernel

from services.common.server import main  # noqa: E402
from services.generator.app import GeneratorApp, parse_args  # noqa: E402

if __name__ == "__main__":
    main(GeneratorApp, parse_args)
