"""``ensure_openblas`` re-executes a process at most once, however often it is called."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_call_in_the_same_process_does_not_re_execute():
    # The first call re-executes with OpenBLAS preloaded (where installed) and then scrubs the
    # variables that said so; a second call (one bench module importing another) used to read the
    # scrubbed environment as "not loaded yet" and re-execute forever.
    code = "from services.common.blas import ensure_openblas\nensure_openblas()\nensure_openblas()\nprint('ran')"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_EXTMIND_BLAS_REEXEC", "EXTMIND_OPENBLAS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ran"]
