"""Keeps glibc from mapping and unmapping every large message buffer anew.

glibc serves allocations above its mmap threshold (128 KiB at start, raised as such blocks are
freed) with a fresh ``mmap`` and returns them with ``munmap`` when freed, and it gives the top of
the heap back to the OS once more than the trim threshold is free there. A service that builds
and drops answers of hundreds of KiB per call then page-faults through every one of them: the
memory service serializing REMOTE retrieval's 686 KiB per-layer answer (8 decode sequences)
took ~0.8 ms for that alone, 0.1 ms with the thresholds below (bench/RESULTS.md,
remote_round_trip). Messages stay under 16 MiB (a search answer within --max-response-mb, a
FetchMemory slice, an AppendMemory message), so they come from the heap and stay there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("extmind.heap")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 16 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 64 << 20  # free memory kept at the top of the heap before returning it


def keep_message_buffers() -> bool:
    """Sets glibc's mmap and trim thresholds (above) for this process. Does nothing, and returns
    False, off glibc or when the environment tunes malloc already (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``: the operator's choice wins)."""
    if not sys.platform.startswith("linux"):
        return False
    if any(v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("could not set malloc thresholds; large messages are mapped anew each time")
    return ok
