"""python -m services.memory [--redis-url URL] [--embedder-url HOST:PORT] [--data-dir DIR] [--port N]"""

import os

from services.common.blas import scrub_preload

# Before faiss loads OpenMP: idle OpenMP threads must not spin on the few cores (docs/platform.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# No MLX here: an inherited OpenBLAS preload must not reach the embedded redis-server.
scrub_preload()

from services.common.server import main  # noqa: E402
from services.memory.app import MemoryApp, parse_args  # noqa: E402

if __name__ == "__main__":
    main(MemoryApp, parse_args)
