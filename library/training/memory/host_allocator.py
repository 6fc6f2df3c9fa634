"""The C allocator's settings for a training process: freed memory is kept for the next step.

glibc serves allocations above 32 MiB with their own ``mmap`` and gives them back to the system when freed, and
trims the heap when its free top grows: every training step then faults in its activations page by page again.
On a real-size SD1.5 at 256 px (CPU, one thread) that was 600,000 page faults and 0.8 s of system time per 6.5 s
step; keeping the memory made the step 15 % faster with the same peak RSS (bench/RESULTS.md, issue 18).
Only the allocator's bookkeeping changes: results are bit for bit the same.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
OPT_OUT = "SDT_DEFAULT_MALLOC"  # =1 keeps glibc's defaults


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and never trim it; True when applied.

    A no-op off Linux, with another C library, or with ``SDT_DEFAULT_MALLOC=1`` in the environment.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1  # -1: never trim (mallopt(3))
    logger.debug("allocator: large blocks from the heap, no trimming (%s)", "applied" if applied else "refused")
    return applied
