"""python -m services.memory [--redis-url URL] [--embedder-url HOST:PORT] [--data-dir DIR] [--port N]"""

import os

from services.common.blas import scrub_preload

# Before faiss loads OpenMP: idle OpenMP threads must not spin on the 2 cores (docs/platform.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# No MLX here: an inherited OpenBLAS preload must not reach the embedded redis-server.
scrub_preload()

from services.memory.app import main  # noqa: E402

main()
